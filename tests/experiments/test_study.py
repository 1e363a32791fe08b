"""The estimator study: summary statistics, gradient-variance arithmetic, and a small study on
the ChooseWord task that runs, writes its table and plots, and skips finished runs when rerun."""

import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from hiper_jax.experiments import study as study_lib
from hiper_jax.experiments.study import (
    MULTI_SUBTASK_TYPES,
    SINGLE_SUBTASK_TYPES,
    base_study,
    bootstrap_mean_ci,
    curve_band,
    group_success,
    minibatch_gradient_stats,
    paired_differences,
    run_dir,
    run_study,
    summarize,
)
from hiper_jax.train.logger import read_metrics
from tests.word_task import word_config


def study_config(run, out_dir, estimators=("hae", "grpo"), seeds=(0,)):
    study = base_study()
    study.estimators = estimators
    study.seeds = seeds
    study.out_dir = str(out_dir)
    study.variance_estimators = estimators
    study.variance_episodes = 32
    study.variance_minibatches = 4
    study.variance_policies = 2
    return ml_collections.ConfigDict({"run": run, "study": study})


def write_run(directory, evals, finished=True, counts=None):
    """A fake run: ``evals`` = [(env turns before the eval, success, per-type success)];
    ``counts``: eval episodes per task type, logged beside each evaluation when given."""
    os.makedirs(directory, exist_ok=True)
    records, turns = [], 0.0
    for k, (at, success, per_type) in enumerate(evals[:-1] if finished else evals):
        record = {"iteration": k, "eval/success": success, "eval/mean_turns": 10.0 + k,
                  "eval/invalid_rate": 0.5, "eval/switch_rate": 0.2, "eval/mean_segment_turns": 3.0,
                  "eval/episodes": 8.0, "train/success": 0.0, "env_turns": at - turns,
                  "env_turns_total": at + 100.0}
        record.update({f"eval/success/{t}": v for t, v in per_type.items()})
        record.update({f"eval/episodes/{t}": n for t, n in (counts or {}).items()})
        records.append(record)
        turns = at
    if finished:
        at, success, per_type = evals[-1]
        final = {"iteration": len(evals) - 1, "final": 1.0, "env_turns_total": at, "eval/success": success,
                 "eval/mean_turns": 7.0, "eval/invalid_rate": 0.25, "eval/switch_rate": 0.1,
                 "eval/mean_segment_turns": 2.0, "eval/episodes": 8.0}
        final.update({f"eval/success/{t}": v for t, v in per_type.items()})
        final.update({f"eval/episodes/{t}": n for t, n in (counts or {}).items()})
        records.append(final)
    with open(os.path.join(directory, "metrics.jsonl"), "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def test_summary_of_finished_runs(tmp_path):
    config = study_config(word_config("unused", tmp_path), tmp_path, estimators=("hae", "grpo"), seeds=(0, 1, 2))
    write_run(run_dir(config, "hae", 0), [(0, 0.25, {"a": 0.5}), (100, 0.5, {"a": 0.5}), (200, 0.75, {"a": 1.0})])
    write_run(run_dir(config, "hae", 1), [(0, 0.25, {"a": 0.0}), (100, 0.25, {"a": 0.5}), (210, 0.25, {"a": 0.5})])
    write_run(run_dir(config, "hae", 2), [(0, 0.25, {"a": 0.0}), (100, 0.5, {"a": 0.5})], finished=False)
    write_run(run_dir(config, "grpo", 0), [(0, 0.25, {"a": 0.5}), (100, 0.0, {"a": 0.0}), (205, 0.0, {"a": 0.0})])

    results = study_lib.collect_results(config)
    assert [r["seed"] for r in results["hae"]] == [0, 1]  # seed 2 did not finish
    assert [r["seed"] for r in results["grpo"]] == [0]
    assert results["hae"][0]["curve"] == [(0.0, 0.25), (100.0, 0.5), (200.0, 0.75)]
    assert results["hae"][1]["env_turns"] == 210.0

    summary = summarize(config)
    table = summary["table"]
    hae_row = next(line for line in table.splitlines() if line.startswith("| hae"))
    # final success 75 and 25: mean 50, sample std 35.4; before 25 +- 0; per type 100/50 -> 75 +- 35.4
    assert "| 2 | 205 | 25.0 ± 0.0 | 50.0 ± 35.4 |" in hae_row
    assert hae_row.rstrip(" |").endswith("75.0 ± 35.4")
    assert "| grpo | 1 | 205 | 25.0 ± 0.0 | 0.0 ± 0.0 |" in table
    for path in summary["plots"]:
        assert os.path.getsize(path) > 10_000
    assert {os.path.basename(p) for p in summary["plots"]} == {
        "eval_success_vs_env_turns.png", "train_success_vs_env_turns.png", "success_per_task_type.png",
        "paired_differences.png"}
    # hae - grpo paired on seed 0 only: 75 - 0 = +75 points (a zero-width interval from one pair)
    assert "| grpo | 1 | +75.0 [+75.0, +75.0] |" in table
    stored = json.load(open(tmp_path / "summary.json"))
    assert stored["results"]["hae"][0]["seed"] == 0
    assert stored["reference"] == "hae" and stored["paired_differences"]["all"]["grpo"]["seeds"] == [0]


def test_minibatch_gradient_variance_matches_explicit_computation():
    from hiper_jax.models import qwen2
    from hiper_jax.experiments.tiny import tiny_model_config
    from hiper_jax.train.ppo import PPOBatch, mini_batches

    config = tiny_model_config(64, hidden_size=32, num_layers=1, intermediate_size=64)
    actor = qwen2.init_params(jax.random.key(0), config)
    rng = np.random.default_rng(0)
    rows, length = 12, 16
    mask = np.zeros((rows, length), bool)
    mask[:, 8:12] = True
    zeros = np.zeros((rows, 3), np.float32)
    batch = PPOBatch(tokens=rng.integers(0, 64, (rows, length)).astype(np.int32),
                     valid=np.ones((rows, length), bool), loss_mask=mask,
                     advantages=rng.normal(size=(rows, length)).astype(np.float32),
                     old_logp=np.zeros((rows, length), np.float32), ref_logp=np.zeros((rows, length), np.float32),
                     value_read=np.zeros((rows, 3), np.int32), value_targets=zeros, old_values=zeros,
                     value_mask=np.zeros((rows, 3), bool))

    stats = minibatch_gradient_stats(actor, config, batch, rows=4, minibatches=6, temperature=1.0, seed=3)
    draw = np.random.default_rng(3)
    minis = mini_batches(batch, 4, draw) + mini_batches(batch, 4, draw)
    grads = []
    for mini in minis:
        g = study_lib._pg_grad(actor, config, jnp.asarray(mini.tokens), jnp.asarray(mini.valid),
                               jnp.asarray(mini.loss_mask), jnp.asarray(mini.advantages), 1.0)
        grads.append(np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(g)]))
    grads = np.stack(grads)
    expected = np.var(grads, axis=0, ddof=1).sum()
    assert stats["total_variance"] == pytest.approx(expected, rel=1e-6)
    assert stats["sq_norm_of_mean"] == pytest.approx(float(grads.mean(0) @ grads.mean(0)), rel=1e-6)
    assert expected > 0

    # One mini-batch holding every row: every draw gives the same gradient, no variance.
    whole = minibatch_gradient_stats(actor, config, batch, rows=rows, minibatches=3, temperature=1.0)
    assert whole["total_variance"] < 1e-6 * whole["mean_sq_norm"]


def test_bad_study_config_names_the_field(tmp_path):
    run = word_config("unused", tmp_path)
    with pytest.raises(ValueError, match="run.train.max_env_turns"):
        study_lib.validate_study(study_config(run, tmp_path), check_paths=False)
    run.train.max_env_turns = 100
    with pytest.raises(ValueError, match="rollouts_per_task"):
        study_lib.validate_study(study_config(run, tmp_path), check_paths=False)
    run.advantage.rollouts_per_task = 4
    bad = study_config(run, tmp_path, estimators=("hae", "ppo"))
    with pytest.raises(ValueError, match="unknown estimator 'ppo'"):
        study_lib.validate_study(bad, check_paths=False)
    study_lib.validate_study(study_config(run, tmp_path), check_paths=False)
    no_reference = study_config(run, tmp_path, estimators=("turn_gae", "grpo"))
    with pytest.raises(ValueError, match="study.reference"):
        study_lib.validate_study(no_reference, check_paths=False)
    with pytest.raises(ValueError, match="must not repeat"):
        study_lib.validate_study(study_config(run, tmp_path, seeds=(0, 0)), check_paths=False)
    run.advantage.rollouts_per_task = 1
    with pytest.raises(ValueError, match=r"rollouts_per_task: must be >= 2 for \['gigpo'\]"):
        study_lib.validate_study(study_config(run, tmp_path, estimators=("hae", "gigpo")), check_paths=False)
    study_lib.validate_study(study_config(run, tmp_path, estimators=("hae", "hae_no_term", "hae_flat_subgoal",
                                                                     "hae_no_keep_penalty")), check_paths=False)


@pytest.mark.slow
def test_small_study_runs_and_skips_finished_runs(word_checkpoint, tmp_path, capsys):
    run = word_config(word_checkpoint, tmp_path / "unused", iterations=10)
    run.advantage.rollouts_per_task = 4
    run.train.max_env_turns = 80  # 1-3 iterations of 32 ChooseWord episodes (~60 turns each)
    run.train.eval_every = 1
    config = study_config(run, tmp_path / "study")
    summary = run_study(config, progress=False)

    for estimator in ("hae", "grpo"):
        (result,) = summary["results"][estimator]
        records = read_metrics(os.path.join(run_dir(config, estimator, 0), "metrics.jsonl"))
        totals = [r["env_turns_total"] for r in records if "train/success" in r]
        # The run stops after the first iteration that reaches the budget.
        assert totals[-1] >= 80 and (len(totals) == 1 or totals[-2] < 80), totals
        assert result["env_turns"] == totals[-1]
        assert [turns for turns, _ in result["curve"]] == [0.0] + totals  # eval before each iteration + final
    variance = summary["gradient_variance"]
    assert variance["episodes"] == 32 and set(variance["estimators"]) == {"hae", "grpo"}
    # the warm start, then the finished hae run's final policy
    assert variance["policies"] == ["warm start", "hae seed 0 final (%d iterations)" % len(totals)], variance["policies"]
    for policy in variance["per_policy"]:
        for stats in policy["estimators"].values():
            assert np.isfinite(stats["total_variance"]) and stats["total_variance"] > 0
    for stats in variance["estimators"].values():
        assert stats["total_variance_low"] <= stats["total_variance"] <= stats["total_variance_high"]
    assert variance["ratios"]["grpo"]["variance_ratio"] > 0
    assert "| hae | 1 |" in summary["table"] and "SNR" in summary["table"]
    assert all(os.path.exists(p) for p in summary["plots"])

    metrics = os.path.join(run_dir(config, "hae", 0), "metrics.jsonl")
    before = open(metrics).read()
    capsys.readouterr()
    again = run_study(config, progress=False)
    assert "hae seed 0: finished earlier, skipped" in capsys.readouterr().out
    assert open(metrics).read() == before
    assert again["table"] == summary["table"]


def bootstrap_loop_reference(values, level, num_resamples, seed):
    """The percentile bootstrap written out: one resample at a time, a sorted list of means."""
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(values), size=(num_resamples, len(values)))
    means = sorted(sum(values[i] for i in row) / len(row) for row in index)
    def quantile(q):  # linear interpolation between order statistics (numpy's default)
        position = q * (len(means) - 1)
        below = int(math.floor(position))
        above = min(below + 1, len(means) - 1)
        return means[below] + (position - below) * (means[above] - means[below])
    return sum(values) / len(values), quantile((1 - level) / 2), quantile((1 + level) / 2)


def test_bootstrap_mean_ci():
    values = [0.1, 0.4, 0.35, 0.8, 0.25]
    got = bootstrap_mean_ci(values, level=0.9, num_resamples=2000, seed=7)
    np.testing.assert_allclose(got, bootstrap_loop_reference(values, 0.9, 2000, 7), rtol=1e-12)
    assert got[1] < got[0] < got[2]
    assert bootstrap_mean_ci(values, seed=3) == bootstrap_mean_ci(values, seed=3)  # deterministic
    assert bootstrap_mean_ci([0.3] * 5) == pytest.approx((0.3, 0.3, 0.3))
    assert bootstrap_mean_ci([0.6]) == pytest.approx((0.6, 0.6, 0.6))  # one seed: no spread
    # Many samples: close to the normal interval mean +- 1.96 sd / sqrt(n).
    sample = np.random.default_rng(0).normal(2.0, 1.0, size=400)
    mean, low, high = bootstrap_mean_ci(sample)
    half = 1.96 * sample.std(ddof=1) / math.sqrt(sample.size)
    assert high - low == pytest.approx(2 * half, rel=0.1)
    assert (low + high) / 2 == pytest.approx(mean, abs=0.02)
    # Columns are independent statistics (the points of a curve).
    table = np.stack([np.asarray(values), 2 * np.asarray(values)], axis=1)
    means, lows, highs = bootstrap_mean_ci(table, seed=1)
    assert means.shape == lows.shape == (2,)
    np.testing.assert_allclose([lows[1], highs[1]], [2 * lows[0], 2 * highs[0]], rtol=1e-12)
    for bad in ([], [0.1, float("nan")]):
        with pytest.raises(ValueError):
            bootstrap_mean_ci(bad)
    with pytest.raises(ValueError, match="level"):
        bootstrap_mean_ci(values, level=1.0)


def test_group_success_weights_types_by_their_episodes():
    record = {"eval/success/pick_two_obj_and_place": 0.5, "eval/success/pick_heat_then_place_in_recep": 0.0,
              "eval/success/pick_and_place_simple": 1.0}
    assert group_success(record, MULTI_SUBTASK_TYPES) == pytest.approx(0.25)  # no counts: plain mean
    record.update({"eval/episodes/pick_two_obj_and_place": 30.0, "eval/episodes/pick_heat_then_place_in_recep": 10.0})
    assert group_success(record, MULTI_SUBTASK_TYPES) == pytest.approx(15 / 40)
    assert group_success(record, SINGLE_SUBTASK_TYPES) == pytest.approx(1.0)
    assert math.isnan(group_success({"eval/success": 0.5}, SINGLE_SUBTASK_TYPES))
    assert set(MULTI_SUBTASK_TYPES) | set(SINGLE_SUBTASK_TYPES) == set(
        __import__("hiper_envs.alfworld.generate", fromlist=["TASK_TYPES"]).TASK_TYPES)


def test_paired_differences_and_the_study_tables(tmp_path):
    """Three arms x three seeds of fake runs on all six task types: the paired differences,
    their intervals and the tables, by hand."""
    config = study_config(word_config("unused", tmp_path), tmp_path, estimators=("hae", "turn_gae", "hae_no_term"),
                          seeds=(0, 1, 2))
    counts = {t: 16.0 for t in MULTI_SUBTASK_TYPES + SINGLE_SUBTASK_TYPES}
    finals = {"hae": (0.50, 0.25, 0.60), "turn_gae": (0.40, 0.30, 0.45), "hae_no_term": (0.50, 0.25, 0.60)}
    for arm, per_seed in finals.items():
        for seed, multi in enumerate(per_seed):
            per_type = {t: multi for t in MULTI_SUBTASK_TYPES} | {t: 0.75 for t in SINGLE_SUBTASK_TYPES}
            overall = (4 * multi + 2 * 0.75) / 6
            before = {t: 0.25 for t in per_type}
            write_run(run_dir(config, arm, seed), [(0, 0.25, before), (100, overall, per_type)], counts=counts)

    results = study_lib.collect_results(config)
    diffs = paired_differences(results, "hae", "multi-subtask")
    # hae - turn_gae per seed: +0.10, -0.05, +0.15 -> mean +0.0667; identical arms differ by 0.
    np.testing.assert_allclose(diffs["turn_gae"]["differences"], [0.10, -0.05, 0.15], atol=1e-9)
    assert diffs["turn_gae"]["seeds"] == [0, 1, 2]
    assert diffs["turn_gae"]["mean"] == pytest.approx(0.2 / 3)
    assert -0.05 <= diffs["turn_gae"]["low"] < diffs["turn_gae"]["mean"] < diffs["turn_gae"]["high"] <= 0.15
    assert diffs["hae_no_term"]["low"] == diffs["hae_no_term"]["high"] == 0.0
    single = paired_differences(results, "hae", "single-subtask")
    assert single["turn_gae"]["differences"] == [0.0, 0.0, 0.0]

    table = study_lib.summary_markdown(results, reference="hae")
    assert "multi-subtask % | single-subtask %" in table
    hae_row = next(line for line in table.splitlines() if line.startswith("| hae |"))
    assert "| 45.0 ± 18.0 | 75.0 ± 0.0 |" in hae_row  # multi: 50, 25, 60; single 75 everywhere
    turn_gae_row = next(line for line in table.splitlines() if line.startswith("| turn_gae | 3 | +"))
    assert "+6.7 [" in turn_gae_row and turn_gae_row.rstrip(" |").endswith("+0.0 [+0.0, +0.0]")
    assert "Δ pick_two_obj_and_place" in table


def test_curve_band():
    curves = [[(0.0, 0.2), (100.0, 0.4)], [(0.0, 0.4), (50.0, 0.4), (120.0, 0.8)],
              [(0.0, float("nan")), (100.0, 0.1)]]  # a curve with a missing value is left out
    x, mean, low, high = curve_band(curves, num_points=3)
    np.testing.assert_allclose(x, [0.0, 50.0, 100.0])
    np.testing.assert_allclose(mean, [0.3, 0.35, (0.4 + 0.4 + 0.4 * 50 / 70) / 2])
    assert np.all(low <= mean) and np.all(mean <= high) and high[0] - low[0] == pytest.approx(0.2)
    assert curve_band([[(0.0, float("nan"))]]) is None


@pytest.mark.slow
def test_smoke_study_runs_every_arm_on_alfworld(tmp_path, capsys):
    """configs/study_alfworld_smoke.py end to end: seven arms x two seeds on generated ALFWorld
    games with the shipped warm start, the tables with paired differences, the plots, and a
    rerun that skips every finished run."""
    from hiper_jax import configs

    config = configs.get("study_alfworld_smoke")
    config.study.out_dir = str(tmp_path / "smoke")
    summary = run_study(config, progress=False)
    arms = config.study.estimators
    assert len(arms) == 7 and set(summary["results"]) == set(arms)
    for arm in arms:
        assert [r["seed"] for r in summary["results"][arm]] == [0, 1], arm
        for run in summary["results"][arm]:
            assert run["final"]["eval/episodes"] == 6 and run["train_curve"], arm
    table = summary["table"]
    for arm in arms[1:]:
        assert f"| {arm} | 2 | " in table
    assert "Paired differences hae minus each arm" in table
    assert set(summary["gradient_variance"]["estimators"]) == {"hae", "gigpo"}
    assert {os.path.basename(p) for p in summary["plots"]} == {
        "eval_success_vs_env_turns.png", "train_success_vs_env_turns.png", "success_per_task_type.png",
        "paired_differences.png"}
    capsys.readouterr()
    again = run_study(config, progress=False)
    out = capsys.readouterr().out
    assert all(f"{arm} seed 1: finished earlier, skipped" in out for arm in arms)
    assert again["table"] == table


def test_variance_over_policies_means_intervals_and_ratios():
    rng = np.random.default_rng(0)
    per_policy = [{e: {"mean_sq_norm": v + m, "sq_norm_of_mean": m, "total_variance": v, "snr": m / v}
                   for e, (v, m) in zip(("hae", "grpo"), rng.uniform(0.1, 1.0, size=(2, 2)))}
                  for _ in range(5)]
    out = study_lib.aggregate_variance(per_policy, "hae")
    for estimator in ("hae", "grpo"):
        values = [p[estimator]["snr"] for p in per_policy]
        stats = out["estimators"][estimator]
        assert stats["snr"] == pytest.approx(np.mean(values))
        assert stats["snr_low"] < stats["snr"] < stats["snr_high"]
        assert (stats["snr_low"], stats["snr_high"]) == pytest.approx(bootstrap_mean_ci(values)[1:])
    ratio = [p["hae"]["total_variance"] / p["grpo"]["total_variance"] for p in per_policy]
    grpo = out["ratios"]["grpo"]
    assert grpo["variance_ratio_per_policy"] == pytest.approx(ratio)
    assert grpo["variance_ratio"] == pytest.approx(np.exp(np.mean(np.log(ratio))))
    assert grpo["variance_ratio_low"] < grpo["variance_ratio"] < grpo["variance_ratio_high"]
    assert "hae" not in out["ratios"]
    one = study_lib.aggregate_variance(per_policy[:1], "hae")["ratios"]["grpo"]
    assert one["snr_ratio_low"] == pytest.approx(one["snr_ratio"]) == pytest.approx(one["snr_ratio_high"])
    lines = "\n".join(study_lib.variance_markdown(dict(out, policies=[f"p{i}" for i in range(5)], episodes=8,
                                                       minibatches=4, rows=16, reference="hae", per_policy=[])))
    assert "| grpo | %.2f [" % grpo["variance_ratio"] in lines and "5 policies (p0, p1" in lines


def test_variance_policies_are_the_warm_start_and_finished_runs(tmp_path):
    config = study_config(word_config("unused", tmp_path), tmp_path, estimators=("hae", "grpo"), seeds=(0, 1, 2, 3))
    config.study.variance_policies = 3
    write_run(run_dir(config, "hae", 0), [(0, 0.25, {}), (100, 0.5, {})])
    write_run(run_dir(config, "hae", 1), [(0, 0.25, {}), (100, 0.5, {})], finished=False)
    write_run(run_dir(config, "hae", 2), [(0, 0.25, {}), (100, 0.5, {})])
    write_run(run_dir(config, "hae", 3), [(0, 0.25, {}), (100, 0.5, {})])
    policies = study_lib.variance_policies(config)
    assert [name for name, _ in policies] == ["warm start", "hae seed 0 final", "hae seed 2 final"]
    assert policies[0][1] is None and policies[2][1] == os.path.join(run_dir(config, "hae", 2), "checkpoints")
