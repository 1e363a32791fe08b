"""HAE demo: advantages of a hand-made Plan-Execute trajectory, printed and plotted.

Run with ``python -m hiper_jax.demo [--out DIR]``: a one-second look at what HAE computes,
without a model or an environment (the training main job is ``bash scripts/main.sh``).
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from hiper_jax.hae import HAEConfig, compute_hae
from hiper_jax.plotting import plot_hae_trajectory

# An ALFWorld-style episode: "heat some egg and put it in the garbagecan".
TRAJECTORY = [
    # (switch, subgoal, action, reward)
    (True, "find and take the egg", "go to fridge 1", 0.0),
    (False, "find and take the egg", "open fridge 1", 0.0),
    (False, "find and take the egg", "go to countertop 1", 0.0),
    (False, "find and take the egg", "take egg 1 from countertop 1", 0.0),
    (True, "heat the egg with the microwave", "go to microwave 1", 0.0),
    (False, "heat the egg with the microwave", "heat egg 1 with microwave 1", 0.0),
    (True, "put the egg in the garbagecan", "go to garbagecan 1", 0.0),
    (False, "put the egg in the garbagecan", "move egg 1 to garbagecan 1", 10.0),
]


def example_batch(gamma: float = 0.95, confidence: float = 0.8) -> dict:
    """The demo trajectory as a ``[1, T]`` batch.

    The critic is a hand-made one that predicts ``confidence`` times the discounted final reward
    for every head, as a partly trained critic would.
    """
    num_turns = len(TRAJECTORY)
    final_reward = TRAJECTORY[-1][3]
    steps_to_go = np.arange(num_turns, 0, -1) - 1
    values = (confidence * final_reward * gamma ** steps_to_go)[None, :].astype(np.float32)
    return dict(
        rewards=np.array([[step[3] for step in TRAJECTORY]], np.float32),
        values_low=values,
        values_high=values,
        values_term=values,
        switch=np.array([[step[0] for step in TRAJECTORY]]),
        dones=np.eye(1, num_turns, num_turns - 1, dtype=bool),
        mask=np.ones((1, num_turns), bool),
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/hae_demo", help="folder for the plot")
    parser.add_argument("--gamma", type=float, default=0.95)
    parser.add_argument("--keep-penalty", type=float, default=-0.3)
    args = parser.parse_args(argv)

    cfg = HAEConfig(gamma=args.gamma, lam_turn=0.95, lam_seg=0.95, keep_penalty=args.keep_penalty,
                    keep_penalty_mode="normalized")
    batch = example_batch(gamma=args.gamma)
    out = compute_hae(cfg=cfg, **batch)
    print("HAE demo: advantages of a hand-made Plan-Execute episode")
    print(f"config: {cfg}\n")
    header = f"{'turn':>4} {'switch':>6}  {'subgoal':<32} {'action':<28} {'r':>5} {'A_low':>7} {'A_high':>7} {'A_term':>7}"
    print(header)
    print("-" * len(header))
    for t, (switch, subgoal, action, reward) in enumerate(TRAJECTORY):
        high = f"{float(out.adv_high[0, t]):7.3f}" if bool(out.boundary[0, t]) else f"{'':>7}"
        print(f"{t:>4} {('SWITCH' if switch else 'KEEP'):>6}  {subgoal:<32} {action:<28} "
              f"{reward:5.1f} {float(out.adv_low[0, t]):7.3f} {high} {float(out.adv_term[0, t]):7.3f}")
    os.makedirs(args.out, exist_ok=True)
    fig = plot_hae_trajectory([s[3] for s in TRAJECTORY], out, subgoals=[s[1] for s in TRAJECTORY])
    path = os.path.join(args.out, "hae_trajectory.png")
    fig.savefig(path, dpi=120)
    print(f"\nplot written to {path}")


if __name__ == "__main__":
    main()
