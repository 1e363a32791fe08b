"""Packed update rows: the packer moves every token once, inside one row, and the PPO loss,
its gradients, the passes and the update on packed rows equal those on unpacked rows."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hiper_jax.models import qwen2
from hiper_jax.models.value_heads import CriticConfig, init_critic
from hiper_jax.train import row_packing as packing
from hiper_jax.train.ppo import (
    PPOBatch,
    PPOConfig,
    _counts,
    _loss,
    init_train_state,
    logprob_value_pass,
    ppo_update,
    token_counts,
)

CONFIG = qwen2.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           tie_word_embeddings=True)
TEXT_MASK = np.arange(64) % 3 == 0


def right_padded(rng, num_rows, length, low=1):
    lengths = rng.integers(low, length + 1, size=num_rows)
    return np.arange(length)[None] < lengths[:, None]


def test_every_token_lands_exactly_once_and_no_segment_crosses_a_row():
    rng = np.random.default_rng(0)
    num_rows, length = 40, 32
    valid = right_padded(rng, num_rows, length, low=0)  # some rows are empty
    ids = np.where(valid, np.arange(num_rows * length).reshape(num_rows, length) + 1, 0)
    plan = packing.plan_rows(valid, length)
    packed, segments = packing.pack_tokens(ids, plan), packing.segment_ids(plan)

    assert sorted(packed[packed > 0]) == sorted(ids[valid])
    assert np.array_equal(packed > 0, segments > 0)
    assert np.all(plan.offset + plan.lengths <= length)
    for source, row, offset, segment, size in zip(plan.source, plan.row, plan.offset, plan.segment,
                                                  plan.lengths):
        assert np.array_equal(packed[row, offset: offset + size], ids[source, :size])
        assert np.all(segments[row, offset: offset + size] == segment + 1)
    assert np.array_equal(packing.unpack_tokens(packed, plan), ids)
    assert packing.real_fraction(plan) == pytest.approx(valid.sum() / packed.size)
    assert packing.real_fraction(plan) > valid.sum() / valid.size
    assert plan.num_rows >= int(np.ceil(valid.sum() / length))
    assert plan.num_segments >= segments.max()
    again = packing.plan_rows(valid, length)
    assert all(np.array_equal(a, b) for a, b in zip(plan, again))  # deterministic


def test_segment_arrays_and_reads_follow_their_rows():
    rng = np.random.default_rng(1)
    valid = right_padded(rng, 12, 16)
    plan = packing.plan_rows(valid, 24)
    values = rng.normal(size=(12, 3)).astype(np.float32)
    assert np.array_equal(packing.unpack_segments(packing.pack_segments(values, plan), plan), values)
    reads = (rng.integers(0, 4, size=(12, 3)) % valid.sum(1, keepdims=True)).astype(np.int32)
    positions = packing.pack_reads(reads, plan)
    segments = packing.segment_ids(plan)
    for n, (row, segment) in enumerate(zip(plan.row, plan.segment)):
        assert np.all(segments[row, positions[row, segment]] == segment + 1)
        assert np.array_equal(positions[row, segment] - plan.offset[n], reads[plan.source[n]])


def test_segment_lengths_count_each_segment():
    segments = np.array([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    assert sorted(packing.segment_lengths(segments)) == [2, 3, 6]
    assert sorted(packing.segment_lengths(segments != 0)) == [5, 6]


def test_bad_input_is_refused_with_a_message():
    with pytest.raises(ValueError, match="right-padded"):
        packing.plan_rows(np.array([[True, False, True]]), 3)
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 2\]"):
        packing.plan_rows(np.array([[True, True, True]]), 2)


def make_batch(actor, critic, seed=0, num_rows=8, length=16):
    """A random batch of short right-padded rows, sampled under random allowed sets (each scored
    token is allowed), with the old policy's log-probs and values."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 64, size=(num_rows, length)).astype(np.int32)
    lengths = rng.integers(3, length // 2 + 1, size=num_rows)
    lengths[0] = length  # one full row: the packed width is L
    valid = np.arange(length)[None] < lengths[:, None]
    prompt = rng.integers(1, lengths - 1)
    response = valid & (np.arange(length)[None] >= prompt[:, None])
    mode = np.where(response, rng.integers(0, 3, size=tokens.shape), 0).astype(np.int8)
    ids = rng.integers(0, 64, size=tokens.shape + (3,)).astype(np.int32)
    ids[..., 0] = tokens
    allowed = qwen2.AllowedTokens(mode, ids, TEXT_MASK)
    reads = np.stack([prompt - 1, prompt, lengths - 1], axis=1).astype(np.int32)
    old_logp, old_values = logprob_value_pass(actor, critic, CONFIG, tokens, valid, reads, allowed=allowed)
    return PPOBatch(
        tokens=tokens, valid=valid, loss_mask=response & (rng.random(tokens.shape) < 0.8),
        advantages=(rng.normal(size=tokens.shape) * response).astype(np.float32),
        old_logp=np.asarray(old_logp) + 0.05 * rng.normal(size=tokens.shape).astype(np.float32),
        ref_logp=np.asarray(old_logp) - 0.1, value_read=reads,
        value_targets=rng.normal(size=(num_rows, 3)).astype(np.float32),
        old_values=np.asarray(old_values), value_mask=rng.random((num_rows, 3)) < 0.7,
        allowed_mode=mode, allowed_ids=ids)


def setup(shared):
    actor = qwen2.init_params(jax.random.key(0), CONFIG)
    critic = init_critic(jax.random.key(1), CONFIG, actor, CriticConfig(shared_backbone=shared))
    return actor, critic


def assert_trees_close(a, b, tol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


# Each test below compiles the model's loss or update twice (unpacked and packed shapes): about
# 10 s each on a quiet 2-core CPU, so all but one run with -m slow.
@pytest.mark.parametrize("shared", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_packed_loss_and_gradients_equal_the_unpacked_ones(shared):
    actor, critic = setup(shared)
    batch = make_batch(actor, critic)
    packed, plan = packing.pack_ppo_batch(batch)
    assert plan.num_rows < batch.tokens.shape[0] and plan.num_segments > 1
    ppo = PPOConfig(kl_coef=0.1, entropy_coef=0.01, value_coef=0.5)
    grad_fn = jax.jit(jax.value_and_grad(functools.partial(_loss, config=CONFIG, ppo=ppo), has_aux=True))

    def loss_and_grads(b):
        b = jax.tree.map(jnp.asarray, b)
        return grad_fn((actor, critic), b, _counts(b), jnp.asarray(TEXT_MASK))

    (loss, metrics), grads = loss_and_grads(batch)
    (packed_loss, packed_metrics), packed_grads = loss_and_grads(packed)
    assert float(metrics["value_loss"]) > 0 and float(metrics["kl"]) > 0
    assert_trees_close((loss, metrics), (packed_loss, packed_metrics))
    assert_trees_close(grads, packed_grads)
    assert token_counts(packed)["real_tokens"] == token_counts(batch)["real_tokens"]
    assert token_counts(packed)["real_attention_pairs"] == token_counts(batch)["real_attention_pairs"]
    assert token_counts(packed)["computed_tokens"] < token_counts(batch)["computed_tokens"]


@pytest.mark.slow
@pytest.mark.parametrize("shared", [False, True])
def test_packed_passes_equal_the_unpacked_ones(shared):
    actor, critic = setup(shared)
    batch = make_batch(actor, critic, seed=2)
    allowed = (batch.allowed_mode, batch.allowed_ids)

    def fn(tokens, valid, mode, ids, reads):
        return logprob_value_pass(actor, critic, CONFIG, tokens, valid, reads,
                                  allowed=qwen2.AllowedTokens(mode, ids, TEXT_MASK))

    def run(fn, token_arrays, read_arrays, per_token):
        return tuple(np.asarray(x) for x in fn(*token_arrays, *read_arrays))

    arrays = (batch.tokens, batch.valid) + allowed
    logp, values = run(fn, arrays, (batch.value_read,), (True, False))
    packed_logp, packed_values = packing.packed_pass(run, batch.valid)(fn, arrays, (batch.value_read,),
                                                                      per_token=(True, False))
    np.testing.assert_allclose(packed_logp, logp * batch.valid, rtol=1e-5, atol=1e-5)
    assert np.all(packed_logp[:, 0] == 0)
    np.testing.assert_allclose(packed_values, values, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_packed_update_equals_the_unpacked_update():
    actor, critic = setup(False)
    batch = make_batch(actor, critic, seed=3)
    tx = optax.sgd(0.1)
    results = {}
    for pack in (False, True):
        ppo = PPOConfig(kl_coef=0.0, entropy_coef=0.01, micro_batch_rows=2, mini_batch_rows=8, pack_rows=pack)
        state = init_train_state(*jax.tree.map(jnp.copy, (actor, critic)), tx, tx)  # donated
        results[pack] = ppo_update(state, batch, np.random.default_rng(0), config=CONFIG, ppo=ppo,
                                   actor_tx=tx, critic_tx=tx, text_mask=TEXT_MASK)
    (state, metrics), (packed_state, packed_metrics) = results[False], results[True]
    assert packed_metrics["steps"] == metrics["steps"] == 1
    assert_trees_close((state.actor, state.critic), (packed_state.actor, packed_state.critic))
    for name in ("loss", "pg_loss", "value_loss", "entropy", "real_tokens", "real_attention_pairs"):
        assert packed_metrics[name] == pytest.approx(metrics[name], rel=1e-5, abs=1e-6)
    assert packed_metrics["computed_tokens"] < metrics["computed_tokens"]


def test_packed_rows_per_step_keeps_the_number_of_steps():
    assert packing.packed_rows_per_step(100, 320, 64, 16) == 32  # 5 steps of 20 rows -> 32
    assert packing.packed_rows_per_step(3, 320, 64, 16) == 16
    assert packing.packed_rows_per_step(40, 40, 64, 8) == 40


def test_wider_packed_rows_take_fewer_rows_per_micro_batch():
    assert packing.packed_micro_rows(16, 384, 384) == 16
    assert packing.packed_micro_rows(16, 384, 1152) == 4  # 5.3 rows' worth of tokens -> 4
    assert packing.packed_micro_rows(2, 16, 64) == 1
