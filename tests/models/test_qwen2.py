"""The JAX Qwen2 port against transformers' PyTorch Qwen2 (fp32, CPU)."""

import jax
from flax import nnx
import jax.numpy as jnp
import numpy as np
import pytest

from hf_qwen2 import TINY_CONFIGS, hf_logits, make_hf_model, save_hf_model
from hiper_jax.models import qwen2

TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def reference(request, tmp_path_factory):
    """(HF model, our config, our params) for one tiny config, through save_pretrained."""
    model = make_hf_model(request.param)
    path = save_hf_model(model, tmp_path_factory.mktemp(request.param))
    config, params = qwen2.load_hf_checkpoint(path, progress=False)
    return model, config, params


@pytest.fixture(scope="module")
def gqa7_reference(tmp_path_factory):
    """One untied GQA-7 model, for the tests that do not depend on the configuration."""
    model = make_hf_model("gqa7-untied-theta1e4", seed=5)
    config, params = qwen2.load_hf_checkpoint(save_hf_model(model, tmp_path_factory.mktemp("one")),
                                              progress=False)
    return model, config, params


def _random_tokens(vocab_size, shape, seed=0):
    return np.random.default_rng(seed).integers(0, vocab_size, shape).astype(np.int32)


def test_logits_match_transformers(reference):
    model, config, params = reference
    tokens = _random_tokens(config.vocab_size, (2, 13))
    expected = hf_logits(model, tokens)
    ours = np.asarray(qwen2.compute_logits(params, config, jnp.asarray(tokens)))
    assert ours.shape == (2, 13, config.vocab_size)
    assert expected.std() > 0.5, "reference logits too flat to catch mapping errors"
    np.testing.assert_allclose(ours, expected, atol=TOLERANCE, rtol=0)
    # The same through the NNX module itself, called eagerly.
    module = qwen2.as_module(params, config)
    hidden, _ = module(jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(module.logits(hidden)), expected, atol=TOLERANCE,
                               rtol=0)


def test_left_padded_batch_matches_transformers(reference):
    model, config, params = reference
    tokens = _random_tokens(config.vocab_size, (3, 10), seed=1)
    mask = np.ones_like(tokens)
    mask[0, :4] = 0
    mask[2, :9] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    expected = hf_logits(model, tokens, mask, positions)
    ours = np.asarray(qwen2.compute_logits(params, config, jnp.asarray(tokens),
                                           segment_ids=jnp.asarray(mask)))
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], expected[real], atol=TOLERANCE, rtol=0)
    np.testing.assert_array_equal(
        np.asarray(qwen2.positions_from_segments(jnp.asarray(mask)))[real], positions[real])


def test_packed_row_equals_separate_sequences(gqa7_reference):
    _, config, params = gqa7_reference
    first = _random_tokens(config.vocab_size, (1, 6), seed=2)
    second = _random_tokens(config.vocab_size, (1, 5), seed=3)
    packed = np.concatenate([first, second, np.zeros((1, 2), np.int32)], axis=1)
    segments = np.array([[1] * 6 + [2] * 5 + [0] * 2])
    logits = np.asarray(qwen2.compute_logits(params, config, jnp.asarray(packed),
                                             segment_ids=jnp.asarray(segments)))
    alone = [np.asarray(qwen2.compute_logits(params, config, jnp.asarray(x)))
             for x in (first, second)]
    np.testing.assert_allclose(logits[:, :6], alone[0], atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(logits[:, 6:11], alone[1], atol=TOLERANCE, rtol=0)


def test_cached_decoding_equals_full_forward_at_every_step(reference):
    _, config, params = reference
    tokens = jnp.asarray(_random_tokens(config.vocab_size, (2, 12), seed=4))
    mask = jnp.ones_like(tokens).at[1, :3].set(0)
    full = qwen2.lm_head(params, config, qwen2.forward(params, config, tokens, segment_ids=mask)[0])
    prompt = 5
    cache = qwen2.init_cache(config, batch_size=2, max_length=12)
    hidden, cache = qwen2.forward(params, config, tokens[:, :prompt], segment_ids=mask[:, :prompt],
                                  cache=cache)
    stepwise = [qwen2.lm_head(params, config, hidden)]
    for t in range(prompt, 12):
        hidden, cache = qwen2.forward(params, config, tokens[:, t:t + 1],
                                      segment_ids=mask[:, t:t + 1], cache=cache)
        stepwise.append(qwen2.lm_head(params, config, hidden))
    stepwise = np.concatenate([np.asarray(x) for x in stepwise], axis=1)
    real = np.asarray(mask).astype(bool)
    np.testing.assert_allclose(stepwise[real], np.asarray(full)[real], atol=TOLERANCE, rtol=0)
    assert int(cache.index) == 12


def test_token_logprobs_and_entropy_match_full_softmax(gqa7_reference):
    _, config, params = gqa7_reference
    tokens = jnp.asarray(_random_tokens(config.vocab_size, (2, 11), seed=5))
    targets = jnp.roll(tokens, -1, axis=1)
    hidden, _ = qwen2.forward(params, config, tokens)
    log_probs = jax.nn.log_softmax(qwen2.lm_head(params, config, hidden) / 0.7, axis=-1)
    expected_lp = jnp.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    expected_ent = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
    stats = qwen2.token_logprobs(params, config, hidden, targets, temperature=0.7, chunk_size=4)
    np.testing.assert_allclose(stats.logprobs, expected_lp, atol=1e-5, rtol=0)
    np.testing.assert_allclose(stats.entropy, expected_ent, atol=1e-5, rtol=0)


SMALL = qwen2.Qwen2Config(vocab_size=61, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                          num_attention_heads=6, num_key_value_heads=2, initializer_range=0.3)


def test_chunked_logprob_gradients_equal_full_softmax_gradients():
    config, params = SMALL, qwen2.init_params(jax.random.key(0), SMALL)
    tokens = jnp.asarray(_random_tokens(config.vocab_size, (2, 11), seed=5))
    targets = jnp.roll(tokens, -1, axis=1)

    def chunked_loss(p):
        h, _ = qwen2.forward(p, config, tokens, remat=True)
        stats = qwen2.token_logprobs(p, config, h, targets, chunk_size=4)
        return jnp.sum(stats.logprobs) + 0.1 * jnp.sum(stats.entropy)

    def full_loss(p):
        h, _ = qwen2.forward(p, config, tokens)
        lp = jax.nn.log_softmax(qwen2.lm_head(p, config, h), axis=-1)
        ent = -jnp.sum(jnp.exp(lp) * lp, axis=-1)
        return jnp.sum(jnp.take_along_axis(lp, targets[..., None], -1)) + 0.1 * jnp.sum(ent)

    grads = jax.grad(chunked_loss)(params)
    expected_grads = jax.grad(full_loss)(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4),
                 grads, expected_grads)


def test_unstacked_layers_give_the_same_model():
    config, params = SMALL, qwen2.init_params(jax.random.key(1), SMALL)
    unstacked = qwen2.unstack_layers(params)
    assert isinstance(unstacked["layers"], list) and len(unstacked["layers"]) == 2
    assert jax.tree.map(lambda x: x.shape, unstacked) == qwen2.param_shapes(config, stacked=False)
    tokens = jnp.asarray(_random_tokens(config.vocab_size, (2, 9), seed=7))
    np.testing.assert_allclose(qwen2.compute_logits(unstacked, config, tokens),
                               qwen2.compute_logits(params, config, tokens), atol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, qwen2.stack_layers(unstacked), params)
    assert all(x.dtype == jnp.bfloat16
               for x in jax.tree.leaves(qwen2.unstack_layers(params, dtype=jnp.bfloat16)))


@pytest.mark.parametrize("unroll", [2, 3])
def test_unrolled_layer_scan_gives_the_same_values_and_gradients(unroll):
    # 3 layers: unroll 2 leaves a remainder step, 3 unrolls them all.
    config = SMALL.replace(num_hidden_layers=3)
    params = qwen2.init_params(jax.random.key(2), config)
    tokens = jnp.asarray(_random_tokens(config.vocab_size, (2, 9), seed=8))

    def loss(p, cfg):
        hidden, _ = qwen2.forward(p, cfg, tokens, remat=True)
        return jnp.mean(qwen2.token_logprobs(p, cfg, hidden[:, :-1], tokens[:, 1:]).logprobs)

    unrolled = config.replace(scan_unroll=unroll)
    np.testing.assert_allclose(qwen2.compute_logits(params, unrolled, tokens),
                               qwen2.compute_logits(params, config, tokens), atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                 jax.grad(loss)(params, unrolled), jax.grad(loss)(params, config))
    assert unrolled.to_hf_config() == config.to_hf_config()
    with pytest.raises(ValueError, match="scan_unroll"):
        config.replace(scan_unroll=0)


def test_bfloat16_compute_stays_close_to_float32(gqa7_reference):
    _, config, params = gqa7_reference
    tokens = jnp.asarray(_random_tokens(config.vocab_size, (2, 9), seed=6))
    exact = qwen2.compute_logits(params, config, tokens)
    low = qwen2.compute_logits(params, config.replace(compute_dtype="bfloat16"), tokens)
    assert low.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(low - exact))) < 0.05 * float(jnp.max(jnp.abs(exact)))
    assert float(jnp.mean(jnp.argmax(low, -1) == jnp.argmax(exact, -1))) > 0.8


def test_init_params_match_specs():
    config = qwen2.Qwen2Config(vocab_size=50, hidden_size=16, intermediate_size=24,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               tie_word_embeddings=True, param_dtype="bfloat16")
    params = qwen2.init_params(jax.random.key(0), config)
    specs = qwen2.param_specs(config)
    shapes = jax.tree.map(lambda x: x.shape, params)
    assert shapes == jax.tree.map(lambda s: s.shape, specs,
                                  is_leaf=lambda x: isinstance(x, qwen2.ParamSpec))
    assert "lm_head" not in params
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    assert qwen2.count_params(config) == sum(x.size for x in jax.tree.leaves(params))


@pytest.mark.parametrize("stacked", [True, False])
def test_module_state_is_the_parameter_tree(stacked):
    config = qwen2.Qwen2Config(vocab_size=50, hidden_size=16, intermediate_size=24,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = qwen2.Qwen2ForCausalLM(config, rngs=nnx.Rngs(3), stacked=stacked)
    params = qwen2.module_params(model)
    assert jax.tree.map(lambda x: x.shape, params) == qwen2.param_shapes(config, stacked)
    assert isinstance(params["layers"], dict if stacked else list)
    # Logical axes live on the module's parameters.
    q = model.layers.self_attn.q_proj if stacked else model.layers[1].self_attn.q_proj
    assert q.kernel.get_metadata()["out_sharding"] == (
        ("layers",) if stacked else ()) + ("embed", "heads", "head_dim")
    assert qwen2.param_axes(config, stacked)["lm_head"]["kernel"] == ("embed", "vocab")
    tokens = jnp.asarray(_random_tokens(config.vocab_size, (2, 6), seed=2))
    hidden, _ = model(tokens)
    np.testing.assert_allclose(model.logits(hidden),  # eager vs jitted: rounding only
                               qwen2.compute_logits(params, config, tokens), atol=1e-6)
    # as_module rebuilds the same module over the tree, and module_params takes it back apart.
    rebuilt = qwen2.module_params(qwen2.as_module(params, config))
    jax.tree.map(np.testing.assert_array_equal, rebuilt, params)
    backbone = qwen2.as_module(params, config, qwen2.Qwen2Model)
    assert "lm_head" not in qwen2.module_params(backbone)
