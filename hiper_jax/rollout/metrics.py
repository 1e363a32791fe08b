"""Rollout metrics: success overall and per task type, turns, invalid/format errors, switching."""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np

from hiper_jax.rollout.types import Trajectory


def rollout_metrics(trajectories: Sequence[Trajectory]) -> dict[str, float]:
    """Scalar metrics of a set of episodes.

    Keys: ``success`` (fraction won), ``success/<task_type>`` and ``episodes/<task_type>``
    (its episode count), ``episodes``, ``mean_turns``,
    ``mean_return`` (sum of env rewards), ``invalid_rate`` and ``format_error_rate`` (per
    turn), ``switch_rate`` (SWITCH turns after the first, per turn after the first),
    ``mean_segment_turns`` (turns per subgoal segment; turn 0 opens one). Episodes lost to env
    worker faults (``lost``) are left out of every metric.
    """
    trajectories = [traj for traj in trajectories if not traj.lost]
    if not trajectories:
        return {"episodes": 0.0}
    turns = [turn for traj in trajectories for turn in traj.turns]
    later = [turn for traj in trajectories for turn in traj.turns[1:]]
    segments = sum(1 + sum(turn.switch for turn in traj.turns[1:]) for traj in trajectories if traj.turns)
    metrics = {
        "episodes": float(len(trajectories)),
        "success": float(np.mean([traj.won for traj in trajectories])),
        "mean_turns": float(np.mean([traj.num_turns for traj in trajectories])),
        "mean_return": float(np.mean([sum(t.reward for t in traj.turns) for traj in trajectories])),
        "invalid_rate": float(np.mean([t.invalid for t in turns])) if turns else 0.0,
        "format_error_rate": float(np.mean([not t.format_valid for t in turns])) if turns else 0.0,
        "switch_rate": float(np.mean([t.switch for t in later])) if later else 0.0,
        "mean_segment_turns": len(turns) / max(segments, 1),
    }
    by_type = defaultdict(list)
    for traj in trajectories:
        by_type[traj.task_type or "unknown"].append(traj.won)
    for task_type, wins in sorted(by_type.items()):
        metrics[f"success/{task_type}"] = float(np.mean(wins))
        metrics[f"episodes/{task_type}"] = float(len(wins))
    return metrics
