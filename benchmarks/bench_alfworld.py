"""ALFWorld engine speed: reset time and steps/s, one env and batched over worker processes,
with the stock engine, with only the TatSu parse memo, and with all our speed fixes (see
envs/alfworld/engine.py).

    python benchmarks/bench_alfworld.py [--games-per-type 2] [--steps 30] [--workers 2]

Games are generated first (small: the generator's default scene size; large: 30 receptacles
and 20 distractor types, closer to the official games). Each variant runs in its own process,
since the fixes patch the engine process-wide. Actions are random admissible commands from a
fixed seed, so every variant plays the same moves. Steps/s is best of `--repeats` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

SIZES = {"small": (8, 4), "large": (30, 20)}  # (max_receptacles, max_distractors)
VARIANTS = {
    "stock": [],
    "parse memo": ["memoise_parses"],
    "all fixes": ["memoise_parses", "share_context", "memoise_translation"],
}


class _EnvFactory:
    """Builds an AlfWorldEnv in a pool worker after choosing the engine variant there."""

    def __init__(self, games: list[str], speedups: list[str]):
        self.games = games
        self.speedups = speedups

    def __call__(self):
        from hiper_envs.alfworld import engine
        from hiper_envs.alfworld.env import AlfWorldEnv

        engine.apply_engine_fixes(speedups=self.speedups)
        return AlfWorldEnv(self.games, max_steps=100_000)


def _single_env(games: list[str], steps: int, repeats: int) -> dict:
    from hiper_envs.alfworld.env import AlfWorldEnv

    env = AlfWorldEnv(games, max_steps=100_000)
    first_reset, again_reset = [], []
    for game in range(len(games)):
        start = time.perf_counter()
        env.reset(seed=game, options={"game": game})
        first_reset.append(time.perf_counter() - start)
        env.close()  # a fresh engine, so every game is loaded from its file
    best = 0.0
    for repeat in range(repeats):
        rng = random.Random(repeat)
        elapsed, done = 0.0, 0
        for game in range(len(games)):
            start = time.perf_counter()
            _, info = env.reset(seed=game, options={"game": game})
            again_reset.append(time.perf_counter() - start)
            for _ in range(steps):
                action = rng.choice(info["admissible_actions"])
                start = time.perf_counter()
                _, _, terminated, truncated, info = env.step(action)
                elapsed += time.perf_counter() - start
                done += 1
                if terminated or truncated:
                    _, info = env.reset(seed=game, options={"game": game})
        best = max(best, done / elapsed)
    return {
        "reset_first_s": sum(first_reset) / len(first_reset),
        "reset_again_s": sum(again_reset) / len(again_reset),
        "single_steps_per_s": best,
    }


def _pool(
    games: list[str], speedups: list[str], workers: int, envs_per_worker: int, steps: int, repeats: int
) -> dict:
    from hiper_jax.rollout import EnvPool

    num_envs = workers * envs_per_worker
    with EnvPool(_EnvFactory(games, speedups), num_envs=num_envs, envs_per_worker=envs_per_worker) as pool:
        options = [{"game": i % len(games)} for i in range(num_envs)]
        start = time.perf_counter()
        infos = [info for _, info in pool.reset(seeds=list(range(num_envs)), options=options)]
        reset_s = time.perf_counter() - start
        best = 0.0
        for repeat in range(repeats):
            rng = random.Random(repeat)
            start = time.perf_counter()
            for _ in range(steps):
                actions = [rng.choice(info["admissible_actions"]) for info in infos]
                infos = [result.info for result in pool.step(actions)]
            best = max(best, steps * num_envs / (time.perf_counter() - start))
    return {"pool_reset_batch_s": reset_s, "pool_steps_per_s": best, "pool_envs": num_envs}


def _run_variant(args: argparse.Namespace) -> None:
    from hiper_envs.alfworld import engine

    speedups = VARIANTS[args.variant]
    engine.apply_engine_fixes(speedups=speedups)
    games = json.loads(args.games_json)
    result = _single_env(games, args.steps, args.repeats)
    result.update(_pool(games, speedups, args.workers, args.envs_per_worker, args.steps, args.repeats))
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--games-per-type", type=int, default=2)
    parser.add_argument(
        "--steps", type=int, default=30, help="random steps per game (single env) and per env (pool)"
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--envs-per-worker", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--games-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        _run_variant(args)
        return

    from hiper_envs.alfworld.generate import TASK_TYPES, GeneratorConfig, generate_games

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size, (max_receptacles, max_distractors) in SIZES.items():
            config = GeneratorConfig(max_receptacles, max_distractors)
            games = generate_games(
                os.path.join(tmp, size),
                args.games_per_type * len(TASK_TYPES),
                args.seed,
                config=config,
                progress=False,
            )
            for variant in VARIANTS:
                command = [sys.executable, __file__, "--variant", variant, "--games-json", json.dumps(games)]
                command += [
                    f"--{k.replace('_', '-')}={getattr(args, k)}"
                    for k in ("steps", "repeats", "workers", "envs_per_worker")
                ]
                out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                rows.append({"size": size, "variant": variant, **json.loads(out.strip().splitlines()[-1])})

    pool_label = f"pool steps/s ({args.workers}x{args.envs_per_worker} envs)"
    header = [
        "scenes",
        "engine",
        "reset s (load)",
        "reset s (again)",
        "steps/s (1 env)",
        pool_label,
        "pool reset s",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        cells = [row["size"], row["variant"], f"{row['reset_first_s']:.3f}", f"{row['reset_again_s']:.3f}"]
        cells += [f"{row['single_steps_per_s']:.1f}", f"{row['pool_steps_per_s']:.1f}"]
        cells += [f"{row['pool_reset_batch_s']:.2f}"]
        print("| " + " | ".join(cells) + " |")
    for size in SIZES:
        stock = next(r for r in rows if r["size"] == size and r["variant"] == "stock")
        for row in (r for r in rows if r["size"] == size and r["variant"] != "stock"):
            single = row["single_steps_per_s"] / stock["single_steps_per_s"]
            pooled = row["pool_steps_per_s"] / stock["pool_steps_per_s"]
            reset = stock["reset_again_s"] / row["reset_again_s"]
            print(
                f"{size}, {row['variant']} vs stock: steps/s x{single:.1f} (1 env), x{pooled:.1f} (pool); "
                f"reset of a seen game x{reset:.1f} faster"
            )


if __name__ == "__main__":
    main()
