"""The estimator study: HAE vs flat credit (turn-level GAE), GRPO, GiGPO and HAE's ablations
from one warm start.

Every run starts from the same checkpoint, plays the same generated games in the same task
groups and stops after the same number of training environment turns (``train.max_env_turns``);
only the advantage estimator and the seed change. The study is resumable: finished runs are
skipped and an interrupted run continues from its last checkpoint.

A study config (``configs/study_*.py``) holds two sections: ``run`` (a training config, see
:mod:`hiper_jax.train.config`) and ``study`` (estimators, seeds, the reference arm, where to
write, and the gradient-variance measurement). Outputs under ``study.out_dir``: one run
directory per ``ESTIMATOR/seedN``, ``summary.md`` (the tables), ``summary.json``,
``eval_success_vs_env_turns.png`` (eval success overall, on the multi-subtask and on the
single-subtask task types, mean over seeds with a 95% bootstrap band),
``train_success_vs_env_turns.png``, ``success_per_task_type.png``, ``paired_differences.png``
and ``gradient_variance.json``.

Statistics: a run's score is its final held-out evaluation; arms are compared by the paired
difference reference minus arm over the seeds both finished (the seed fixes the games' order,
the sampling keys and the initial critic, so pairs share them), with a percentile bootstrap
95% interval of the mean difference over seeds (:func:`bootstrap_mean_ci`).
"""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from hiper_jax.experiments.study_config import (  # noqa: F401 - the study's config API, re-exported
    base_study, games_dir, run_config, run_dir, validate_study)
from hiper_jax.train.logger import read_metrics
from hiper_jax.train.report import ROWS

# The eval metrics of the study's table: (key, label, scale) rows of the run summary's.
EVAL_KEYS = tuple(row for row in ROWS
                  if row[0] in ("success", "mean_turns", "invalid_rate", "switch_rate", "mean_segment_turns"))


# ALFWorld's task types by the number of subtasks (find and carry, then clean/heat/cool or a
# second object) that a solution chains.
MULTI_SUBTASK_TYPES = ("pick_two_obj_and_place", "pick_clean_then_place_in_recep",
                       "pick_heat_then_place_in_recep", "pick_cool_then_place_in_recep")
SINGLE_SUBTASK_TYPES = ("pick_and_place_simple", "look_at_obj_in_light")
TASK_GROUPS = (("multi-subtask", MULTI_SUBTASK_TYPES), ("single-subtask", SINGLE_SUBTASK_TYPES))
BOOTSTRAP_RESAMPLES = 10_000


def is_finished(directory: str) -> bool:
    """Whether the run in ``directory`` logged its final evaluation."""
    path = os.path.join(directory, "metrics.jsonl")
    return os.path.exists(path) and any(r.get("final") for r in read_metrics(path))


def prepare_games(config: ml_collections.ConfigDict, progress: bool = True) -> None:
    """Generates the shared ALFWorld games once (``run.train.seed`` picks them)."""
    if config.run.env.name != "alfworld" or config.run.env.games_dir:
        return
    from hiper_jax.train.trainer import prepare_env_data

    prepare_env_data(config.run, config.study.out_dir, progress=progress)


def run_study(config: ml_collections.ConfigDict, progress: bool = True,
              variance: bool = True) -> dict:
    """Runs (or finishes) every run of the study, then the gradient-variance measurement, then
    writes the summary; returns :func:`summarize`'s result."""
    from hiper_jax.train.trainer import EXIT_INTERRUPTED, Trainer

    validate_study(config)
    os.makedirs(config.study.out_dir, exist_ok=True)
    prepare_games(config, progress)
    for seed in config.study.seeds:  # seeds outermost: a partial study compares like with like
        for estimator in config.study.estimators:
            directory = run_dir(config, estimator, seed)
            if is_finished(directory):
                print(f"{estimator} seed {seed}: finished earlier, skipped")
                continue
            print(f"{estimator} seed {seed}: training into {directory}")
            trainer = Trainer(run_config(config, estimator, seed), progress=progress)
            trainer.run()
            if trainer.stop_signal is not None:  # checkpointed: the next call resumes this run
                print(f"{estimator} seed {seed}: stopped by a signal; run the study again to resume")
                raise SystemExit(EXIT_INTERRUPTED)
    if variance and config.study.variance_estimators:
        path = os.path.join(config.study.out_dir, "gradient_variance.json")
        if not os.path.exists(path):
            result = gradient_variance(config, progress=progress)
            with open(path, "w", encoding="utf-8") as handle:
                json.dump(result, handle, indent=2)
    return summarize(config)


# --- the summary -------------------------------------------------------------------------------


def _evals(records: Sequence[dict]) -> list[tuple[float, dict]]:
    """``(training env turns before the evaluation, record)`` for every evaluation of a run."""
    out, turns = [], 0.0
    for record in records:
        if "eval/success" in record:
            at = record.get("env_turns_total", turns) if record.get("final") else turns
            out.append((float(at), record))
        turns = record.get("env_turns_total", turns)
    return out


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = np.asarray(values, float)
    if values.size == 0:
        return float("nan"), float("nan")
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0


def bootstrap_mean_ci(values, level: float = 0.95, num_resamples: int = BOOTSTRAP_RESAMPLES,
                      seed: int = 0) -> tuple:
    """Percentile bootstrap interval of the mean over the first axis.

    Draws ``num_resamples`` resamples of the ``N`` rows with replacement, takes each one's mean
    and returns the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of those means
    (linear interpolation). Deterministic for a given ``seed``. ``N = 1`` gives a zero-width
    interval (there is no spread to resample).

    Args:
      values: ``[N, ...]`` finite floats: N samples (seeds) of independent statistics (e.g. the
        points of a curve in the trailing axes).
      level: the interval's coverage, in (0, 1).
    Returns:
      ``(mean, low, high)``, each shaped ``values.shape[1:]`` (floats for ``[N]`` input).
    """
    values = np.asarray(values, np.float64)
    if values.ndim == 0 or values.shape[0] == 0:
        raise ValueError(f"bootstrap_mean_ci needs at least one sample, got shape {values.shape}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if not np.all(np.isfinite(values)):
        raise ValueError("bootstrap_mean_ci needs finite values (drop missing ones first)")
    index = np.random.default_rng(seed).integers(0, values.shape[0], size=(num_resamples, values.shape[0]))
    means = values[index].mean(axis=1)
    low, high = np.quantile(means, [(1.0 - level) / 2.0, (1.0 + level) / 2.0], axis=0)
    mean = values.mean(axis=0)
    if values.ndim == 1:
        return float(mean), float(low), float(high)
    return mean, low, high


def group_success(record: dict, task_types: Sequence[str], prefix: str = "eval/") -> float:
    """Success over the episodes of ``task_types`` in one evaluation record.

    The per-type success rates ``{prefix}success/<type>`` weighted by their episode counts
    ``{prefix}episodes/<type>``; in records without counts, their plain mean. NaN when the
    record has none of the types.
    """
    present = [t for t in task_types if f"{prefix}success/{t}" in record]
    if not present:
        return float("nan")
    rates = np.asarray([record[f"{prefix}success/{t}"] for t in present], float)
    counts = np.asarray([record.get(f"{prefix}episodes/{t}", np.nan) for t in present], float)
    if np.all(np.isfinite(counts)) and counts.sum() > 0:
        return float((rates * counts).sum() / counts.sum())
    return float(rates.mean())


def run_scores(record: dict) -> dict[str, float]:
    """The scores an evaluation record gives a run: ``all`` (success over every episode), the
    task groups of :data:`TASK_GROUPS` and each task type's success (NaN when absent)."""
    scores = {"all": float(record.get("eval/success", float("nan")))}
    for name, types in TASK_GROUPS:
        scores[name] = group_success(record, types)
    prefix = "eval/success/"
    scores.update({k[len(prefix):]: float(v) for k, v in record.items() if k.startswith(prefix)})
    return scores


def collect_results(config: ml_collections.ConfigDict) -> dict:
    """Per estimator, its finished runs: seed, first and final evaluation records, budget used,
    and curves of ``(training env turns, value)`` points: ``curve`` (eval success), one per task
    group in ``group_curves`` and ``train_curve`` (training success of each iteration)."""
    results = {}
    for estimator in config.study.estimators:
        runs = []
        for seed in config.study.seeds:
            directory = run_dir(config, estimator, seed)
            if not is_finished(directory):
                continue
            records = read_metrics(os.path.join(directory, "metrics.jsonl"))
            evals = _evals(records)
            runs.append({"seed": int(seed), "first": evals[0][1], "final": evals[-1][1],
                         "env_turns": evals[-1][0],
                         "curve": [(turns, r["eval/success"]) for turns, r in evals],
                         "group_curves": {name: [(turns, group_success(r, types)) for turns, r in evals]
                                          for name, types in TASK_GROUPS},
                         "train_curve": [(float(r["env_turns_total"]), float(r["train/success"]))
                                         for r in records if "train/success" in r and "env_turns_total" in r]})
        results[estimator] = runs
    return results


def paired_differences(results: dict, reference: str, score: str) -> dict[str, dict]:
    """Reference minus each other arm on one score of :func:`run_scores` (final evaluation),
    paired by seed over the seeds both finished with the score present.

    Returns, per other arm: ``seeds``, ``differences`` (one per paired seed, in score units),
    and ``mean``, ``low``, ``high`` (:func:`bootstrap_mean_ci`; NaN without pairs).
    """
    by_seed = {r["seed"]: run_scores(r["final"]).get(score, float("nan")) for r in results.get(reference, [])}
    out = {}
    for arm, runs in results.items():
        if arm == reference:
            continue
        pairs = [(r["seed"], by_seed[r["seed"]] - run_scores(r["final"]).get(score, float("nan")))
                 for r in runs if r["seed"] in by_seed]
        pairs = [(seed, d) for seed, d in pairs if np.isfinite(d)]
        differences = [d for _, d in pairs]
        mean, low, high = bootstrap_mean_ci(differences) if differences else (float("nan"),) * 3
        out[arm] = {"seeds": [seed for seed, _ in pairs], "differences": differences,
                    "mean": mean, "low": low, "high": high}
    return out


def _cell(values: Sequence[float], scale: float) -> str:
    mean, std = _mean_std([v * scale for v in values])
    return "n/a" if math.isnan(mean) else f"{mean:.1f} ± {std:.1f}"


def _interval_cell(difference: dict, scale: float = 100.0) -> str:
    if not difference["differences"]:
        return "n/a"
    return (f"{scale * difference['mean']:+.1f} [{scale * difference['low']:+.1f}, "
            f"{scale * difference['high']:+.1f}]")


def _task_types(results: dict) -> list[str]:
    """The task types any finished run's final evaluation reports, sorted."""
    prefix = "eval/success/"
    return sorted({k[len(prefix):] for runs in results.values() for run in runs
                   for k in run["final"] if k.startswith(prefix)})


def _groups_present(results: dict) -> list[str]:
    """The task groups of :data:`TASK_GROUPS` that some finished run was evaluated on."""
    task_types = set(_task_types(results))
    return [name for name, types in TASK_GROUPS if task_types & set(types)]


def summary_markdown(results: dict, variance: Optional[dict] = None, reference: str = "hae") -> str:
    """The study tables as Markdown: every arm's final evaluation (mean ± sample std over
    seeds), then the paired differences reference minus each arm (overall, per task group and
    per task type) with bootstrap 95% intervals, then the gradient variance when measured."""
    task_types = _task_types(results)
    groups = _groups_present(results)
    head = ["estimator", "seeds", "env turns", "success % before"]
    head += [label for _, label, _ in EVAL_KEYS] + [f"{g} %" for g in groups] + [f"{t} %" for t in task_types]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for estimator, runs in results.items():
        if not runs:
            lines.append(f"| {estimator} | 0 | " + " | ".join(["n/a"] * (len(head) - 2)) + " |")
            continue
        row = [estimator, str(len(runs)), f"{np.mean([r['env_turns'] for r in runs]):.0f}",
               _cell([r["first"]["eval/success"] for r in runs], 100.0)]
        row += [_cell([r["final"].get(f"eval/{key}", float("nan")) for r in runs], scale)
                for key, _, scale in EVAL_KEYS]
        row += [_cell([run_scores(r["final"])[g] for r in runs], 100.0) for g in groups]
        row += [_cell([r["final"].get(f"eval/success/{t}", float("nan")) for r in runs], 100.0)
                for t in task_types]
        lines.append("| " + " | ".join(row) + " |")
    episodes = {int(r["final"].get("eval/episodes", 0)) for runs in results.values() for r in runs}
    lines.append("")
    lines.append(f"Final evaluation after the env-turn budget (mean ± std over seeds; "
                 f"{'/'.join(map(str, sorted(episodes)))} eval episodes per run). "
                 "'before' is the warm start, evaluated with each run's seed. Task groups: "
                 + "; ".join(f"{name} = {', '.join(types)}" for name, types in TASK_GROUPS) + ".")
    others = [arm for arm in results if arm != reference]
    if reference in results and others:
        for scores, title in ((["all"] + groups, "overall and per task group"), (task_types, "per task type")):
            if not scores:
                continue
            diffs = {score: paired_differences(results, reference, score) for score in scores}
            lines += ["", f"Paired differences {reference} minus each arm, {title} (success points):", "",
                      "| arm | paired seeds | " + " | ".join(f"Δ {s}" for s in scores) + " |",
                      "|" + "---|" * (len(scores) + 2)]
            for arm in others:
                seeds = diffs[scores[0]][arm]["seeds"]
                lines.append(f"| {arm} | {len(seeds)} | "
                             + " | ".join(_interval_cell(diffs[s][arm]) for s in scores) + " |")
        lines += ["", f"Mean over seeds of ({reference} − arm) on the final evaluation, paired by seed, "
                  f"with a percentile bootstrap 95% interval ({BOOTSTRAP_RESAMPLES} resamples of the "
                  "seeds); an interval that contains 0 is no evidence of a difference."]
    if variance:
        lines += variance_markdown(variance)
    return "\n".join(lines)


def variance_markdown(variance: dict) -> list[str]:
    """Markdown lines of a ``gradient_variance.json`` (one policy, or several with intervals)."""
    estimators = variance["estimators"]
    if "per_policy" not in variance:  # a measurement under one policy, without intervals
        lines = ["", "| estimator | E‖g‖² | ‖E g‖² | tr Cov(g) | SNR ‖E g‖²/tr Cov |", "|---|---|---|---|---|"]
        for estimator, v in estimators.items():
            lines.append(f"| {estimator} | {v['mean_sq_norm']:.3e} | {v['sq_norm_of_mean']:.3e} | "
                         f"{v['total_variance']:.3e} | {v['snr']:.3f} |")
        return lines + ["", f"Policy-gradient variance over {variance['minibatches']} mini-batches of "
                        f"{variance['rows']} turns drawn from the same {variance['episodes']} episodes "
                        f"of one fixed policy ({variance['policy']})."]

    def cell(v: dict, key: str, fmt: str) -> str:
        return f"{v[key]:{fmt}} [{v[key + '_low']:{fmt}}, {v[key + '_high']:{fmt}}]"
    lines = ["", "| estimator | E‖g‖² | ‖E g‖² | tr Cov(g) | SNR ‖E g‖²/tr Cov |", "|---|---|---|---|---|"]
    for estimator, v in estimators.items():
        lines.append(f"| {estimator} | " + " | ".join(
            cell(v, key, fmt) for key, fmt in (("mean_sq_norm", ".3e"), ("sq_norm_of_mean", ".3e"),
                                               ("total_variance", ".3e"), ("snr", ".3f"))) + " |")
    reference = variance["reference"]
    if variance.get("ratios"):
        lines += ["", f"| {reference} / estimator | tr Cov(g) ratio | SNR ratio | per policy (variance; SNR) |",
                  "|---|---|---|---|"]
        for estimator, r in variance["ratios"].items():
            per = "; ".join(f"{a:.2f}, {b:.2f}" for a, b in zip(r["variance_ratio_per_policy"],
                                                                r["snr_ratio_per_policy"]))
            lines.append(f"| {estimator} | {cell(r, 'variance_ratio', '.2f')} | "
                         f"{cell(r, 'snr_ratio', '.2f')} | {per} |")
    policies = variance["policies"]
    return lines + ["", f"Policy-gradient statistics under {len(policies)} policies ({', '.join(policies)}): "
                    f"for each, {variance['minibatches']} mini-batches of {variance['rows']} turns drawn "
                    f"from the same {variance['episodes']} episodes of that policy. Means over the "
                    "policies with percentile bootstrap 95% intervals (resampling policies); ratios are "
                    "geometric means of the per-policy ratios. One policy gives zero-width intervals."]


def curve_band(curves: Sequence[Sequence[tuple[float, float]]], num_points: int = 25):
    """Mean over runs of ``(x, y)`` curves with a 95% bootstrap band.

    Each curve is interpolated on ``num_points`` points from 0 to the shortest curve's last x;
    curves with a missing (non-finite) value are left out. Returns ``(x, mean, low, high)``,
    each ``[num_points]``, or None when no curve is left.
    """
    curves = [c for c in curves if c and np.all(np.isfinite(np.asarray(c, float)))]
    if not curves:
        return None
    x = np.linspace(0.0, min(c[-1][0] for c in curves), num_points)
    ys = np.stack([np.interp(x, *zip(*c)) for c in curves])
    mean, low, high = bootstrap_mean_ci(ys)
    return x, mean, low, high


def _plot_band(ax, curves, colour, label: str) -> None:
    for curve in curves:
        if curve:
            x, y = zip(*curve)
            ax.plot(x, 100 * np.asarray(y), color=colour, alpha=0.25, lw=0.8)
    band = curve_band(curves)
    if band is None:
        return
    x, mean, low, high = band
    ax.plot(x, 100 * mean, color=colour, lw=2.2, label=label)
    if len(curves) > 1:
        ax.fill_between(x, 100 * low, 100 * high, color=colour, alpha=0.18, lw=0)


def plot_study(results: dict, out_dir: str, reference: str = "hae") -> list[str]:
    """Writes the learning curves (eval success overall and per task group, training success;
    mean over seeds with a 95% bootstrap band, thin lines single seeds), the per-task-type bars
    and the paired differences; returns the paths."""
    from hiper_jax.train.plots import pyplot, save_figure

    plt = pyplot()
    paths = []
    colours = dict(zip(results, plt.cm.tab10(np.arange(len(results)))))

    def label(estimator, runs):
        return f"{estimator} ({len(runs)} seed{'s' if len(runs) > 1 else ''})"

    panels = [("all task types", lambda run: run["curve"])]
    panels += [(g, lambda run, g=g: run["group_curves"][g]) for g in _groups_present(results)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.3), squeeze=False)
    for ax, (title, curve_of) in zip(axes[0], panels):
        for estimator, runs in results.items():
            if runs:
                _plot_band(ax, [curve_of(r) for r in runs], colours[estimator], label(estimator, runs))
        ax.set(xlabel="training environment turns", ylabel="eval success (%)", title=f"held-out: {title}")
        ax.set_ylim(0, None)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Eval success vs environment turns (mean over seeds, 95% bootstrap band; thin: single seeds)",
                 fontsize=9)
    paths.append(save_figure(fig, os.path.join(out_dir, "eval_success_vs_env_turns.png")))

    fig, ax = plt.subplots(figsize=(7, 4.3))
    for estimator, runs in results.items():
        if runs:
            _plot_band(ax, [r["train_curve"] for r in runs], colours[estimator], label(estimator, runs))
    ax.set(xlabel="training environment turns", ylabel="training success (%)",
           title="Training success per iteration (mean over seeds, 95% bootstrap band)")
    ax.set_ylim(0, None)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    paths.append(save_figure(fig, os.path.join(out_dir, "train_success_vs_env_turns.png")))

    categories = ["all"] + _groups_present(results) + _task_types(results)
    groups = ["before (warm start)"] + list(results)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(categories) * max(len(groups), 4) / 4), 4.5))
    width = 0.8 / max(len(groups), 1)
    # The warm start's evaluation depends on the seed only: one run per seed stands for it.
    before = list({r["seed"]: r for runs in reversed(list(results.values())) for r in runs}.values())
    for g, name in enumerate(groups):
        runs, which, colour = (before, "first", "0.6") if g == 0 else (results[name], "final", colours[name])
        means, errors = [], [[], []]
        for category in categories:
            values = [run_scores(r[which]).get(category, np.nan) for r in runs]
            values = [v for v in values if np.isfinite(v)]
            mean, low, high = bootstrap_mean_ci(values) if values else (np.nan,) * 3
            means.append(mean)
            errors[0].append(mean - low)
            errors[1].append(high - mean)
        ax.bar(np.arange(len(categories)) + g * width, 100 * np.asarray(means), width,
               yerr=100 * np.asarray(errors), color=colour, label=name, capsize=2)
    ax.set_xticks(np.arange(len(categories)) + width * (len(groups) - 1) / 2)
    ax.set_xticklabels([c.replace("_", "\n") for c in categories], fontsize=6)
    ax.set_ylabel("eval success (%)")
    ax.set_title("Final eval success (mean over seeds, 95% bootstrap interval)")
    ax.legend(fontsize=7)
    paths.append(save_figure(fig, os.path.join(out_dir, "success_per_task_type.png")))

    others = [arm for arm in results if arm != reference and results[arm]]
    if results.get(reference) and others:
        scores = ["all"] + _groups_present(results)
        fig, ax = plt.subplots(figsize=(7, 0.6 * len(others) + 2.0))
        for k, score in enumerate(scores):
            diffs = paired_differences(results, reference, score)
            y = np.arange(len(others)) + (k - (len(scores) - 1) / 2) * 0.22
            means = np.asarray([diffs[a]["mean"] for a in others], float)
            low = np.asarray([diffs[a]["low"] for a in others], float)
            high = np.asarray([diffs[a]["high"] for a in others], float)
            ax.errorbar(100 * means, y, xerr=100 * np.stack([means - low, high - means]), fmt="o",
                        capsize=3, label=score)
        ax.axvline(0.0, color="0.3", lw=1)
        ax.set_yticks(np.arange(len(others)), others, fontsize=8)
        ax.set_xlabel(f"{reference} minus arm, final eval success (points)")
        ax.set_title("Paired differences over seeds (mean, 95% bootstrap interval)")
        ax.grid(alpha=0.3, axis="x")
        ax.legend(fontsize=7)
        paths.append(save_figure(fig, os.path.join(out_dir, "paired_differences.png")))
    return paths


def summarize(config: ml_collections.ConfigDict) -> dict:
    """Writes ``summary.md``, ``summary.json`` and the plots from whatever runs have finished."""
    out_dir = config.study.out_dir
    reference = config.study.reference
    os.makedirs(out_dir, exist_ok=True)
    results = collect_results(config)
    variance_path = os.path.join(out_dir, "gradient_variance.json")
    variance = None
    if os.path.exists(variance_path):
        with open(variance_path, encoding="utf-8") as handle:
            variance = json.load(handle)
    table = summary_markdown(results, variance, reference)
    scores = ["all"] + _groups_present(results) + _task_types(results)
    differences = ({score: paired_differences(results, reference, score) for score in scores}
                   if reference in results else {})
    with open(os.path.join(out_dir, "summary.md"), "w", encoding="utf-8") as handle:
        handle.write(table + "\n")
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as handle:
        json.dump({"results": results, "reference": reference, "paired_differences": differences,
                   "gradient_variance": variance}, handle, indent=2, default=float)
    plots = plot_study(results, out_dir, reference) if any(results.values()) else []
    return {"results": results, "table": table, "plots": plots, "paired_differences": differences,
            "gradient_variance": variance}


# --- policy-gradient variance ----------------------------------------------------------------


def _pg_loss(actor, config, tokens, valid, loss_mask, advantages, temperature, allowed=None):
    from hiper_jax.train.ppo import policy_token_stats

    logp, _, _ = policy_token_stats(actor, config, tokens, valid, temperature, allowed=allowed)
    return -jnp.sum(jnp.where(loss_mask, advantages * logp, 0.0)) / jnp.maximum(jnp.sum(loss_mask), 1)


_pg_grad = jax.jit(jax.grad(_pg_loss), static_argnames=("config", "temperature"))


def flat_vector(tree) -> np.ndarray:
    """All leaves of a pytree (e.g. a gradient) as one float64 vector ``[P]``."""
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def minibatch_gradient_stats(actor, model_config, batch, rows: int, minibatches: int, temperature: float,
                             seed: int = 0, text_mask=None) -> dict:
    """Variance of the on-policy gradient ``-mean(A * grad log pi)`` over random mini-batches.

    Draws ``minibatches`` mini-batches of ``rows`` turns from ``batch`` (a
    :class:`~hiper_jax.train.ppo.PPOBatch`), keeps running sums (memory of two parameter
    vectors) and returns ``mean_sq_norm`` E||g||^2, ``sq_norm_of_mean`` ||E g||^2,
    ``total_variance`` tr Cov(g) (unbiased) and ``snr`` = ||E g||^2 / tr Cov(g).
    ``text_mask``: the grammar's, for a batch sampled with a constraint.
    """
    from hiper_jax.train.ppo import batch_allowed, mini_batches

    rng = np.random.default_rng(seed)
    total, sq_norms, count = None, [], 0
    while count < minibatches:
        for mini in mini_batches(batch, rows, rng):
            if count == minibatches:
                break
            grads = _pg_grad(actor, model_config, jnp.asarray(mini.tokens), jnp.asarray(mini.valid),
                             jnp.asarray(mini.loss_mask), jnp.asarray(mini.advantages), temperature,
                             batch_allowed(mini, text_mask))
            flat = flat_vector(grads)
            total = flat if total is None else total + flat
            sq_norms.append(float(flat @ flat))
            count += 1
    mean = total / count
    mean_sq_norm = float(np.mean(sq_norms))
    sq_norm_of_mean = float(mean @ mean)
    variance = (mean_sq_norm - sq_norm_of_mean) * count / (count - 1)
    return {"mean_sq_norm": mean_sq_norm, "sq_norm_of_mean": sq_norm_of_mean,
            "total_variance": variance, "snr": sq_norm_of_mean / variance if variance > 0 else float("inf")}


def variance_policies(config: ml_collections.ConfigDict) -> list[tuple[str, Optional[str]]]:
    """``(name, checkpoints folder or None)`` of the policies the gradient variance is measured
    under: the warm start (``None``), then the final state of each finished run of the source
    estimator (``hae`` when it is a variance estimator, else the first), seed by seed, up to
    ``study.variance_policies`` in all."""
    study = config.study
    source = "hae" if "hae" in study.variance_estimators else study.variance_estimators[0]
    policies: list[tuple[str, Optional[str]]] = [("warm start", None)]
    for seed in study.seeds:
        directory = run_dir(config, source, seed)
        if len(policies) < study.variance_policies and is_finished(directory):
            policies.append((f"{source} seed {seed} final", os.path.join(directory, "checkpoints")))
    return policies


def aggregate_variance(per_policy: Sequence[dict[str, dict]], reference: str) -> dict:
    """Statistics over policies of :func:`minibatch_gradient_stats` results.

    Args:
      per_policy: one ``{estimator: stats}`` per policy, the same estimators in each.
      reference: the estimator the others are compared with.
    Returns:
      ``estimators``: per estimator and statistic, the mean over policies with its bootstrap 95%
      interval (``<stat>``, ``<stat>_low``, ``<stat>_high``); ``ratios``: per other estimator,
      reference / estimator of ``total_variance`` and of ``snr``, as the geometric mean over
      policies with the interval of the mean log-ratio (``variance_ratio``, ``snr_ratio`` and
      their ``_low`` / ``_high``), and ``per_policy`` the ratios of each policy.
    """
    estimators = list(per_policy[0])
    out: dict = {"estimators": {}, "ratios": {}}
    for estimator in estimators:
        stats = {}
        for key in ("mean_sq_norm", "sq_norm_of_mean", "total_variance", "snr"):
            mean, low, high = bootstrap_mean_ci([p[estimator][key] for p in per_policy])
            stats.update({key: mean, f"{key}_low": low, f"{key}_high": high})
        out["estimators"][estimator] = stats
    if reference not in estimators:
        return out
    for estimator in estimators:
        if estimator == reference:
            continue
        ratios = {}
        for key, name in (("total_variance", "variance_ratio"), ("snr", "snr_ratio")):
            logs = [math.log(p[reference][key] / p[estimator][key]) for p in per_policy]
            mean, low, high = bootstrap_mean_ci(logs)
            ratios.update({name: math.exp(mean), f"{name}_low": math.exp(low),
                           f"{name}_high": math.exp(high), f"{name}_per_policy": [math.exp(x) for x in logs]})
        out["ratios"][estimator] = ratios
    return out


def gradient_variance(config: ml_collections.ConfigDict, progress: bool = True) -> dict:
    """Under each policy of :func:`variance_policies`: plays ``study.variance_episodes`` episodes
    with it and compares, on those same episodes, the mini-batch variance of the policy
    gradient under each variance estimator (with that policy's critic); then
    :func:`aggregate_variance` over the policies (reference: ``hae`` when measured)."""
    from hiper_jax.train.config import batch_settings
    from hiper_jax.train.trainer import Trainer

    study = config.study
    policies = variance_policies(config)
    source_estimator = "hae" if "hae" in study.variance_estimators else study.variance_estimators[0]
    run = run_config(config, source_estimator, study.seeds[0])
    run.train.out_dir = os.path.join(study.out_dir, "variance")
    run.train.resume = False
    trainer = Trainer(run, progress=progress)
    warm_start = trainer.state
    text_mask = trainer.grammar.text_mask if trainer.grammar is not None else None
    per_policy, names = [], []
    for number, (name, checkpoints) in enumerate(policies):
        trainer.state = warm_start
        if checkpoints is not None:
            iteration = trainer.restore(checkpoints)
            name = f"{name} ({iteration} iterations)"
        trajectories = trainer.collect(study.variance_episodes, jax.random.key(12345 + number), split="train",
                                       temperature=run.sampling.temperature)
        stats = {}
        for estimator in study.variance_estimators:
            cfg = copy.deepcopy(run)
            cfg.advantage.estimator = estimator
            batch = trainer.build_batch(trajectories, batch_settings(cfg)).batch
            stats[estimator] = minibatch_gradient_stats(
                trainer.state.actor, trainer.model_config, batch, run.ppo.mini_batch_rows,
                study.variance_minibatches, run.sampling.temperature or 1.0, seed=number, text_mask=text_mask)
        per_policy.append(stats)
        names.append(name)
        print(f"gradient variance under {name}: "
              + ", ".join(f"{e} SNR {s['snr']:.3f}" for e, s in stats.items()))
    reference = "hae" if "hae" in study.variance_estimators else study.variance_estimators[0]
    out = {"policies": names, "episodes": study.variance_episodes, "minibatches": study.variance_minibatches,
           "rows": run.ppo.mini_batch_rows, "reference": reference,
           "per_policy": [{"policy": n, "estimators": s} for n, s in zip(names, per_policy)]}
    out.update(aggregate_variance(per_policy, reference))
    return out
