"""VLMPolicy: a tiny random Qwen2.5-VL plays MedVista through the collector, with its images in
every prompt; the log-prob the sampler recorded for each token is the one the scoring pass gives
the same turn (its images re-made from the record), unconstrained and grammar-constrained."""

import dataclasses

import jax
import numpy as np
import pytest

from hiper_jax.agent.grammar import ResponseGrammar
from hiper_jax.agent.spans import TokenBytes
from hiper_jax.models import qwen2
from hiper_jax.models.qwen2_5_vl import scoring
from hiper_jax.rollout.collector import Collector
from hiper_jax.rollout.images import ImagePrompt, ImagePrompter, turn_sequence
from hiper_jax.rollout.vlm_policy import VLMPolicy
from hiper_jax.sampling import SamplingConfig
from tests.rollout import vl_fixtures


@pytest.fixture(scope="module")
def vl():
    tok = vl_fixtures.tokenizer()
    config, params = vl_fixtures.model(tok)
    return tok, config, params


@pytest.fixture(scope="module")
def medvista_dir(tmp_path_factory):
    from hiper_envs.medvista import synth

    root = tmp_path_factory.mktemp("medvista_vlm") / "data"
    synth.generate(str(root), synth.SynthConfig(num_images=6, seed=2), progress=False)
    return str(root)


def _scored(params, config, turns, text_mask=None):
    """Per turn, the scoring pass's log-probs of its response tokens (one turn per row)."""
    sequences = [turn_sequence(turn, config.vision) for turn in turns]
    inputs = scoring.prepare_rows(config, [[s] for s in sequences], length_multiple=32,
                                  patch_multiple=64)
    rows = scoring.scoring_rows(params, config, inputs)
    allowed = None
    if text_mask is not None:
        n, length = inputs.tokens.shape
        width = max(turn.allowed_ids.shape[1] for turn in turns)
        mode = np.zeros((n, length), np.int8)
        ids = np.full((n, length, width), -1, np.int32)
        for i, turn in enumerate(turns):
            p, r = len(turn.prompt_ids), len(turn.response_ids)
            mode[i, p:p + r] = turn.allowed_mode
            ids[i, p:p + r, : turn.allowed_ids.shape[1]] = turn.allowed_ids
        allowed = qwen2.AllowedTokens(mode, ids, text_mask)
    logp, _, _ = scoring.token_stats(params, config, rows, temperature=1.0, allowed=allowed)
    logp = np.asarray(logp)
    return [logp[i, len(t.prompt_ids): len(t.prompt_ids) + len(t.response_ids)]
            for i, t in enumerate(turns)]


@pytest.mark.slow  # ~40 s: two rollouts and their scoring passes compile on a 2-core CPU
@pytest.mark.parametrize("constrained", [False, True])
def test_vlm_policy_plays_medvista_with_exact_logprobs(vl, medvista_dir, constrained):
    tok, config, params = vl
    spec, prompt_cfg = vl_fixtures.medvista(medvista_dir, info_images="all", max_turns=3)
    token_bytes = TokenBytes(tok)
    grammar = (ResponseGrammar(tok, token_bytes, "plan_execute", tok.eos_token_id, max_text_tokens=4)
               if constrained else None)
    sampling = SamplingConfig(max_new_tokens=40 if constrained else 12, temperature=1.0,
                              stop_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id)
    policy = VLMPolicy(params, config, sampling, tok.pad_token_id, length_multiple=32,
                       grammar=grammar, patch_multiple=64)
    with Collector(spec, 3, prompt_cfg, tok, token_bytes, max_turns=3, groups=1,
                   envs_per_worker=3, prompter=ImagePrompter(config, tok)) as collector:
        trajectories, _ = collector.run(policy, [0, 1, 2], jax.random.key(3))
    turns = [turn for traj in trajectories for turn in traj.turns]
    assert len(trajectories) == 3 and turns
    for traj in trajectories:
        for t, turn in enumerate(traj.turns):
            assert len(turn.images) >= 1 and turn.image_grid.shape == (len(turn.images), 3)
            assert np.sum(turn.prompt_ids == config.image_token_id) == 16 * len(turn.images)
            assert len(turn.response_ids) >= 1
    if constrained:
        # The grammar keeps every response well formed and every action admissible.
        assert all(turn.format_valid and not turn.invalid for turn in turns)
        assert all(turn.allowed_mode is not None for turn in turns)
    scored = _scored(params, config, turns, grammar.text_mask if constrained else None)
    for turn, logp in zip(turns, scored):
        np.testing.assert_allclose(logp, turn.response_logp, atol=2e-4, rtol=0)
    # Images matter: scoring the same turns with blank images changes the log-probs.
    blank = [dataclasses.replace(turn, images=tuple(np.zeros_like(im) for im in turn.images))
             for turn in turns]
    changed = _scored(params, config, blank, grammar.text_mask if constrained else None)
    assert max(np.max(np.abs(a - b)) for a, b in zip(changed, scored)) > 1e-3


def test_vlm_policy_refuses_bad_input(vl):
    tok, config, params = vl
    sampling = SamplingConfig(max_new_tokens=2)
    with pytest.raises(ValueError, match="vision token"):
        VLMPolicy(params, config, sampling, config.image_token_id)
    with pytest.raises(ValueError, match="multiple of merge_unit"):
        VLMPolicy(params, config, sampling, 0, patch_multiple=3)
    policy = VLMPolicy(params, config, sampling, 0, rows=1)
    with pytest.raises(ValueError, match="at least one prompt"):
        policy.dispatch([], [], jax.random.key(0))
    with pytest.raises(ValueError, match="ImagePrompt"):
        policy.dispatch([[1, 2, 3]], [None], jax.random.key(0))
    prompt = ImagePrompt([1, 2], (), np.zeros((0, 3), np.int64))
    with pytest.raises(ValueError, match="do not fit rows=1"):
        policy.dispatch([prompt, prompt], [None, None], jax.random.key(0))
