"""The jitted KV-cache generator against transformers' generate and against its own definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_qwen2 import make_hf_model, save_hf_model
from hiper_jax.models import qwen2
from hiper_jax.sampling import SamplingConfig, generate, pad_prompts, sample_token, sampling_logits

PAD = 0
PROMPTS = [[5, 9, 14, 3, 77, 21, 8], [40, 2 + 1], [11, 60, 61, 62, 63]]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    hf = make_hf_model("gqa2-untied-theta1e6", seed=3)
    config, params = qwen2.load_hf_checkpoint(save_hf_model(hf, tmp_path_factory.mktemp("m")),
                                              progress=False)
    return hf, config, params


@pytest.fixture(scope="module")
def greedy(model):
    """Greedy continuations of PROMPTS (12 tokens, no stop ids) and the padded prompts."""
    _, config, params = model
    tokens, mask = pad_prompts(PROMPTS, PAD, length_multiple=8)
    out = generate(params, config, tokens, mask, jax.random.key(0),
                   SamplingConfig(max_new_tokens=12, greedy=True, pad_token_id=PAD))
    return tokens, mask, out


def _hf_greedy(hf, tokens, mask, max_new_tokens, stop_ids):
    with torch.no_grad():
        out = hf.generate(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                          attention_mask=torch.as_tensor(mask, dtype=torch.long),
                          max_new_tokens=max_new_tokens, do_sample=False,
                          eos_token_id=list(stop_ids) or None, pad_token_id=PAD)
    return out[:, tokens.shape[1]:].numpy()


def test_greedy_equals_transformers_generate(model, greedy):
    hf, config, params = model
    tokens, mask, free = greedy
    np.testing.assert_array_equal(np.asarray(free.tokens),
                                  _hf_greedy(hf, tokens, mask, 12, ()))
    np.testing.assert_array_equal(np.asarray(free.lengths), [12, 12, 12])
    unstacked = generate(qwen2.unstack_layers(params), config, tokens, mask, jax.random.key(0),
                         SamplingConfig(max_new_tokens=12, greedy=True, pad_token_id=PAD))
    np.testing.assert_array_equal(unstacked.tokens, free.tokens)

    # Stop on a token that row 0 emits at step 4 (and maybe other rows elsewhere).
    stop = int(free.tokens[0, 4])
    out = generate(params, config, tokens, mask, jax.random.key(0),
                   SamplingConfig(max_new_tokens=12, greedy=True, stop_token_ids=(stop, 999),
                                  pad_token_id=PAD))
    reference = _hf_greedy(hf, tokens, mask, 12, (stop,))
    ours = np.asarray(out.tokens)
    np.testing.assert_array_equal(ours[:, :reference.shape[1]], reference)
    assert np.all(ours[:, reference.shape[1]:] == PAD)
    lengths = np.asarray(out.lengths)
    assert lengths[0] <= 5 and ours[0, lengths[0] - 1] == stop
    for row, length in enumerate(lengths):
        assert np.all(ours[row, length:] == PAD)
        assert np.all(np.asarray(out.logprobs)[row, length:] == 0)
        assert stop not in ours[row, :length - 1]


def test_sampled_logprobs_equal_trainer_logprobs(model):
    _, config, params = model
    tokens, mask = pad_prompts(PROMPTS, PAD, length_multiple=8)
    temperature = 0.8
    out = generate(params, config, tokens, mask, jax.random.key(1),
                   SamplingConfig(max_new_tokens=6, temperature=temperature))
    sequence = jnp.concatenate([tokens, out.tokens], axis=1)
    generated = (jnp.arange(6)[None] < out.lengths[:, None]).astype(jnp.int32)
    segments = jnp.concatenate([mask, generated], axis=1)
    hidden, _ = qwen2.forward(params, config, sequence, segment_ids=segments)
    stats = qwen2.token_logprobs(params, config, hidden[:, :-1], sequence[:, 1:],
                                 temperature=temperature)
    recomputed = stats.logprobs[:, tokens.shape[1] - 1:]
    valid = np.asarray(generated).astype(bool)
    np.testing.assert_allclose(np.asarray(out.logprobs)[valid], np.asarray(recomputed)[valid],
                               atol=1e-4)


def test_generation_is_deterministic_given_a_key(model):
    _, config, params = model
    tokens, mask = pad_prompts(PROMPTS, PAD, length_multiple=8)
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.5, top_k=20, top_p=0.95)
    first = generate(params, config, tokens, mask, jax.random.key(7), sampling)
    again = generate(params, config, tokens, mask, jax.random.key(7), sampling)
    other = generate(params, config, tokens, mask, jax.random.key(8), sampling)
    jax.tree.map(np.testing.assert_array_equal, first, again)
    assert not np.array_equal(first.tokens, other.tokens)


def test_top_k_one_and_tiny_top_p_are_greedy(model, greedy):
    _, config, params = model
    tokens, mask, expected = greedy
    for sampling in (SamplingConfig(max_new_tokens=12, top_k=1),
                     SamplingConfig(max_new_tokens=12, top_p=1e-6, temperature=2.0)):
        out = generate(params, config, tokens, mask, jax.random.key(3), sampling)
        np.testing.assert_array_equal(out.tokens, expected.tokens)
        np.testing.assert_allclose(out.logprobs, 0.0, atol=1e-6)


def test_sample_token_frequencies_follow_the_filtered_distribution():
    probs = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    logits = jnp.log(jnp.asarray(probs, jnp.float32))[None]
    keys = jax.random.split(jax.random.key(0), 20000)
    cases = {
        SamplingConfig(max_new_tokens=1): probs,
        SamplingConfig(max_new_tokens=1, temperature=2.0): probs ** 0.5 / np.sum(probs ** 0.5),
        SamplingConfig(max_new_tokens=1, top_k=3): np.r_[probs[:3], [0] * 3] / probs[:3].sum(),
        SamplingConfig(max_new_tokens=1, top_p=0.75): np.r_[probs[:3], [0] * 3] / probs[:3].sum(),
        SamplingConfig(max_new_tokens=1, top_k=4, top_p=0.6):
            np.r_[probs[:2], [0] * 4] / probs[:2].sum(),
    }
    for sampling, expected in cases.items():
        draw = jax.vmap(lambda k: sample_token(logits, k, sampling))
        tokens, logprobs = draw(keys)
        freq = np.bincount(np.asarray(tokens)[:, 0], minlength=6) / len(keys)
        np.testing.assert_allclose(freq, expected, atol=0.015, err_msg=str(sampling))
        chosen = np.asarray(tokens)[:, 0]
        np.testing.assert_allclose(np.asarray(logprobs)[:, 0], np.log(expected[chosen]), atol=1e-5)
        kept = np.isfinite(np.asarray(sampling_logits(logits, sampling))[0])
        np.testing.assert_array_equal(kept, expected > 0)


def test_pad_prompts_left_pads_to_a_bucket():
    tokens, mask = pad_prompts([[1, 2, 3], [4]], pad_token_id=9, length_multiple=4)
    np.testing.assert_array_equal(tokens, [[9, 1, 2, 3], [9, 9, 9, 4]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1]])
    assert pad_prompts([[1] * 5], 0, length_multiple=4)[0].shape == (1, 8)


def test_bad_sampling_settings_are_rejected():
    for bad in (dict(max_new_tokens=0), dict(max_new_tokens=1, temperature=0.0),
                dict(max_new_tokens=1, top_p=0.0), dict(max_new_tokens=1, top_k=-1)):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)
