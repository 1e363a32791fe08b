"""The JAX Qwen2.5-VL port against transformers' Qwen2_5_VLForConditionalGeneration (fp32, CPU,
eager attention): the vision tower alone, the 3-D positions, and the logits of text+image
sequences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_qwen2_5_vl import (IMAGE, VIDEO, hf_logits, hf_rope_index, hf_vision, loaded_reference,
                           pixel_values, sequence)
from hiper_jax.models import qwen2, qwen2_5_vl

TOLERANCE = 1e-4
# Images of different shapes: an 8x12-patch image (2x3 full windows), a 6x4 one (a partial
# window row), a 4x4 one (one window).
GRID_A, GRID_B, GRID_C = (1, 8, 12), (1, 6, 4), (1, 4, 4)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(HF model, our config, our params) through save_pretrained -> load_hf_checkpoint."""
    return loaded_reference(tmp_path_factory.mktemp("vl"))


def test_vision_tower_matches_transformers(reference):
    model, config, params = reference
    # Two images plus a two-frame input: windows, partial windows and per-frame attention.
    grid = [GRID_A, GRID_B, (2, 4, 4)]
    pixels = pixel_values(grid, seed=1)
    expected = hf_vision(model, pixels, grid)
    ours = np.asarray(qwen2_5_vl.vision_features(params["visual"], config.vision, pixels, grid))
    assert ours.shape == (24 + 6 + 8, 32)
    assert expected.std() > 0.5
    np.testing.assert_allclose(ours, expected, atol=TOLERANCE, rtol=0)
    pieces = qwen2_5_vl.split_features(jnp.asarray(ours), grid, config.vision)
    assert [p.shape[0] for p in pieces] == [24, 6, 8]


def test_window_layout_is_a_permutation_of_whole_merge_units(reference):
    _, config, _ = reference
    grid = ((1, 8, 12), (1, 6, 4))
    index, windows, frames = qwen2_5_vl.window_layout(grid, config.vision)
    np.testing.assert_array_equal(np.sort(index), np.arange(30))
    # 6 full windows of 4 units in image A; image B's 3x2 units: one window of 4, one of 2.
    sizes = np.bincount(windows) // config.vision.merge_unit
    assert sizes.tolist() == [4] * 6 + [4, 2]
    assert np.bincount(frames).tolist() == [96, 24]


def test_one_image_logits_match_transformers(reference):
    model, config, params = reference
    grid = [GRID_A]
    tokens = np.array([sequence([5, "image", 7], grid, seed=2)])
    pixels = pixel_values(grid, seed=2)
    expected = hf_logits(model, tokens, pixels, grid)
    ours = np.asarray(qwen2_5_vl.compute_logits(params, config, tokens, pixels, grid))
    assert ours.shape == tokens.shape + (151,)
    assert expected.std() > 0.5
    np.testing.assert_allclose(ours, expected, atol=TOLERANCE, rtol=0)


def test_several_images_of_different_sizes_match_transformers(reference):
    model, config, params = reference
    grid = [GRID_A, GRID_B, GRID_C]  # two in the first row, one in the second
    rows = [sequence([5, "image", 4, "image", 3], grid[:2], seed=3),
            sequence([3, "image", 37], grid[2:], seed=4)]
    tokens = np.array(rows)
    pixels = pixel_values(grid, seed=3)
    positions, deltas = qwen2_5_vl.rope_index(config, tokens, grid)
    hf_positions, hf_deltas = hf_rope_index(model, tokens, grid)
    np.testing.assert_array_equal(positions, hf_positions)
    np.testing.assert_array_equal(deltas, hf_deltas)
    expected = hf_logits(model, tokens, pixels, grid)
    ours = np.asarray(qwen2_5_vl.compute_logits(params, config, tokens, pixels, grid))
    np.testing.assert_allclose(ours, expected, atol=TOLERANCE, rtol=0)


def test_text_only_logits_match_transformers(reference):
    model, config, params = reference
    tokens = np.array([sequence([12], [], seed=5), sequence([12], [], seed=6)])
    expected = hf_logits(model, tokens)
    np.testing.assert_allclose(np.asarray(qwen2_5_vl.compute_logits(params, config, tokens)),
                               expected, atol=TOLERANCE, rtol=0)


def test_left_padded_rows_match_transformers(reference):
    model, config, params = reference
    grid = [GRID_B, GRID_C]
    first = sequence([4, "image", 6], grid[:1], seed=7)
    second = sequence([2, "image", 3], grid[1:], seed=8)
    length = max(len(first), len(second))
    tokens = np.zeros((2, length), np.int64)
    mask = np.zeros((2, length), np.int64)
    for row, ids in enumerate((first, second)):
        tokens[row, length - len(ids):] = ids
        mask[row, length - len(ids):] = 1
    positions, deltas = qwen2_5_vl.rope_index(config, tokens, grid, attention_mask=mask)
    hf_positions, hf_deltas = hf_rope_index(model, tokens, grid, attention_mask=mask)
    np.testing.assert_array_equal(positions, hf_positions)
    np.testing.assert_array_equal(deltas, hf_deltas)
    pixels = pixel_values(grid, seed=9)
    expected = hf_logits(model, tokens, pixels, grid, attention_mask=mask)
    ours = np.asarray(qwen2_5_vl.compute_logits(params, config, tokens, pixels, grid,
                                                attention_mask=mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], expected[real], atol=TOLERANCE, rtol=0)


@pytest.mark.slow
def test_cached_decoding_after_an_image_equals_the_full_forward(reference):
    _, config, params = reference
    grid = [GRID_B]
    tokens = np.array([sequence([3, "image", 6], grid, seed=10)])
    pixels = pixel_values(grid, seed=10)
    full = np.asarray(qwen2_5_vl.compute_logits(params, config, tokens, pixels, grid))
    prompt = 3 + 8  # text, then <vision_start> + 6 placeholders + <vision_end>
    positions, deltas = qwen2_5_vl.rope_index(config, tokens[:, :prompt], grid)
    features = qwen2_5_vl.vision_features(params["visual"], config.vision, pixels, grid)
    cache = qwen2.init_cache(config.text, batch_size=1, max_length=tokens.shape[1])
    hidden, cache = qwen2_5_vl.forward(params, config, jnp.asarray(tokens[:, :prompt]),
                                       jnp.asarray(positions), image_features=features,
                                       cache=cache)
    steps = [qwen2.lm_head(params["language_model"], config.text, hidden)]
    for t in range(prompt, tokens.shape[1]):
        step_positions = qwen2_5_vl.text_positions(jnp.ones((1, 1), jnp.int32), cache) + deltas
        hidden, cache = qwen2_5_vl.forward(params, config, jnp.asarray(tokens[:, t:t + 1]),
                                           step_positions, cache=cache)
        steps.append(qwen2.lm_head(params["language_model"], config.text, hidden))
    stepwise = np.concatenate([np.asarray(s) for s in steps], axis=1)
    np.testing.assert_allclose(stepwise, full, atol=TOLERANCE, rtol=0)


def test_video_tokens_and_mismatched_placeholders_are_refused(reference):
    _, config, params = reference
    grid = [GRID_C]
    pixels = pixel_values(grid)
    video = np.array([sequence([3], [], seed=1) + [VIDEO] * 4])
    with pytest.raises(qwen2_5_vl.UnsupportedInputError, match="video"):
        qwen2_5_vl.compute_logits(params, config, video)
    short = np.array([sequence([3], [], seed=1) + [IMAGE] * 3 + [5]])
    with pytest.raises(qwen2_5_vl.UnsupportedInputError, match="exactly 4"):
        qwen2_5_vl.compute_logits(params, config, short, pixels, grid)
    two_runs = np.array([[IMAGE] * 4 + [5] + [IMAGE] * 4])
    with pytest.raises(qwen2_5_vl.UnsupportedInputError, match="more image placeholder runs"):
        qwen2_5_vl.rope_index(config, two_runs, grid)
    with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
        qwen2_5_vl.vision_features(params["visual"], config.vision, pixel_values([(1, 3, 4)]),
                                   [(1, 3, 4)])


def test_module_agrees_with_the_specs_and_the_pure_functions(reference):
    model, config, params = reference
    shapes = jax.tree.map(lambda x: x.shape, params)
    specs = qwen2_5_vl.param_specs(config)
    assert shapes == jax.tree.map(lambda s: s.shape, specs,
                                  is_leaf=lambda x: isinstance(x, qwen2.ParamSpec))
    assert qwen2_5_vl.count_params(config) == sum(p.numel() for p in model.parameters())
    # The NNX module over the tree gives the pure functions' logits (jitted: an eager call
    # would compile op by op).
    grid = [GRID_C]
    tokens = np.array([sequence([2, "image", 3], grid, seed=11)])
    pixels = pixel_values(grid, seed=11)
    positions, _ = qwen2_5_vl.rope_index(config, tokens, grid)

    @jax.jit
    def module_logits(p):
        return qwen2_5_vl.as_module(p, config)(jnp.asarray(tokens), jnp.asarray(positions),
                                                pixel_values=jnp.asarray(pixels),
                                                grid=qwen2_5_vl.as_grid(grid))

    np.testing.assert_allclose(module_logits(params), qwen2_5_vl.compute_logits(
        params, config, tokens, pixels, grid), atol=1e-5)
    module = qwen2_5_vl.as_module(params, config)
    assert isinstance(module.language_model, qwen2.Qwen2ForCausalLM)
    jax.tree.map(np.testing.assert_array_equal, qwen2_5_vl.module_params(module), params)


def test_bfloat16_compute_stays_close_to_float32(reference):
    _, config, params = reference
    grid = [GRID_C]
    tokens = np.array([sequence([3, "image", 4], grid, seed=12)])
    pixels = pixel_values(grid, seed=12)
    exact = qwen2_5_vl.compute_logits(params, config, tokens, pixels, grid)
    low = qwen2_5_vl.compute_logits(params, config.with_dtypes(compute_dtype="bfloat16"), tokens,
                                    pixels, grid)
    assert low.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(low - exact))) < 0.05 * float(jnp.max(jnp.abs(exact)))
    assert float(jnp.mean(jnp.argmax(low, -1) == jnp.argmax(exact, -1))) > 0.8


@pytest.mark.slow  # the jitted random init compiles slowly on CPU (as Qwen2's does)
def test_init_params_build_the_loaded_tree(reference):
    _, config, params = reference
    fresh = qwen2_5_vl.init_params(jax.random.key(0), config)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), fresh) == \
        jax.tree.map(lambda x: (x.shape, x.dtype), params)
    assert float(jnp.std(fresh["visual"]["blocks"]["attn"]["qkv"]["kernel"])) > 0
