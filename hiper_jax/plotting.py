"""Plots people look at instead of reading numbers: HAE segments and advantage streams."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def plot_hae_trajectory(
    rewards: Sequence[float],
    hae,
    row: int = 0,
    subgoals: Optional[Sequence[str]] = None,
    title: str = "HAE on one trajectory",
):
    """Draws one trajectory's segments, rewards and the three advantage streams.

    Args:
      rewards: ``[T]`` rewards of the trajectory (as fed to HAE, before shaping).
      hae: an :class:`~hiper_jax.hae.HAEOutput` holding the trajectory at ``row``.
      subgoals: optional ``[T]`` subgoal text, written on each segment.
    Returns:
      The matplotlib Figure (two stacked axes sharing the turn axis).
    """
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    boundary = np.asarray(hae.boundary[row], bool)
    num_turns = len(rewards)
    turns = np.arange(num_turns)
    starts = [int(t) for t in np.flatnonzero(boundary[:num_turns])]
    ends = starts[1:] + [num_turns]

    fig, (ax_r, ax_a) = plt.subplots(2, 1, figsize=(10, 6), sharex=True,
                                     gridspec_kw={"height_ratios": [1, 2]})
    colours = plt.cm.Pastel1(np.linspace(0, 1, 9))
    for k, (s, e) in enumerate(zip(starts, ends)):
        for ax in (ax_r, ax_a):
            ax.axvspan(s - 0.5, e - 0.5, color=colours[k % 9], alpha=0.6, lw=0)
        if subgoals is not None:
            ax_r.text((s + e - 1) / 2, 1.02, subgoals[s], transform=ax_r.get_xaxis_transform(),
                      ha="center", va="bottom", fontsize=8)
    ax_r.bar(turns, rewards, color="black", width=0.4)
    ax_r.set_ylabel("reward")
    ax_a.plot(turns, np.asarray(hae.adv_low[row])[:num_turns], "o-", label="A_low (action)")
    ax_a.plot(starts, np.asarray(hae.adv_high[row])[starts], "s", ms=10,
              label="A_high (subgoal, segment starts)")
    ax_a.plot(turns, np.asarray(hae.adv_term[row])[:num_turns], "^--", label="A_term (switch)")
    ax_a.axhline(0, color="grey", lw=0.8)
    ax_a.set_xlabel("turn")
    ax_a.set_ylabel("advantage")
    ax_a.legend(loc="best", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
