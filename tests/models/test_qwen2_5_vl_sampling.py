"""The jitted Qwen2.5-VL sampler against transformers' generate and against a fresh forward pass
(fp32, CPU): greedy tokens, the log-probs PPO relies on, the patch buckets, bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_qwen2_5_vl import IMAGE, loaded_reference, pixel_values, sequence
from hiper_jax.agent.grammar import PAD as NO_ENTRY
from hiper_jax.models import qwen2_5_vl
from hiper_jax.models.qwen2_5_vl import sampling as vl_sampling
from hiper_jax.sampling import DecodeConstraint, SamplingConfig, pad_prompts

PAD = 0
NEW_TOKENS = 8
# Row 0: a 6x4-patch image (6 placeholders); row 1: an 8x12 one (24) after more text, so the
# rows have different image sizes and different left padding.
GRID = [(1, 6, 4), (1, 8, 12)]
PATCH_MULTIPLE = 32  # 24 + 96 = 120 patches -> a bucket of 128: 8 padding patches


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(HF model, our config, our params) through save_pretrained -> load_hf_checkpoint."""
    return loaded_reference(tmp_path_factory.mktemp("vl"))


def _batch():
    """Two left-padded rows (prompt length bucketed to 8), their patches and grid."""
    rows = [sequence([3, "image", 4], GRID[:1], seed=1),
            sequence([9, "image", 2], GRID[1:], seed=2)]
    tokens, mask = pad_prompts(rows, PAD, length_multiple=8)
    return tokens, mask, pixel_values(GRID, seed=3), GRID


def _hf_greedy(model, tokens, mask, pixels, grid, max_new_tokens):
    input_ids = torch.as_tensor(tokens, dtype=torch.long)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.as_tensor(mask),
                             pixel_values=torch.as_tensor(pixels),
                             image_grid_thw=torch.as_tensor(np.asarray(grid)),
                             mm_token_type_ids=(input_ids == IMAGE).int(),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                             pad_token_id=PAD)
    return out[:, tokens.shape[1]:].numpy()


def _fresh_logits(config, params, tokens, mask, out, pixels, grid):
    """Logits ``[B, N, V]`` that predict each generated token, from one non-cached forward pass
    over prompt + generated tokens (positions from rope_index over the whole sequence)."""
    sequence = np.concatenate([tokens, np.asarray(out.tokens)], axis=1)
    generated = np.arange(NEW_TOKENS)[None] < np.asarray(out.lengths)[:, None]
    full_mask = np.concatenate([mask, generated.astype(mask.dtype)], axis=1)
    logits = qwen2_5_vl.compute_logits(params, config, sequence, pixels, grid, full_mask)
    return np.asarray(logits)[:, tokens.shape[1] - 1:-1], generated


def _log_softmax(logits):
    """NumPy (so the checks add no compiles): ``[..., V]`` -> ``[..., V]``."""
    logits = np.asarray(logits, np.float64)
    top = logits.max(axis=-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))


def _chosen(logprobs, tokens):
    """``logprobs [..., V]`` at ``tokens [...]``."""
    return np.take_along_axis(logprobs, np.asarray(tokens)[..., None], axis=-1)[..., 0]


@pytest.mark.slow  # 4-5 s of CPU (a compile, transformers' generate): at the 5 s line
def test_greedy_one_image_equals_transformers(reference):
    model, config, params = reference
    grid = [(1, 4, 4)]
    tokens = np.array([sequence([5, "image", 7], grid, seed=4)])
    pixels = pixel_values(grid, seed=4)
    out = vl_sampling.generate(params, config, tokens, None, pixels, grid, jax.random.key(0),
                               SamplingConfig(max_new_tokens=NEW_TOKENS, greedy=True),
                               patch_multiple=16)
    expected = _hf_greedy(model, tokens, np.ones_like(tokens), pixels, grid, NEW_TOKENS)
    np.testing.assert_array_equal(np.asarray(out.tokens), expected)
    np.testing.assert_array_equal(out.lengths, [NEW_TOKENS])


@pytest.mark.slow  # 5-8 s of CPU (two compiles, transformers' generate)
def test_greedy_batch_of_left_padded_rows_equals_transformers(reference):
    model, config, params = reference
    tokens, mask, pixels, grid = _batch()
    assert mask[0, 0] == 0 and mask[1, 0] == 0 and mask[0].sum() != mask[1].sum()
    out = vl_sampling.generate(params, config, tokens, mask, pixels, grid, jax.random.key(0),
                               SamplingConfig(max_new_tokens=NEW_TOKENS, greedy=True,
                                              pad_token_id=PAD),
                               patch_multiple=PATCH_MULTIPLE)
    expected = _hf_greedy(model, tokens, mask, pixels, grid, NEW_TOKENS)
    np.testing.assert_array_equal(np.asarray(out.tokens), expected)
    # Greedy log-probs are the model's own log-softmax at the chosen tokens.
    logits, _ = _fresh_logits(config, params, tokens, mask, out, pixels, grid)
    np.testing.assert_allclose(np.asarray(out.logprobs), _chosen(_log_softmax(logits), expected),
                               atol=1e-4, rtol=0)


def test_sampled_logprobs_equal_a_fresh_forward(reference):
    """The exactness contract PPO relies on: each returned log-prob is the log-softmax at
    temperature of a non-cached forward over prompt + generated tokens; a stop token ends a
    row early."""
    _, config, params = reference
    tokens, mask, pixels, grid = _batch()
    temperature = 0.7
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=temperature,
                              stop_token_ids=(7, 11, 13), pad_token_id=PAD)
    out = vl_sampling.generate(params, config, tokens, mask, pixels, grid, jax.random.key(3),
                               sampling, patch_multiple=PATCH_MULTIPLE)
    logits, generated = _fresh_logits(config, params, tokens, mask, out, pixels, grid)
    expected = _chosen(_log_softmax(logits / temperature), out.tokens)
    np.testing.assert_allclose(np.asarray(out.logprobs)[generated], expected[generated],
                               atol=1e-4, rtol=0)
    assert np.all(np.asarray(out.logprobs)[~generated] == 0)
    assert np.all(np.asarray(out.tokens)[~generated] == PAD)
    # Not the greedy log-probs: sampling at temperature 0.7 was what got recorded.
    greedy = _chosen(_log_softmax(logits), out.tokens)
    assert np.max(np.abs(greedy[generated] - expected[generated])) > 1e-2


def test_constrained_decoding_runs_on_the_vl_model(reference):
    """The grammar constraint is the shared loop's: row 0 must write 20 then 21 or 22 then 2,
    row 1 is unconstrained; forced tokens get log-prob 0, the choice the renormalised one."""
    _, config, params = reference
    tokens, mask, pixels, grid = _batch()
    alternatives = np.full((2, 2, 3), NO_ENTRY, np.int32)
    alternatives[0] = [[20, 21, 2], [20, 22, 2]]
    constraint = DecodeConstraint(jnp.asarray(alternatives), jnp.ones((2,), jnp.int32),
                                  jnp.zeros((config.text.vocab_size,), bool))
    out = vl_sampling.generate(params, config, tokens, mask, pixels, grid, jax.random.key(1),
                               SamplingConfig(max_new_tokens=NEW_TOKENS, stop_token_ids=(2,),
                                              pad_token_id=PAD),
                               constraint, patch_multiple=PATCH_MULTIPLE)
    row = np.asarray(out.tokens)[0]
    assert row[0] == 20 and row[1] in (21, 22) and row[2] == 2 and out.lengths[0] == 3
    logprobs = np.asarray(out.logprobs)[0]
    assert logprobs[0] == 0 and logprobs[2] == 0
    logits, generated = _fresh_logits(config, params, tokens, mask, out, pixels, grid)
    choice = logits[0, 1, [21, 22]] - np.logaddexp(logits[0, 1, 21], logits[0, 1, 22])
    np.testing.assert_allclose(logprobs[1], choice[row[1] - 21], atol=1e-4)
    # The free row's log-probs are the plain softmax's.
    free = _chosen(_log_softmax(logits[1]), np.asarray(out.tokens)[1])
    np.testing.assert_allclose(np.asarray(out.logprobs)[1][generated[1]], free[generated[1]],
                               atol=1e-4, rtol=0)
    assert out.allowed.shape == (2, NEW_TOKENS, 4)


def test_patch_counts_in_one_bucket_share_one_program(reference):
    """Different image sizes and counts with the same bucketed patch count (and prompt length)
    reuse the compiled sampler."""
    _, config, params = reference
    sampling = SamplingConfig(max_new_tokens=2, greedy=True)
    runs = []
    for grid in ([(1, 4, 4)], [(1, 2, 4), (1, 2, 2)]):  # 16 and 8 + 4 patches -> 16
        pieces = [2] + ["image", 1] * len(grid)  # 9 and 11 tokens -> a prompt bucket of 16
        tokens, mask = pad_prompts([sequence(pieces, grid, seed=5)], PAD, length_multiple=16)
        prompt = vl_sampling.prepare_prompt(config, tokens, mask,
                                            pixel_values(grid, seed=5), grid, patch_multiple=16)
        assert prompt.pixel_values.shape == (16, config.vision.patch_dim)
        runs.append(prompt)
    vl_sampling.generate_from_prompt(params, config, runs[0], jax.random.key(0), sampling)
    compiled = vl_sampling.generate_from_prompt._cache_size()
    vl_sampling.generate_from_prompt(params, config, runs[1], jax.random.key(0), sampling)
    assert vl_sampling.generate_from_prompt._cache_size() == compiled


def test_patch_layout_padding_keeps_the_features(reference):
    _, config, params = reference
    grid = [(1, 6, 4), (1, 4, 4)]
    pixels = pixel_values(grid, seed=6)
    exact = np.asarray(qwen2_5_vl.vision_features(params["visual"], config.vision, pixels, grid))
    layout = qwen2_5_vl.vision.patch_layout(qwen2_5_vl.as_grid(grid), config.vision,
                                            num_patches=64)
    padded = np.concatenate([pixels, np.full((24, pixels.shape[1]), 3.0, np.float32)])
    module = qwen2_5_vl.vision.as_module(params["visual"], config.vision)
    ours = np.asarray(jax.jit(module.run)(padded, layout))
    assert ours.shape == (16, 32) and np.all(np.isfinite(ours))
    np.testing.assert_allclose(ours[:10], exact, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="multiple of merge_unit"):
        qwen2_5_vl.vision.patch_layout(qwen2_5_vl.as_grid(grid), config.vision, num_patches=38)


def test_bad_inputs_are_refused_with_a_message(reference):
    _, config, params = reference
    tokens, mask, pixels, grid = _batch()
    sampling = SamplingConfig(max_new_tokens=2)
    key = jax.random.key(0)

    def run(t=tokens, m=mask, p=pixels, g=grid, **kwargs):
        vl_sampling.generate(params, config, t, m, p, g, key, sampling, **kwargs)

    with pytest.raises(ValueError, match=r"pixel_values has shape \(112, 24\); image_grid_thw"):
        run(p=pixels[:112])
    with pytest.raises(ValueError, match="together"):
        run(g=None)
    with pytest.raises(qwen2_5_vl.UnsupportedInputError, match="needs a run of exactly 16"):
        run(g=[(1, 6, 4), (1, 8, 8)], p=pixel_values([(1, 6, 4), (1, 8, 8)]))
    with pytest.raises(qwen2_5_vl.UnsupportedInputError, match="more image placeholder runs"):
        run(g=grid[:1], p=pixels[:24])
    inside_padding = tokens.copy()
    inside_padding[0, 0] = IMAGE
    with pytest.raises(qwen2_5_vl.UnsupportedInputError, match="31 image placeholders"):
        run(t=inside_padding)
    with pytest.raises(ValueError, match="patch_multiple=6"):
        run(patch_multiple=6)
    with pytest.raises(ValueError, match=r"prompt_mask has shape \(2, 39\)"):
        run(m=mask[:, 1:])
