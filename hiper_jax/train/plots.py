"""PNG plots of a training run from its metric records (``metrics.jsonl``)."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

# Headless (Agg) unless a notebook's inline backend is active.
from hiper_jax.plotting import pyplot


def save_figure(fig, path: str) -> str:
    """Lays out, writes (PNG, 110 dpi) and closes ``fig``; returns ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def _series(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    points = [(r["iteration"], r[key]) for r in records if key in r]
    if not points:
        return np.zeros(0), np.zeros(0)
    x, y = zip(*points)
    return np.asarray(x), np.asarray(y, float)


def plot_run(records: Sequence[dict], out_dir: str, title: str = "") -> list[str]:
    """Writes ``curves.png`` (success and return, train and eval), ``task_types.png`` (eval
    success per task type, first vs last evaluation) and ``planning.png`` (switch rate and
    segment length); returns the paths written."""
    plt = pyplot()
    os.makedirs(out_dir, exist_ok=True)
    paths = []

    fig, (ax_s, ax_r) = plt.subplots(1, 2, figsize=(11, 4))
    for prefix, style in (("train/", "-"), ("eval/", "o-")):
        x, y = _series(records, prefix + "success")
        if x.size:
            ax_s.plot(x, 100 * y, style, label=prefix.rstrip("/"))
        x, y = _series(records, prefix + "mean_return")
        if x.size:
            ax_r.plot(x, y, style, label=prefix.rstrip("/"))
    ax_s.set(xlabel="iteration", ylabel="success (%)", title="success rate", ylim=(-2, 102))
    ax_r.set(xlabel="iteration", ylabel="episode return", title="return")
    for ax in (ax_s, ax_r):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    paths.append(save_figure(fig, os.path.join(out_dir, "curves.png")))

    evals = [r for r in records if "eval/success" in r]
    if evals:
        types = sorted({k.split("/", 2)[2] for r in evals for k in r if k.startswith("eval/success/")})
        fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(types) + 2), 4))
        width = 0.38
        for offset, (label, record) in zip((-width / 2, width / 2),
                                           (("first eval", evals[0]), ("last eval", evals[-1]))):
            values = [100 * record.get(f"eval/success/{t}", np.nan) for t in types]
            ax.bar(np.arange(len(types)) + offset, values, width,
                   label=f"{label} (iteration {record['iteration']})")
        ax.set_xticks(np.arange(len(types)), [t.replace("_", "\n") for t in types], fontsize=7)
        ax.set(ylabel="success (%)", title="eval success per task type", ylim=(0, 105))
        ax.legend()
        paths.append(save_figure(fig, os.path.join(out_dir, "task_types.png")))

    fig, (ax_w, ax_l) = plt.subplots(1, 2, figsize=(11, 4))
    for prefix, style in (("train/", "-"), ("eval/", "o-")):
        x, y = _series(records, prefix + "switch_rate")
        if x.size:
            ax_w.plot(x, y, style, label=prefix.rstrip("/"))
        x, y = _series(records, prefix + "mean_segment_turns")
        if x.size:
            ax_l.plot(x, y, style, label=prefix.rstrip("/"))
    ax_w.set(xlabel="iteration", ylabel="SWITCH per turn", title="switch rate")
    ax_l.set(xlabel="iteration", ylabel="turns", title="mean subgoal segment length")
    for ax in (ax_w, ax_l):
        ax.grid(alpha=0.3)
        ax.legend()
    paths.append(save_figure(fig, os.path.join(out_dir, "planning.png")))
    return paths
