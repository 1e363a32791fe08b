"""Expert demonstrations with subgoal annotations, as JSONL (one line per episode).

    python -m hiper_envs.alfworld.demos --games DIR --out demos.jsonl [--seed 0] [--workers 2]

Each line (the schema shared with the WebShop env; later prompt/SFT code reads it):

    {"env": "alfworld", "game": "<gamefile>", "task_type": "...", "task": "<goal sentence>",
     "admissible_subgoals": [...], "won": true, "num_turns": N,
     "turns": [{"observation": "<text the agent saw before acting>",
                "admissible_actions": [...], "switch": "SWITCH" | "KEEP",
                "subgoal": "find and take the apple", "action": "go to fridge 1",
                "reward": 0.0, "done": false}, ...]}

The actions are the fixed handcoded expert's (see `expert.py`), played in `AlfWorldEnv`, so
observations, rewards and `done` are exactly what an agent sees. The subgoal of a turn is the
step of the task the state is in before acting ("find and take the apple", "heat the apple
with the microwave", "put the apple in the fridge"); a turn is SWITCH when its subgoal differs
from the previous turn's, and the first turn always is.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

from hiper_envs.alfworld.games import resolve_games

SWITCH, KEEP = "SWITCH", "KEEP"
DEMO_MAX_STEPS = 100


def play_expert_episode(
    gamefile: str, seed: int = 0, max_steps: int = DEMO_MAX_STEPS, env: Any = None
) -> dict:
    """Play the expert on one game and return the demonstration record (schema above).

    `env`: an `AlfWorldEnv(..., expert=True)` to reuse (one engine for many games); by
    default a fresh one is made and closed.
    """
    from hiper_envs.alfworld.env import AlfWorldEnv

    own_env = env is None
    if own_env:
        env = AlfWorldEnv([gamefile], max_steps=max_steps, expert=True, subgoals=True)
    try:
        observation, info = env.reset(seed=seed, options={"gamefile": gamefile})
        record = {"env": "alfworld", "game": gamefile, "task_type": info["task_type"], "task": info["task"]}
        if "admissible_subgoals" in info:
            record["admissible_subgoals"] = info["admissible_subgoals"]
        turns: list[dict] = []
        done = False
        while not done and info["expert_action"] is not None:
            subgoal = info["expert_subgoal"]
            switch = SWITCH if not turns or turns[-1]["subgoal"] != subgoal else KEEP
            action = info["expert_action"]
            admissible = info["admissible_actions"]
            next_observation, reward, terminated, truncated, info = env.step(action)
            done = terminated or truncated
            turns.append(
                {
                    "observation": observation,
                    "admissible_actions": admissible,
                    "switch": switch,
                    "subgoal": subgoal,
                    "action": action,
                    "reward": float(reward),
                    "done": done,
                }
            )
            observation = next_observation
        return {**record, "won": bool(info["won"]), "num_turns": len(turns), "turns": turns}
    finally:
        if own_env:
            env.close()


def _play_games(args: tuple[Sequence[tuple[int, str]], int, int]) -> list[dict]:
    """Episodes for `(index, gamefile)` pairs, on one engine (episode i uses seed `seed + i`)."""
    from hiper_envs.alfworld.env import AlfWorldEnv

    indexed, seed, max_steps = args
    env = AlfWorldEnv([gamefile for _, gamefile in indexed], max_steps=max_steps, expert=True, subgoals=True)
    try:
        return [play_expert_episode(gamefile, seed + index, max_steps, env) for index, gamefile in indexed]
    finally:
        env.close()


def iter_demos(
    gamefiles: Sequence[str], seed: int = 0, max_steps: int = DEMO_MAX_STEPS, workers: int = 1
) -> Iterable[dict]:
    """Demonstrations for `gamefiles`, in order (episode i uses seed `seed + i`)."""
    indexed = list(enumerate(gamefiles))
    chunk_size = 8
    chunks = [(indexed[i : i + chunk_size], seed, max_steps) for i in range(0, len(indexed), chunk_size)]
    if workers <= 1:
        for chunk in chunks:
            yield from _play_games(chunk)
        return
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        for records in pool.map(_play_games, chunks):
            yield from records


def write_demos(
    games: str | Iterable[str],
    out_path: str,
    seed: int = 0,
    max_steps: int = DEMO_MAX_STEPS,
    include_failed: bool = False,
    workers: int = 1,
    progress: bool = True,
) -> dict:
    """Write expert demonstrations for `games` (as `AlfWorldEnv` takes them) to `out_path`.

    Episodes the expert does not win are left out unless `include_failed`; their game files
    are listed in the returned summary `{"games", "written", "won", "failed"}`.
    """
    from tqdm.auto import tqdm

    gamefiles = resolve_games(games)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp_path = out_path + ".tmp"
    won, written, failed = 0, 0, []
    with open(tmp_path, "w") as f:
        demos = iter_demos(gamefiles, seed, max_steps, workers)
        for record in tqdm(demos, total=len(gamefiles), desc="expert demos", disable=not progress):
            won += record["won"]
            if not record["won"]:
                failed.append(record["game"])
            if record["won"] or include_failed:
                f.write(json.dumps(record) + "\n")
                written += 1
    os.replace(tmp_path, out_path)
    return {"games": len(gamefiles), "written": written, "won": won, "failed": failed}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write ALFWorld expert demonstrations (JSONL).")
    parser.add_argument(
        "--games", required=True, nargs="+", help="game directories or files, or official:<split>"
    )
    parser.add_argument("--out", required=True, help="output .jsonl path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=DEMO_MAX_STEPS)
    parser.add_argument("--include-failed", action="store_true", help="also write episodes the expert lost")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    games = args.games[0] if len(args.games) == 1 else args.games
    summary = write_demos(games, args.out, args.seed, args.max_steps, args.include_failed, args.workers)
    print(
        f"{summary['won']}/{summary['games']} won; wrote {summary['written']} episodes to {args.out}",
        file=sys.stderr,
    )
    for gamefile in summary["failed"]:
        print(f"expert lost: {gamefile}", file=sys.stderr)


if __name__ == "__main__":
    main()
