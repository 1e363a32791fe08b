"""The tiny vision-language run end to end on a little data: warm start, one PPO iteration with
HAE on MedVista rollouts (the batch's log-probs the sampler's), held-out evaluation with and
without tools."""

import json

import pytest

from hiper_jax.experiments import medvista_vlm


@pytest.mark.slow  # ~2 min on a 2-core CPU
def test_medvista_vlm_run_end_to_end(tmp_path):
    cfg = medvista_vlm.RunConfig(images=10, sft_epochs=2, iterations=1, envs=4, eval_questions=4)
    summary = medvista_vlm.run(str(tmp_path), cfg)
    assert summary["sft_nll_last"] < summary["sft_nll_first"]
    assert summary["rl"][0]["logp_mismatch_max"] < 1e-3
    for stage in ("warm_start", "after_rl"):
        assert summary[stage]["no_tools"]["tool_calls"] == 0
        assert summary[stage]["tools"]["episodes"] == summary[stage]["no_tools"]["episodes"] > 0
    assert json.load(open(tmp_path / "summary.json"))["config"]["images"] == 10
