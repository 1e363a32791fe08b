"""WebShop environment speed and memory at 1k, 10k and 100k products.

    python benchmarks/bench_webshop.py [--sizes 1000 10000 100000] [--queries 200] [--episodes 100]

Each size runs in a fresh process so its memory numbers stand alone. Per size: catalog
generation time, BM25 index build time, search latency (instruction texts of the goals as
queries), env steps/s under the oracle and under a random policy (admissible actions), and the
process's resident memory after building the catalog and after the index. The baseline in the
same run is ``rank_bm25.BM25Okapi`` (the BM25 that WebShop's engine imports, pure Python over
token lists) on the same documents and queries, when rank-bm25 is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(num_products: int, n_queries: int, n_episodes: int) -> dict:
    import re

    import gymnasium
    import hiper_envs  # noqa: F401
    from hiper_envs.webshop.catalog import get_catalog
    from hiper_envs.webshop.demos import POLICIES, run_policy
    from hiper_envs.webshop.generate import CatalogConfig
    from hiper_envs.webshop.search import SearchIndex, product_document

    result = {"products": num_products, "rss_start_mib": rss_mib()}
    start = time.perf_counter()
    catalog = get_catalog(config=CatalogConfig(num_products=num_products, seed=0))
    result["generate_s"] = time.perf_counter() - start
    result["rss_catalog_mib"] = rss_mib()
    start = time.perf_counter()
    index = SearchIndex(catalog.products)
    result["index_s"] = time.perf_counter() - start
    result["rss_index_mib"] = rss_mib()
    catalog._search_index = index

    queries = [goal.instruction_text for goal in catalog.goals[:n_queries]]
    index.search(queries[0])  # warm-up
    latencies = []
    for query in queries:
        start = time.perf_counter()
        index.search(query)
        latencies.append(time.perf_counter() - start)
    result["search_ms_mean"] = 1e3 * statistics.fmean(latencies)
    result["search_ms_p95"] = 1e3 * sorted(latencies)[int(0.95 * (len(latencies) - 1))]

    try:
        from rank_bm25 import BM25Okapi
    except ImportError:
        result["baseline_search_ms_mean"] = None
    else:
        tokenize = lambda text: re.findall(r"\w+", text.lower())  # noqa: E731
        start = time.perf_counter()
        baseline = BM25Okapi([tokenize(product_document(p)) for p in catalog.products])
        result["baseline_index_s"] = time.perf_counter() - start
        baseline_queries = queries[: max(5, min(len(queries), 2_000_000 // num_products))]
        start = time.perf_counter()
        for query in baseline_queries:
            scores = baseline.get_scores(tokenize(query))
            sorted(range(len(scores)), key=scores.__getitem__, reverse=True)[:50]
        result["baseline_search_ms_mean"] = 1e3 * (time.perf_counter() - start) / len(baseline_queries)

    env = gymnasium.make("hiper/WebShop-v0", num_products=num_products, split="eval").unwrapped
    assert env.catalog is catalog  # the env reuses the process's catalog and index
    for name in ("oracle", "random", "search_buy_first", "search_first_with_options"):
        count = min(n_episodes, len(env.goals))
        start = time.perf_counter()
        episodes = list(run_policy(env, POLICIES[name](), range(count)))
        elapsed = time.perf_counter() - start
        steps = sum(e["num_turns"] for e in episodes)
        result[f"{name}_steps_per_s"] = steps / elapsed
        result[f"{name}_success"] = sum(e["won"] for e in episodes) / count
        result[f"{name}_mean_score"] = statistics.fmean(e["score"] for e in episodes)
    result["rss_end_mib"] = rss_mib()
    return result


def fmt(value, digits=1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.queries, args.episodes)))
        return
    rows = []
    for size in args.sizes:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one",
                str(size),
                "--queries",
                str(args.queries),
                "--episodes",
                str(args.episodes),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"done {size}", file=sys.stderr)
    print(
        "| products | generate s | index s | search ms mean / p95 | rank_bm25: index s / search ms "
        "| oracle steps/s | random steps/s | RSS MiB: start / catalog / index / end "
        "| success: oracle / random / buy first result (mean score) | success: first result, right options |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['products']:,} | {fmt(r['generate_s'], 2)} | {fmt(r['index_s'], 2)} "
            f"| {fmt(r['search_ms_mean'], 2)} / {fmt(r['search_ms_p95'], 2)} "
            f"| {fmt(r.get('baseline_index_s'), 2)} / {fmt(r['baseline_search_ms_mean'], 1)} "
            f"| {fmt(r['oracle_steps_per_s'], 0)} | {fmt(r['random_steps_per_s'], 0)} "
            f"| {fmt(r['rss_start_mib'], 0)} / {fmt(r['rss_catalog_mib'], 0)} / {fmt(r['rss_index_mib'], 0)} "
            f"/ {fmt(r['rss_end_mib'], 0)} "
            f"| {fmt(100 * r['oracle_success'], 0)}% / {fmt(100 * r['random_success'], 0)}% "
            f"/ {fmt(100 * r['search_buy_first_success'], 0)}% ({fmt(r['search_buy_first_mean_score'], 1)}) "
            f"| {fmt(100 * r['search_first_with_options_success'], 0)}% |"
        )


if __name__ == "__main__":
    main()
