"""The estimator study: summary statistics, gradient-variance arithmetic, and a small study on
the ChooseWord task that runs, writes its table and plots, and skips finished runs when rerun."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from hiper_jax import study as study_lib
from hiper_jax.study import base_study, minibatch_gradient_stats, run_dir, run_study, summarize
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
    return ml_collections.ConfigDict({"run": run, "study": study})


def write_run(directory, evals, finished=True):
    """A fake run: ``evals`` = [(env turns before the eval, success, per-type success)]."""
    os.makedirs(directory, exist_ok=True)
    records, turns = [], 0.0
    for k, (at, success, per_type) in enumerate(evals[:-1] if finished else evals):
        record = {"iteration": k, "eval/success": success, "eval/mean_turns": 10.0 + k,
                  "eval/invalid_rate": 0.5, "eval/switch_rate": 0.2, "eval/mean_segment_turns": 3.0,
                  "eval/episodes": 8.0, "train/success": 0.0, "env_turns": at - turns,
                  "env_turns_total": at + 100.0}
        record.update({f"eval/success/{t}": v for t, v in per_type.items()})
        records.append(record)
        turns = at
    if finished:
        at, success, per_type = evals[-1]
        final = {"iteration": len(evals) - 1, "final": 1.0, "env_turns_total": at, "eval/success": success,
                 "eval/mean_turns": 7.0, "eval/invalid_rate": 0.25, "eval/switch_rate": 0.1,
                 "eval/mean_segment_turns": 2.0, "eval/episodes": 8.0}
        final.update({f"eval/success/{t}": v for t, v in per_type.items()})
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
        "eval_success_vs_env_turns.png", "success_per_task_type.png"}
    assert json.load(open(tmp_path / "summary.json"))["results"]["hae"][0]["seed"] == 0


def test_minibatch_gradient_variance_matches_explicit_computation():
    from hiper_jax.models import qwen2
    from hiper_jax.tiny import tiny_model_config
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
    for stats in variance["estimators"].values():
        assert np.isfinite(stats["total_variance"]) and stats["total_variance"] > 0
    assert "| hae | 1 |" in summary["table"] and "SNR" in summary["table"]
    assert all(os.path.exists(p) for p in summary["plots"])

    metrics = os.path.join(run_dir(config, "hae", 0), "metrics.jsonl")
    before = open(metrics).read()
    capsys.readouterr()
    again = run_study(config, progress=False)
    assert "hae seed 0: finished earlier, skipped" in capsys.readouterr().out
    assert open(metrics).read() == before
    assert again["table"] == summary["table"]
