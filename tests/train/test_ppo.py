"""The jitted PPO update: exact accumulation, no-op on zero signal, skipped non-finite steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hiper_jax.models import qwen2
from hiper_jax.models.value_heads import CriticConfig, init_critic
from hiper_jax.train.ppo import (
    PPOBatch,
    PPOConfig,
    init_train_state,
    logprob_pass,
    make_optimizer,
    mini_batches,
    ppo_step,
    ppo_update,
    token_counts,
    value_pass,
)

CONFIG = qwen2.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           tie_word_embeddings=True)


def make_batch(actor, critic, num_rows=8, length=16, seed=0, passes=True):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 64, size=(num_rows, length)).astype(np.int32)
    lengths = rng.integers(length // 2, length + 1, size=num_rows)
    valid = np.arange(length)[None] < lengths[:, None]
    prompt = rng.integers(2, length // 2, size=num_rows)
    response = valid & (np.arange(length)[None] >= prompt[:, None])
    reads = np.stack([prompt - 1, prompt - 1, np.minimum(prompt + 1, lengths - 1)], axis=1).astype(np.int32)
    old_logp = logprob_pass(actor, CONFIG, tokens, valid) if passes else np.zeros(tokens.shape, np.float32)
    old_values = value_pass(critic, actor, CONFIG, tokens, valid, reads) if passes else np.zeros((num_rows, 3), np.float32)
    return PPOBatch(
        tokens=tokens, valid=valid, loss_mask=response,
        advantages=rng.normal(size=(num_rows, length)).astype(np.float32) * response,
        old_logp=old_logp, ref_logp=old_logp,
        value_read=reads, value_targets=rng.normal(size=(num_rows, 3)).astype(np.float32),
        old_values=old_values, value_mask=np.ones((num_rows, 3), bool))


# One static update config for most tests: each distinct config compiles the update (~10 s).
PPO = PPOConfig(kl_coef=0.0, entropy_coef=0.0, micro_batch_rows=2, mini_batch_rows=4)


# Optimizers are static arguments of the update: new objects would recompile it.
ACTOR_TX, CRITIC_TX = make_optimizer(1e-2, 0.0, 1.0), make_optimizer(1e-2, 0.0, 1.0)
SGD = optax.sgd(0.1)


def setup(shared=False):
    actor = qwen2.init_params(jax.random.key(0), CONFIG)
    critic = init_critic(jax.random.key(1), CONFIG, actor, CriticConfig(shared_backbone=shared))
    return actor, critic, ACTOR_TX, CRITIC_TX


def run(state, batch, ppo, actor_tx, critic_tx, seed=0):
    return ppo_update(state, batch, np.random.default_rng(seed), config=CONFIG, ppo=ppo,
                      actor_tx=actor_tx, critic_tx=critic_tx)


def max_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_zero_advantages_and_kl_leave_the_policy_unchanged():
    actor, critic, actor_tx, critic_tx = setup()
    batch = make_batch(actor, critic)
    batch = batch._replace(advantages=jnp.zeros_like(batch.advantages))
    before = jax.tree.map(jnp.copy, (actor, critic))
    state, metrics = run(init_train_state(actor, critic, actor_tx, critic_tx), batch, PPO, actor_tx, critic_tx)
    assert max_diff(state.actor, before[0]) == 0.0
    assert max_diff(state.critic, before[1]) > 0  # the value loss still trains the critic
    assert metrics["pg_loss"] == 0.0 and metrics["skipped"] == 0.0 and metrics["steps"] == 2
    # Every row carries a value loss: all valid tokens are real; 2 steps of 4 x 16 computed.
    lengths = np.asarray(batch.valid).sum(1)
    assert metrics["real_tokens"] == lengths.sum() and metrics["computed_tokens"] == 8 * 16
    assert metrics["real_attention_pairs"] == np.square(lengths).sum()


def test_gradient_accumulation_is_exact():
    actor, critic, _, _ = setup()
    # plain SGD: Adam's first step normalises away the gradient's size
    actor_tx = critic_tx = SGD
    batch = make_batch(actor, critic)
    outs = []
    for micro in (4, 2):
        state = init_train_state(jax.tree.map(jnp.copy, actor), jax.tree.map(jnp.copy, critic),
                                 actor_tx, critic_tx)
        ppo = PPOConfig(micro_batch_rows=micro, mini_batch_rows=4)
        outs.append(run(state, batch, ppo, actor_tx, critic_tx))
    for state, metrics in outs[1:]:
        assert max_diff(state.actor, outs[0][0].actor) < 1e-5
        assert max_diff(state.critic, outs[0][0].critic) < 1e-5
        assert metrics["loss"] == pytest.approx(outs[0][1]["loss"], rel=1e-4, abs=1e-6)


def test_update_moves_log_probs_the_way_advantages_point():
    actor, critic, actor_tx, critic_tx = setup()
    batch = make_batch(actor, critic)
    sign = np.sign(np.asarray(batch.advantages))
    state, _ = run(init_train_state(actor, critic, actor_tx, critic_tx), batch, PPO, actor_tx, critic_tx)
    new_logp = np.asarray(logprob_pass(state.actor, CONFIG, batch.tokens, batch.valid))
    change = (new_logp - np.asarray(batch.old_logp)) * sign
    mask = np.asarray(batch.loss_mask) & (sign != 0)
    assert change[mask].mean() > 0


def test_non_finite_step_is_skipped():
    actor, critic, actor_tx, critic_tx = setup()
    batch = make_batch(actor, critic)
    advantages = np.asarray(batch.advantages).copy()
    advantages[:, -1] = np.nan  # every mini-batch gets NaN advantages
    before = jax.tree.map(jnp.copy, (actor, critic))
    state, metrics = run(init_train_state(actor, critic, actor_tx, critic_tx),
                         batch._replace(advantages=advantages), PPO, actor_tx, critic_tx)
    assert metrics["skipped"] == 1.0 and int(state.step) == 2
    assert max_diff(state.actor, before[0]) == 0.0 and max_diff(state.critic, before[1]) == 0.0


def test_shared_critic_trains_through_the_policy_backbone():
    actor, critic, actor_tx, critic_tx = setup(shared=True)
    assert "backbone" not in critic
    batch = make_batch(actor, critic)
    batch = batch._replace(advantages=jnp.zeros_like(batch.advantages))
    before = jax.tree.map(jnp.copy, actor)
    state, metrics = run(init_train_state(actor, critic, actor_tx, critic_tx), batch, PPO,
                         actor_tx, critic_tx)
    assert metrics["value_loss"] > 0
    assert max_diff(state.actor, before) > 0  # value gradients reach the shared backbone


def test_critic_only_step_leaves_the_actor_and_its_optimizer_as_they_were():
    import dataclasses

    # A shared critic: even the value loss's gradients into the backbone are not applied.
    actor, critic, actor_tx, critic_tx = setup(shared=True)
    batch = make_batch(actor, critic)  # random advantages: a full step would move the actor
    before = jax.tree.map(jnp.copy, (actor, critic))
    state = init_train_state(actor, critic, actor_tx, critic_tx)
    opt_before = jax.tree.map(jnp.copy, state.actor_opt)
    state, metrics = run(state, batch, dataclasses.replace(PPO, train_actor=False), actor_tx, critic_tx)
    assert max_diff(state.actor, before[0]) == 0.0
    assert max_diff(state.actor_opt, opt_before) == 0.0
    assert max_diff(state.critic, before[1]) > 0 and metrics["value_loss"] > 0
    assert int(state.step) == 2


def test_rows_must_split_into_micro_batches():
    actor, critic, actor_tx, critic_tx = setup()
    batch = make_batch(actor, critic, num_rows=6, passes=False)
    with pytest.raises(ValueError, match="micro-batches"):
        ppo_step(init_train_state(actor, critic, actor_tx, critic_tx), batch, config=CONFIG,
                 ppo=PPOConfig(micro_batch_rows=4), actor_tx=actor_tx, critic_tx=critic_tx)


def test_mini_batches_cover_every_loss_row_once_and_pad_the_last():
    actor, critic, _, _ = setup()
    batch = make_batch(actor, critic, num_rows=8, passes=False)
    loss_mask = np.asarray(batch.loss_mask).copy()
    loss_mask[5:] = False
    value_mask = np.asarray(batch.value_mask).copy()
    value_mask[5:] = False
    batch = batch._replace(loss_mask=loss_mask, value_mask=value_mask)
    parts = mini_batches(batch, 4, np.random.default_rng(0))
    assert len(parts) == 2 and all(p.tokens.shape == (4, 16) for p in parts)
    assert sum(int(p.loss_mask.any(1).sum()) for p in parts) == 5
    assert int(parts[1].value_mask.any(1).sum()) == 1
    seen = sorted(map(tuple, np.concatenate([p.tokens[p.loss_mask.any(1)] for p in parts])))
    assert seen == sorted(map(tuple, np.asarray(batch.tokens)[:5]))
    # The rows that pad the last mini-batch are computed but not real.
    counts = [token_counts(p) for p in parts]
    assert sum(c["real_tokens"] for c in counts) == np.asarray(batch.valid)[:5].sum()
    assert sum(c["computed_tokens"] for c in counts) == 2 * 4 * 16


@pytest.mark.parametrize("shared", [False, True])
def test_logprob_value_pass_equals_the_separate_passes(shared):
    from hiper_jax.train.ppo import logprob_value_pass

    actor, critic, _, _ = setup(shared)
    batch = make_batch(actor, critic)
    logp, values = logprob_value_pass(actor, critic, CONFIG, batch.tokens, batch.valid, batch.value_read)
    np.testing.assert_allclose(logp, batch.old_logp, atol=1e-6)
    np.testing.assert_allclose(values, batch.old_values, atol=1e-6)


def test_length_grouped_mini_batches_cut_padding_and_keep_every_row():
    from hiper_jax.train.ppo import length_groups

    lengths = np.array([5, 40, 7, 33, 12, 64, 6, 30])
    groups = length_groups(lengths, rows=2, length_multiple=8, width=64, rng=np.random.default_rng(0))
    assert sorted(np.concatenate([g for g, _ in groups]).tolist()) == list(range(8))
    assert [sorted(lengths[g].tolist()) for g, _ in groups] == [[5, 6], [7, 12], [30, 33], [40, 64]]
    assert [width for _, width in groups] == [8, 16, 48, 64]

    actor, critic, _, _ = setup()
    batch = make_batch(actor, critic, num_rows=8, length=64, passes=False)
    short = np.arange(64)[None] < np.where(np.arange(8) % 2, 64, 12)[:, None]
    batch = batch._replace(valid=short, loss_mask=batch.loss_mask & short,
                           value_read=np.minimum(batch.value_read, 11))
    parts = mini_batches(batch, 4, np.random.default_rng(1), length_multiple=8)
    widths = sorted(p.tokens.shape[1] for p in parts)
    assert len(parts) == 2 and widths == [16, 64]
    for part in parts:
        assert part.valid.sum(1).max() <= part.tokens.shape[1]  # no real token is cut
    seen = sorted(map(tuple, np.concatenate([np.pad(p.tokens, ((0, 0), (0, 64 - p.tokens.shape[1])))
                                             for p in parts])))
    assert len(seen) == 8


def test_length_grouped_update_equals_the_full_width_update():
    """Cutting a mini-batch to its longest row changes no number: padding columns carry no
    loss, and attention never reaches them."""
    actor, critic, actor_tx, critic_tx = setup()
    batch = make_batch(actor, critic, num_rows=8, length=48)
    ppo = PPOConfig(kl_coef=0.0, entropy_coef=0.0, micro_batch_rows=2, mini_batch_rows=8)
    grouped = PPOConfig(kl_coef=0.0, entropy_coef=0.0, micro_batch_rows=2, mini_batch_rows=8, length_multiple=8)
    results = []
    for config in (ppo, grouped):  # the step donates its state: fresh copies for each run
        state = init_train_state(jax.tree.map(jnp.copy, actor), jax.tree.map(jnp.copy, critic), actor_tx, critic_tx)
        results.append(run(state, batch, config, actor_tx, critic_tx))
    assert max_diff(results[0][0].actor, results[1][0].actor) < 1e-5  # sums in another row order
    assert results[0][1]["loss"] == pytest.approx(results[1][1]["loss"], rel=1e-5)


def test_wrong_batch_shapes_fail_at_the_update_entry_naming_the_field():
    from hiper_jax.train.ppo import check_ppo_batch
    rng = np.random.default_rng(0)
    rows, length = 4, 8
    batch = PPOBatch(
        tokens=rng.integers(3, 64, (rows, length)).astype(np.int32), valid=np.ones((rows, length), bool),
        loss_mask=np.ones((rows, length), bool), advantages=np.zeros((rows, length), np.float32),
        old_logp=np.zeros((rows, length), np.float32), ref_logp=np.zeros((rows, length), np.float32),
        value_read=np.zeros((rows, 3), np.int32), value_targets=np.zeros((rows, 3), np.float32),
        old_values=np.zeros((rows, 3), np.float32), value_mask=np.ones((rows, 3), bool))
    assert check_ppo_batch(batch) == (rows, length)
    bad = {
        "batch.advantages must have shape": dict(advantages=batch.advantages[:, 1:]),
        "batch.value_mask must have shape": dict(value_mask=batch.value_mask[:, :2]),
        "batch.tokens must have an int dtype": dict(tokens=batch.tokens.astype(np.float32)),
        "batch.valid has shape": dict(valid=batch.valid[:3]),
        "batch.loss_mask must have a bool or integer dtype": dict(loss_mask=batch.loss_mask * 1.0),
        "batch.value_read must have shape": dict(value_read=batch.value_read[:, 0]),
        "batch.allowed_ids must have shape": dict(allowed_mode=np.zeros((rows, length), np.int8),
                                                  allowed_ids=np.zeros((rows, length - 1, 2), np.int32)),
        "given together": dict(allowed_mode=np.zeros((rows, length), np.int8)),
    }
    for message, change in bad.items():
        with pytest.raises(ValueError, match=message):  # before any state is read or compiled
            ppo_update(None, batch._replace(**change), np.random.default_rng(0), config=CONFIG,
                       ppo=PPO, actor_tx=SGD, critic_tx=SGD)
    # The jitted passes check while tracing, before the parameters are read.
    with pytest.raises(ValueError, match=r"valid has shape \(4, 7\), but tokens"):
        logprob_pass({}, CONFIG, batch.tokens, batch.valid[:, 1:])
    with pytest.raises(ValueError, match=r"value_read must have shape \[N, 3\]"):
        value_pass({}, {}, CONFIG, batch.tokens, batch.valid, batch.value_read[:, :2])


# LoRA: adapters (rank 4) and value heads train; the base weights stay frozen and are the
# reference policy.
LORA_CONFIG = CONFIG.replace(lora_rank=4, lora_alpha=8.0)


def lora_setup(shared=False):
    from hiper_jax.train.ppo import init_lora_params

    base = qwen2.init_params(jax.random.key(0), CONFIG)
    actor, critic, frozen = init_lora_params(jax.random.key(1), LORA_CONFIG, base,
                                             CriticConfig(shared_backbone=shared))
    return base, actor, critic, frozen


def float_size(tree):
    return sum(x.size for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating))


@pytest.mark.parametrize("shared", [pytest.param(False, marks=pytest.mark.slow), True])
def test_lora_step_trains_only_adapters_and_heads(shared):
    base, actor, critic, frozen = lora_setup(shared)
    assert float_size(actor) == qwen2.lora.count_adapter_params(LORA_CONFIG)
    assert float_size(critic) == (0 if shared else float_size(actor)) + 32 * 3 + 3
    # A separate critic's backbone is the policy's own base weights, not a copy.
    if not shared:
        assert frozen[1]["backbone"]["layers"]["mlp"]["up_proj"]["kernel"] is base["layers"]["mlp"]["up_proj"]["kernel"]
    batch = make_batch(base, init_critic(jax.random.key(1), CONFIG, base, CriticConfig(shared_backbone=shared)))
    before = jax.tree.map(jnp.copy, (base, actor, critic))
    state = init_train_state(actor, critic, ACTOR_TX, CRITIC_TX)
    # The optimizers hold moments for the trainable trees only (mu and nu: twice their size).
    assert float_size(state.actor_opt) == 2 * float_size(actor)
    assert float_size(state.critic_opt) == 2 * float_size(critic)
    state, metrics = ppo_update(state, batch, np.random.default_rng(0), config=LORA_CONFIG, ppo=PPO,
                                actor_tx=ACTOR_TX, critic_tx=CRITIC_TX, frozen=frozen)
    assert metrics["skipped"] == 0.0 and metrics["steps"] == 2
    assert max_diff(base, before[0]) == 0.0  # the frozen weights
    assert jax.tree.structure(state.actor) == jax.tree.structure(before[1])
    for path, leaf in jax.tree.flatten_with_path(state.actor)[0]:
        if path[-1].key == "lora_b":  # every adapter moved off zero
            assert float(jnp.abs(leaf).max()) > 0, path
    assert max_diff(state.critic["heads"], before[2]["heads"]) > 0
    # The adapted policy moved; the base tree alone (the reference) is still the base model.
    adapted = logprob_pass(qwen2.lora.combine(state.actor, base), LORA_CONFIG,
                                       batch.tokens, batch.valid)
    reference = logprob_pass(base, LORA_CONFIG, batch.tokens, batch.valid)
    np.testing.assert_array_equal(np.asarray(reference), np.asarray(batch.old_logp))
    assert float(jnp.abs(adapted - reference).max()) > 1e-3


def test_lora_kl_term_is_measured_against_the_base_model():
    """With fresh adapters the policy is the base model, so the first step's KL to the base
    weights' log-probs is exactly 0; after it, the KL the step reports is the one between the
    adapted policy and the base model."""
    from hiper_jax.train.losses import kl_penalty

    base, actor, critic, frozen = lora_setup(shared=True)
    batch = make_batch(base, {"heads": critic["heads"]})  # ref_logp: the base tree's log-probs
    ppo = PPOConfig(kl_coef=0.5, entropy_coef=0.0, micro_batch_rows=8, mini_batch_rows=8)
    state = init_train_state(actor, critic, ACTOR_TX, CRITIC_TX)
    state, first = ppo_step(state, jax.device_put(batch), None, frozen, config=LORA_CONFIG, ppo=ppo,
                            actor_tx=ACTOR_TX, critic_tx=CRITIC_TX)
    assert float(first["kl"]) == 0.0
    adapted = logprob_pass(qwen2.lora.combine(state.actor, base), LORA_CONFIG, batch.tokens, batch.valid)
    mask = np.asarray(batch.loss_mask)
    want = float(np.sum(np.where(mask, kl_penalty(adapted, batch.ref_logp, "low_var_kl"), 0.0)) / mask.sum())
    _, second = ppo_step(state, jax.device_put(batch), None, frozen, config=LORA_CONFIG, ppo=ppo,
                         actor_tx=ACTOR_TX, critic_tx=CRITIC_TX)
    assert want > 0 and float(second["kl"]) == pytest.approx(want, rel=1e-4)


def _step_jaxpr_and_grads(ppo):
    """The PPO step's jaxpr text under ``ppo`` and its loss and gradients on one batch."""
    from hiper_jax.train.ppo import _counts, _loss

    actor, critic, _, _ = setup()
    batch = jax.tree.map(jnp.asarray, make_batch(actor, critic, num_rows=4, length=12, seed=9))
    state = init_train_state(actor, critic, SGD, SGD)
    jaxpr = jax.make_jaxpr(lambda s, b: ppo_step.__wrapped__(s, b, config=CONFIG, ppo=ppo, actor_tx=SGD,
                                                            critic_tx=SGD))(state, batch)
    loss_and_grads = jax.value_and_grad(_loss, has_aux=True)
    (loss, _), grads = jax.jit(loss_and_grads, static_argnums=(4, 5))(
        (actor, critic), batch, _counts(batch), None, CONFIG, ppo)
    return str(jaxpr), loss, grads


def test_remat_switch_recomputes_layers_with_the_same_loss_and_grads():
    """ppo.remat: "layer" puts each decoder layer under jax.checkpoint in the update's forward;
    loss and gradients are the same."""
    plain_jaxpr, plain_loss, plain_grads = _step_jaxpr_and_grads(PPO)
    remat_jaxpr, remat_loss, remat_grads = _step_jaxpr_and_grads(PPO.__class__(**{**PPO.__dict__, "remat": True}))
    # The logits chunks are always checkpointed; remat adds a checkpoint around the scanned
    # layer (jax.checkpoint's primitive prints as remat2 or checkpoint, by JAX version).
    checkpoints = lambda text: text.count("remat2[") + text.count("checkpoint[")  # noqa: E731
    assert checkpoints(remat_jaxpr) > checkpoints(plain_jaxpr) >= 1
    np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(plain_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_logits_chunk_switch_sets_the_logits_slice_with_the_same_loss():
    """ppo.logits_chunk_tokens: the loss's logits exist [micro rows, chunk, V] at a time."""
    import dataclasses

    micro, vocab = PPO.micro_batch_rows, CONFIG.vocab_size
    small_jaxpr, small_loss, small_grads = _step_jaxpr_and_grads(dataclasses.replace(PPO, logits_chunk=4))
    whole_jaxpr, whole_loss, whole_grads = _step_jaxpr_and_grads(dataclasses.replace(PPO, logits_chunk=128))
    assert f"f32[{micro},4,{vocab}]" in small_jaxpr and f"f32[{micro},11,{vocab}]" not in small_jaxpr
    assert f"f32[{micro},11,{vocab}]" in whole_jaxpr  # 11 scored positions: one chunk
    np.testing.assert_allclose(small_loss, whole_loss, rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(small_grads), jax.tree.leaves(whole_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_reference_params_are_a_copy_in_the_reference_dtype(dtype):
    """ppo.ref_dtype: the reference copy's dtype; float32 (the actor's) is the actor exactly,
    in new buffers (the update donates the actor's)."""
    from hiper_jax.train.ppo import reference_params

    actor = qwen2.init_params(jax.random.key(0), CONFIG)
    ref = reference_params(actor, dtype)
    for a, r in zip(jax.tree.leaves(actor), jax.tree.leaves(ref)):
        assert r.dtype == jnp.dtype(dtype) and r.shape == a.shape
        assert r.unsafe_buffer_pointer() != a.unsafe_buffer_pointer()
        if dtype == "float32":
            np.testing.assert_array_equal(r, a)
        else:
            np.testing.assert_allclose(np.asarray(r, np.float32), a, rtol=1e-2, atol=1e-6)


def test_first_step_log_ratio_reads_the_mismatch_of_the_old_logprobs():
    """At the update's first step (the parameters that gave the old log-probs) |log ratio| is
    the mismatch of the old log-probs: 0 for recomputed ones, the offset for shifted ones."""
    actor, critic, actor_tx, critic_tx = setup()
    batch = make_batch(actor, critic)
    outs = {}
    for offset in (0.0, 0.25):
        shifted = batch._replace(old_logp=np.asarray(batch.old_logp) + offset * np.asarray(batch.loss_mask))
        state = init_train_state(jax.tree.map(jnp.copy, actor), jax.tree.map(jnp.copy, critic),
                                 actor_tx, critic_tx)
        outs[offset] = run(state, shifted, PPO, actor_tx, critic_tx)[1]
    assert outs[0.0]["first_step_abs_log_ratio"] < 1e-5
    assert outs[0.0]["first_step_max_abs_log_ratio"] < 1e-5
    assert outs[0.25]["first_step_abs_log_ratio"] == pytest.approx(0.25, abs=1e-5)
    assert outs[0.25]["first_step_max_abs_log_ratio"] == pytest.approx(0.25, abs=1e-5)
    # The second step runs at moved parameters; the max over steps covers both.
    assert outs[0.0]["max_abs_log_ratio"] >= outs[0.0]["first_step_max_abs_log_ratio"]
