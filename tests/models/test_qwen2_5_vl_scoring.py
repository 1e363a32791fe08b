"""The Qwen2.5-VL scoring pass (packed turns with images -> token log-probs) against transformers'
logits of each turn on its own, and against the log-probs the jitted sampler recorded (fp32, CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_qwen2_5_vl import hf_logits, loaded_reference, pixel_values, sequence
from hiper_jax.models import qwen2_5_vl
from hiper_jax.models.qwen2_5_vl import sampling as vl_sampling
from hiper_jax.models.qwen2_5_vl import scoring
from hiper_jax.sampling import SamplingConfig, pad_prompts


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return loaded_reference(tmp_path_factory.mktemp("vl_scoring"))


def _log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    top = logits.max(axis=-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))


def _turn(pieces, grid, seed):
    pixels = pixel_values(grid, seed=seed) if grid else None
    return scoring.VisionSequence(sequence(pieces, grid, seed=seed), pixels, grid)


def _hf_token_logprobs(model, turn):
    """``[n - 1]`` log p(token t | tokens < t), t = 1..n-1, of one turn alone in transformers."""
    tokens = np.asarray(turn.tokens)[None]
    grid = list(turn.grid) or None
    logits = hf_logits(model, tokens, turn.pixel_values, grid)[0]
    return np.take_along_axis(_log_softmax(logits[:-1]), tokens[0, 1:, None], axis=-1)[:, 0], logits


def test_packed_turns_score_as_transformers_scores_each_alone(reference):
    """Row 0: a turn with one 6x4-patch image, then a text-only turn; row 1: a turn with two
    images of different sizes; row 2: padding. Every scored token's log-prob (and entropy)
    equals transformers' on that turn alone, so packing, per-row features and per-turn
    positions are exact."""
    model, config, params = reference
    turns = [_turn([3, "image", 5], [(1, 6, 4)], seed=1),
             _turn([7], [], seed=2),
             _turn([2, "image", 3, "image", 4], [(1, 4, 4), (1, 8, 12)], seed=3)]
    inputs = scoring.prepare_rows(config, [turns[:2], turns[2:]], length_multiple=16,
                                  feature_multiple=8, patch_multiple=32, num_rows=3)
    assert inputs.tokens.shape[0] == 3 and inputs.tokens.shape[1] % 16 == 0
    assert inputs.feature_index.shape[1] == 32  # row 1: 4 + 24 placeholders -> 32
    rows = scoring.scoring_rows(params, config, inputs)
    logp, entropy, _ = scoring.token_stats(params, config, rows)
    logp, entropy = np.asarray(logp), np.asarray(entropy)
    spans = [(0, 0), (0, len(turns[0].tokens)), (1, 0)]
    for turn, (row, start) in zip(turns, spans):
        expected, logits = _hf_token_logprobs(model, turn)
        n = len(turn.tokens)
        np.testing.assert_allclose(logp[row, start + 1:start + n], expected, atol=1e-4, rtol=1e-4)
        probs = np.exp(_log_softmax(logits[:-1]))
        hf_entropy = -(probs * np.log(probs)).sum(-1)
        np.testing.assert_allclose(entropy[row, start + 1:start + n], hf_entropy, atol=1e-4, rtol=1e-4)
    assert np.all(np.asarray(inputs.segments)[2] == 0)
    # Only the placeholders read the features: a row's log-probs move when its image changes.
    changed = inputs._replace(pixel_values=inputs.pixel_values + 1.0)
    moved = np.asarray(scoring.logprob_pass(params, config, scoring.scoring_rows(params, config, changed)))
    text_only = slice(len(turns[0].tokens) + 1, len(turns[0].tokens) + len(turns[1].tokens))
    np.testing.assert_allclose(moved[0, text_only], logp[0, text_only], atol=1e-6)
    assert np.max(np.abs(moved[1, 1:len(turns[2].tokens)] - logp[1, 1:len(turns[2].tokens)])) > 1e-3


@pytest.mark.slow  # ~6.5 s on a loaded 2-core CPU (the sampler's compile)
def test_scoring_reproduces_the_samplers_logprobs(reference):
    """Two prompts with images sampled at temperature 0.7; each prompt + its response scored as
    one turn, both packed into one row: the scored log-probs of the generated tokens are the
    ones the sampler recorded (what ``ppo.old_logp="sampler"`` relies on)."""
    _, config, params = reference
    grid = [(1, 6, 4), (1, 8, 12)]
    prompts = [sequence([3, "image", 4], grid[:1], seed=1), sequence([9, "image", 2], grid[1:], seed=2)]
    pixels = pixel_values(grid, seed=3)
    tokens, mask = pad_prompts(prompts, 0, length_multiple=8)
    temperature, new = 0.7, 6
    out = vl_sampling.generate(params, config, tokens, mask, pixels, grid, jax.random.key(3),
                               SamplingConfig(max_new_tokens=new, temperature=temperature),
                               patch_multiple=32)
    generated = np.asarray(out.tokens)
    split = [pixels[:24], pixels[24:]]
    turns = [scoring.VisionSequence(prompts[i] + generated[i].tolist(), split[i], grid[i:i + 1])
             for i in range(2)]
    inputs = scoring.prepare_rows(config, [turns], length_multiple=16, patch_multiple=32)
    rows = scoring.scoring_rows(params, config, inputs)
    logp = np.asarray(scoring.logprob_pass(params, config, rows, temperature=temperature))
    start = 0
    for i in range(2):
        first = start + len(prompts[i])
        np.testing.assert_allclose(logp[0, first:first + new], np.asarray(out.logprobs)[i],
                                   atol=1e-4, rtol=1e-4)
        start += len(turns[i].tokens)


@pytest.mark.slow  # ~7 s on a loaded 2-core CPU (a backward compile)
def test_language_model_gradients_flow_and_the_tower_is_not_read(reference):
    """The PPO-side gradient of the scored log-probs reaches the language model; the vision
    tower's parameters are not inputs of the pass (its features are), so a frozen tower costs
    no backward pass."""
    _, config, params = reference
    turn = _turn([3, "image", 5], [(1, 4, 4)], seed=4)
    rows = scoring.scoring_rows(params, config, scoring.prepare_rows(config, [[turn]], patch_multiple=16))

    def loss(text):
        logp, _, _ = scoring.token_stats({"language_model": text, "visual": None}, config, rows)
        return jnp.sum(logp)

    grads = jax.grad(loss)(params["language_model"])
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and max(norms) > 0


def test_bad_turns_are_refused_with_a_message(reference):
    _, config, _ = reference
    good = _turn([3, "image", 5], [(1, 4, 4)], seed=5)
    with pytest.raises(qwen2_5_vl.UnsupportedInputError, match="sequence 1 holds 4 image placeholders"):
        scoring.prepare_rows(config, [[good], [good._replace(grid=[(1, 8, 8)],
                                                             pixel_values=pixel_values([(1, 8, 8)]))]])
    with pytest.raises(ValueError, match="pixel_values and grid together"):
        scoring.prepare_rows(config, [[good._replace(pixel_values=None)]])
    with pytest.raises(ValueError, match="pixel_values has shape"):
        scoring.prepare_rows(config, [[good._replace(pixel_values=pixel_values([(1, 2, 2)]))]])
    with pytest.raises(ValueError, match="row 1 holds no sequence"):
        scoring.prepare_rows(config, [[good], []])
    with pytest.raises(ValueError, match="num_rows"):
        scoring.prepare_rows(config, [[good], [good]], num_rows=1)
