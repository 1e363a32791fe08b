"""MedVista: do the tools matter, and how fast are the env and the pool?

    python benchmarks/bench_medvista.py [--images 240] [--pool-steps 400] [--out benchmarks/results]

1. Generates the default data (`--images` cases, seed 0) and times it.
2. Tools matter, without any learned model: the fixed threshold detector (`oracle.detect_in_views`)
   answers the generated questions from the full image at the input size (no zoom), and after
   the oracle's zooms; mean benchmark score per question type, for the default detector on
   every split and for a small sweep of its two thresholds on the test split. The oracle
   (which knows the answer) and the majority answer of each question type are the references.
3. Env speed in-process: reset, zoom step, answer step (best of `--rounds` medians).
4. `EnvPool` throughput (4 envs on 2 worker processes, the oracle's action sequence replayed
   for every env) with ``info_images="all"`` (every image seen so far, each step) and
   ``"new"`` (each image sent once), the bytes a step's info pickles to, and the same loop on
   the in-process env as the baseline.
5. Writes one episode's picture (full image, zooms, question, answer) to
   `OUT/medvista_episode.png` and all numbers to `OUT/medvista_bench.json`.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pickle
import statistics
import sys
import tempfile
import time

import numpy as np


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` calls."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def majority_scores(items) -> dict[str, float]:
    """Score of answering every question with its type's most common training answer."""
    by_type = collections.defaultdict(list)
    for item in items:
        by_type[item.question_type].append(item.answer)
    out, total = {}, []
    for kind, answers in by_type.items():
        top = collections.Counter(answers).most_common(1)[0][1]
        out[kind] = top / len(answers)
        total += [1.0] * top + [0.0] * (len(answers) - top)
    out["all"] = float(np.mean(total))
    return out


def detector_section(data_dir: str, progress: bool) -> dict:
    import gymnasium

    from hiper_envs.medvista import oracle

    result = {}
    for split in ("train", "validate", "test"):
        env = gymnasium.make("hiper/MedVista-v0", data_dir=data_dir, split=split).unwrapped
        acc = oracle.detector_accuracy(env, range(len(env.items)), progress=progress)
        acc["majority"] = majority_scores(env.items)
        acc["oracle"] = {"all": float(np.mean([oracle.play_oracle_episode(env, i)["won"] for i in range(len(env.items))]))}
        result[split] = acc
    env = gymnasium.make("hiper/MedVista-v0", data_dir=data_dir, split="test").unwrapped
    sweep = []
    for threshold in (30.0, 40.0):
        for min_area in (3, 8):
            config = oracle.DetectorConfig(threshold=threshold, min_area_px=min_area)
            acc = oracle.detector_accuracy(env, range(len(env.items)), config)
            sweep.append({"threshold": threshold, "min_area_px": min_area,
                          "no_zoom": acc["no_zoom"]["all"], "zoom": acc["zoom"]["all"]})
    result["sweep_test"] = sweep
    return result


def env_speed(data_dir: str, rounds: int) -> dict:
    import gymnasium

    env = gymnasium.make("hiper/MedVista-v0", data_dir=data_dir, split="train").unwrapped
    n = len(env.items)
    best = {"reset_ms": [], "zoom_ms": [], "contrast_ms": [], "answer_ms": []}
    rng = np.random.default_rng(0)
    for _ in range(rounds):
        indices = rng.integers(n, size=50)
        samples = collections.defaultdict(list)
        for index in indices:
            start = time.perf_counter()
            env.reset(options={"index": int(index)})
            samples["reset_ms"].append(time.perf_counter() - start)
            for name, action in (("zoom_ms", "zoom[0, 0, 500, 500]"), ("contrast_ms", "contrast[high]"),
                                 ("answer_ms", "answer[yes]")):
                start = time.perf_counter()
                env.step(action)
                samples[name].append(time.perf_counter() - start)
        for name, values in samples.items():
            best[name].append(1e3 * statistics.median(values))
    return {name: min(values) for name, values in best.items()}


def _episode_actions(env, index: int) -> list[str]:
    from hiper_envs.medvista import oracle

    env.reset(options={"index": index})
    zooms = [oracle.zoom_action(box) for box, _ in oracle.oracle_zooms(env.item, env.tool_budget)]
    return zooms + [oracle.answer_action(env.item.answer)]


def pool_section(data_dir: str, steps: int, num_envs: int = 4, workers: int = 2) -> dict:
    import gymnasium

    from hiper_jax.rollout.env_pool import EnvPool, GymFactory

    plan_env = gymnasium.make("hiper/MedVista-v0", data_dir=data_dir, split="train").unwrapped
    out = {"num_envs": num_envs, "workers": workers, "steps": steps}
    for mode in ("all", "new"):
        factory = GymFactory("hiper_envs:hiper/MedVista-v0", data_dir=data_dir, split="train", info_images=mode)
        pool = EnvPool(factory, num_envs=num_envs, envs_per_worker=num_envs // workers)
        try:
            wall, sizes = _pool_run(pool, plan_env, steps, num_envs)
        finally:
            pool.close()
        out[f"{mode}_steps_per_s"] = steps / wall
        out[f"{mode}_info_kib_per_step"] = float(np.mean(sizes)) / 1024
    envs = [gymnasium.make("hiper/MedVista-v0", data_dir=data_dir, split="train").unwrapped for _ in range(num_envs)]
    out["in_process_steps_per_s"] = steps / _local_run(envs, plan_env, steps)
    return out


def _pool_run(pool, plan_env, steps: int, num_envs: int) -> tuple[float, list[int]]:
    """Steps the pool along oracle plans; after an auto-reset, plans the question it drew."""
    n = len(plan_env.items)
    first = pool.reset(options=[{"index": (7 * k) % n} for k in range(num_envs)])
    plans = [_episode_actions(plan_env, info["index"]) for _, info in first]
    cursor = [0] * num_envs
    sizes: list[int] = []
    start = time.perf_counter()
    for _ in range(steps // num_envs):
        results = pool.step([plans[k][cursor[k]] for k in range(num_envs)])
        for k, result in enumerate(results):
            sizes.append(len(pickle.dumps(result.info, protocol=pickle.HIGHEST_PROTOCOL)))
            cursor[k] += 1
            if result.terminated or result.truncated:
                plans[k], cursor[k] = _episode_actions(plan_env, result.info["index"]), 0
    return time.perf_counter() - start, sizes


def _local_run(envs, plan_env, steps: int) -> float:
    """The same loop on in-process envs (no pickling, no processes): the baseline; seconds."""
    n = len(plan_env.items)
    plans, cursor, next_index = [], [], list(range(len(envs)))
    for k, env in enumerate(envs):
        env.reset(options={"index": (7 * k) % n})
        plans.append(_episode_actions(plan_env, (7 * k) % n))
        cursor.append(0)
    start = time.perf_counter()
    for _ in range(steps // len(envs)):
        for k, env in enumerate(envs):
            _, _, terminated, truncated, _ = env.step(plans[k][cursor[k]])
            cursor[k] += 1
            if terminated or truncated:
                next_index[k] = (next_index[k] + 13) % n
                env.reset(options={"index": next_index[k]})
                plans[k], cursor[k] = _episode_actions(plan_env, next_index[k]), 0
    return time.perf_counter() - start


def episode_picture(data_dir: str, path: str) -> str:
    import gymnasium

    from hiper_envs.medvista import oracle
    from hiper_envs.medvista.figure import episode_figure

    env = gymnasium.make("hiper/MedVista-v0", data_dir=data_dir, split="test").unwrapped
    index = max(range(len(env.items)), key=lambda i: (env.items[i].question_type == "location",
                                                      len(oracle.oracle_zooms(env.items[i], env.tool_budget)), -i))
    record = oracle.play_oracle_episode(env, index)
    captions = ["full image (input size)"] + [t["action"] for t in record["turns"][:-1]]
    views = list(zip(env.images, env.image_boxes))
    detections = oracle.detect_in_views(views, env.source.shape[:2])
    no_zoom = oracle.detect_in_views(views[:1], env.source.shape[:2])
    footer = (f"{record['turns'][-1]['action']} (reference: {env.item.answer}); detector: "
              f"{oracle.detector_answer(env.item, no_zoom)!r} without zoom, "
              f"{oracle.detector_answer(env.item, detections)!r} after the zooms")
    return episode_figure(env.images, captions, f"Q: {env.item.question}", footer, path, boxes=env.image_boxes[1:])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--pool-steps", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)

    import hiper_envs  # noqa: F401 - registers the ids
    from hiper_envs.medvista import synth

    os.makedirs(args.out, exist_ok=True)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = os.path.join(tmp, "data")
        start = time.perf_counter()
        summary = synth.generate(data_dir, synth.SynthConfig(num_images=args.images, seed=0), progress=args.progress)
        results["generate_s"] = time.perf_counter() - start
        results["questions"] = summary["questions"]
        print(f"generated {args.images} cases in {results['generate_s']:.1f} s: {summary['questions']}", file=sys.stderr)
        results["detector"] = detector_section(data_dir, args.progress)
        print(json.dumps(results["detector"], indent=1), file=sys.stderr)
        results["env_ms"] = env_speed(data_dir, args.rounds)
        print(json.dumps(results["env_ms"]), file=sys.stderr)
        results["pool"] = pool_section(data_dir, args.pool_steps)
        print(json.dumps(results["pool"]), file=sys.stderr)
        results["episode_png"] = episode_picture(data_dir, os.path.join(args.out, "medvista_episode.png"))
    with open(os.path.join(args.out, "medvista_bench.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
