"""The jitted PPO update: log-prob/value passes, and one update over a batch of turn rows.

A batch is token-level (one row per turn, ``[N, L]``, see :mod:`hiper_jax.rollout.packing`).
``tokens[n, j]`` is scored by the logits at ``j - 1``; every ``[N, L]`` token array here is
aligned to the scored token, with position 0 (never a response token) left at 0.

One optimizer step (:func:`ppo_step`) is one jitted function over a mini-batch of a fixed number
of rows; it accumulates gradients over micro-batches with ``lax.scan``. Token means are taken
over the whole mini-batch, so accumulation is exact. :func:`ppo_update` runs the epochs over
shuffled mini-batches from the host, so a batch of any size reuses one compiled step per token
length. Actor and critic have their own AdamW with global-norm clipping. A step whose loss or
gradient is not finite is skipped: parameters and optimizer states stay as they were, and the
metrics say so. Batches are checked against the shapes and dtypes :class:`PPOBatch` promises at
the entry points (:func:`check_ppo_batch`); a mismatch raises ValueError naming the field.

With LoRA the train state holds only what trains (adapters, value heads) and the optimizers
see only that; the frozen base weights come in as a separate, undonated argument
(:func:`init_lora_params`), so no gradient or moment is ever allocated for them.

A Qwen2.5-VL policy (``config`` a :class:`~hiper_jax.models.qwen2_5_vl.Qwen2_5_VLConfig`)
trains through the same step: its batch carries each row's M-RoPE ``positions`` and image
``features`` (the frozen vision tower's output, computed once per batch by
:mod:`hiper_jax.train.vision_batch`), the critic is value heads on the policy's hidden states,
and :func:`freeze_vision` keeps the optimizer off the vision tower.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from hiper_jax import distributed
from hiper_jax.models import qwen2
from hiper_jax.models.qwen2_5_vl import scoring as vl_scoring
from hiper_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from hiper_jax.models.value_heads import (CriticConfig, critic_values, init_lora_critic,
                                          lora_critic_base)
from hiper_jax.shapes import check_flags, check_rank, check_same_shape, check_shape, check_type
from hiper_jax.train.losses import clipped_value_loss, kl_penalty, ppo_dual_clip_loss, token_mean
from hiper_jax.train.row_packing import (pack_ppo_batch, packed_micro_rows, packed_rows_per_step,
                                         segment_lengths)
from hiper_jax.vocab import VALUE_HEADS

Array = jax.Array
Params = dict


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """Static settings of the update (a change recompiles)."""

    clip_ratio: float = 0.2
    dual_clip: float = 3.0
    kl_coef: float = 0.01
    kl_estimator: str = "low_var_kl"
    entropy_coef: float = 0.001
    value_clip: float = 0.5
    epochs: int = 1
    mini_batch_rows: int = 64
    micro_batch_rows: int = 8
    temperature: float = 1.0
    value_heads: tuple[str, ...] = VALUE_HEADS
    remat: bool = False  # recompute each decoder layer in the backward pass (config ppo.remat="layer")
    logits_chunk: int = 128  # positions per chunk of the loss's logits (config ppo.logits_chunk_tokens)
    length_multiple: int = 0  # > 0: mini-batches of rows of similar length, cut to their width
    value_coef: float = 1.0   # weight of the value loss (matters when the critic shares the backbone)
    # False: a critic-only step (warm-up): the actor and its optimizer state stay as they are,
    # and the value loss reaches a shared backbone's weights not at all (only the heads learn).
    train_actor: bool = True
    # True: ppo_update packs several turn rows into each row (hiper_jax.train.row_packing); the
    # mini-batches then hold packed rows, about as many steps per epoch as unpacked.
    pack_rows: bool = False
    pack_length: int = 0  # width of a packed row (0: the batch's length bucket)


class TrainState(NamedTuple):
    """Everything the update changes."""

    actor: Params
    critic: Params
    actor_opt: optax.OptState
    critic_opt: optax.OptState
    step: Array  # number of optimizer steps taken (skipped ones included)


class PPOBatch(NamedTuple):
    """Device arrays of one update; ``[N, L]`` token arrays aligned to scored tokens.

    ``value_*`` are ``[N, 3]`` (heads low, high, term): the hidden-state position each head
    reads, its target return, its value at rollout time, and whether the head is trained on
    that row. In packed rows (:mod:`hiper_jax.train.row_packing`) ``valid`` holds segment ids
    (int, 0 padding) and ``value_*`` are per segment, ``[N, S, 3]``. A vision-language policy's
    batch also has ``positions`` and ``features`` (one turn per row; None for a text policy).
    """

    tokens: Array          # [N, L] int32
    valid: Array           # [N, L] bool, real tokens (prompt and response); or int segment ids
    loss_mask: Array       # [N, L] bool, response tokens inside the three blocks
    advantages: Array      # [N, L] float32
    old_logp: Array        # [N, L] float32
    ref_logp: Array        # [N, L] float32
    value_read: Array      # [N, 3] int32
    value_targets: Array   # [N, 3] float32
    old_values: Array      # [N, 3] float32
    value_mask: Array      # [N, 3] bool
    # Constrained sampling only (else None): each scored token's allowed set (mode 0 = all).
    allowed_mode: Optional[Array] = None  # [N, L] int8
    allowed_ids: Optional[Array] = None   # [N, L, K] int32
    # Vision-language policies only (else None): M-RoPE positions and each row's image features
    # in placeholder order (rows without images: zeros), as the scoring pass takes them.
    positions: Optional[Array] = None     # [N, L, 3] int32
    features: Optional[Array] = None      # [N, F, E] float


def value_shape(num_rows: int, value_read) -> tuple[tuple[Optional[int], ...], str]:
    """The shape (and its spec) of the value arrays that go with ``value_read``: ``[N, 3]``,
    or ``[N, S, 3]`` per segment of packed rows."""
    if value_read is not None and jnp.ndim(value_read) == 3:
        return (num_rows, None, 3), "[N, S, 3]"
    return (num_rows, 3), "[N, 3]"


def check_token_rows(tokens, valid, value_read=None, prefix: str = "") -> tuple[int, int]:
    """``tokens`` ``[N, L]`` int, ``valid`` the same shape (bool, or integer segment ids),
    ``value_read`` ``[N, 3]`` or ``[N, S, 3]`` int (None: not checked); returns ``(N, L)``.
    Raises ValueError naming the argument (after ``prefix``). Reads shapes and dtypes only, so
    inside jit it runs once while tracing."""
    named = lambda name, x: {prefix + name: x}
    check_rank(2, "[N, L]", **named("tokens", tokens))
    check_type(int, **named("tokens", tokens))
    num_rows, length = check_same_shape(**named("tokens", tokens), **named("valid", valid))
    check_flags(**named("valid", valid))
    check_shape(*value_shape(num_rows, value_read), **named("value_read", value_read))
    check_type(int, **named("value_read", value_read))
    return num_rows, length


def check_allowed(allowed: Optional[qwen2.AllowedTokens], tokens, vocab_size: int) -> None:
    """The allowed sets of a constrained batch: ``mode`` ``[N, L]`` int, ``ids`` ``[N, L, K]``
    int, ``text_mask`` ``[V]`` bool (None: unconstrained, nothing to check)."""
    if allowed is None:
        return
    num_rows, length = jnp.shape(tokens)
    mode, ids = {"allowed.mode": allowed.mode}, {"allowed.ids": allowed.ids}
    text_mask = {"allowed.text_mask": allowed.text_mask}
    check_shape((num_rows, length), "[N, L]", **mode)
    check_shape((num_rows, length, None), "[N, L, K]", **ids)
    check_shape((vocab_size,), "[V]", **text_mask)
    check_type(int, **mode, **ids)
    check_type(bool, **text_mask)


def check_ppo_batch(batch: PPOBatch) -> tuple[int, int]:
    """Checks every field of ``batch`` against the shapes and dtypes :class:`PPOBatch` promises;
    returns ``(N, L)``. Raises ValueError naming the field (``batch.<field>``)."""
    def fields(*names: str) -> dict:
        return {f"batch.{name}": getattr(batch, name) for name in names}

    num_rows, length = check_token_rows(batch.tokens, batch.valid, batch.value_read, prefix="batch.")
    check_shape((num_rows, length), "[N, L]",
                **fields("loss_mask", "advantages", "old_logp", "ref_logp", "allowed_mode"))
    check_shape((num_rows, length, None), "[N, L, K]", **fields("allowed_ids"))
    check_shape(*value_shape(num_rows, batch.value_read), **fields("value_targets", "old_values", "value_mask"))
    check_flags(**fields("loss_mask", "value_mask"))
    check_type(float, **fields("advantages", "old_logp", "ref_logp", "value_targets", "old_values"))
    check_type(int, **fields("allowed_mode", "allowed_ids"))
    if (batch.allowed_mode is None) != (batch.allowed_ids is None):
        raise ValueError("batch.allowed_mode and batch.allowed_ids must be given together")
    check_shape((num_rows, length, 3), "[N, L, 3]", **fields("positions"))
    check_shape((num_rows, None, None), "[N, F, E]", **fields("features"))
    check_type(int, **fields("positions"))
    check_type(float, **fields("features"))
    if (batch.positions is None) != (batch.features is None):
        raise ValueError("batch.positions and batch.features must be given together")
    return num_rows, length


def is_vision(config) -> bool:
    """Whether ``config`` is a vision-language policy's (Qwen2.5-VL)."""
    return isinstance(config, Qwen2_5_VLConfig)


def check_batch_matches(batch: PPOBatch, config) -> None:
    """A vision-language policy needs its batch's ``positions`` and ``features``; a text
    policy's batch has none. Raises ValueError otherwise."""
    vision = is_vision(config)
    if vision and batch.features is None:
        raise ValueError("a Qwen2.5-VL policy trains on batches with positions and features "
                         "(hiper_jax.train.vision_batch.build_vision_ppo_batch)")
    if not vision and batch.features is not None:
        raise ValueError("this batch carries image features, but the policy config is a text "
                         f"model's ({type(config).__name__})")
    if vision and jnp.ndim(batch.value_read) == 3:
        raise ValueError("packed rows (ppo.pack_rows) are not supported for a Qwen2.5-VL policy")


@functools.lru_cache(maxsize=None)
def freeze_vision(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` on every parameter but the vision tower's (the top-level ``visual`` subtree),
    whose updates are zero and which holds no optimizer state: the frozen tower of
    ``model.train_vision=False``. Without a ``visual`` subtree it is ``tx`` on everything. The
    same ``tx`` gives the same object (a static argument of :func:`ppo_step`)."""
    def labels(params):
        return {name: jax.tree.map(lambda _: "frozen" if name == "visual" else "trained", sub)
                for name, sub in params.items()}
    return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)


@functools.lru_cache(maxsize=None)
def make_optimizer(learning_rate: float, weight_decay: float, max_grad_norm: float) -> optax.GradientTransformation:
    """AdamW after global-norm clipping. The same settings return the same object, so jitted
    steps that take it as a static argument compile once."""
    return optax.chain(optax.clip_by_global_norm(max_grad_norm),
                       optax.adamw(learning_rate, weight_decay=weight_decay))


def reference_params(actor: Params, dtype) -> Params:
    """The frozen reference policy: a copy of ``actor`` in ``dtype`` (same shardings). Always a
    new buffer, never the actor's own, because the update donates the actor's."""
    dtype = jnp.dtype(dtype)
    return jax.tree.map(lambda x: jnp.copy(x) if x.dtype == dtype else x.astype(dtype), actor)


def init_train_state(actor: Params, critic: Params, actor_tx, critic_tx) -> TrainState:
    """Fresh optimizer states and step for ``actor`` and ``critic``. When the params live on a
    mesh (``NamedSharding``), the leaves ``tx.init`` and the step create on the default device
    (counters) are replicated onto that mesh, so one jitted step sees every argument on the
    same devices."""
    state = TrainState(actor, critic, actor_tx.init(actor), critic_tx.init(critic),
                       jnp.zeros((), jnp.int32))
    sharding = jax.tree.leaves(actor)[0].sharding
    if not isinstance(sharding, NamedSharding):
        return state
    replicated = NamedSharding(sharding.mesh, PartitionSpec())
    devices = set(sharding.mesh.devices.flat)

    def place(x):
        if isinstance(x, jax.Array) and x.sharding.device_set == devices:
            return x
        return jax.device_put(x, replicated)
    return jax.tree.map(place, state)


def init_lora_params(key: Array, config: qwen2.Qwen2Config, base: Params,
                     critic_config: CriticConfig, mesh=None) -> tuple[Params, Params, tuple]:
    """LoRA training (``config.lora_rank > 0``): ``(actor, critic, frozen)``, where ``actor`` and
    ``critic`` are the trainable trees (fresh adapters, value heads) that the train state and the
    optimizers hold, and ``frozen = (actor base, critic base)`` the policy weights ``base`` they
    sit on (:func:`hiper_jax.models.qwen2.lora.combine`), shared by actor and critic and never
    copied: pass it to :func:`ppo_step` / :func:`ppo_update`."""
    actor_key, critic_key = jax.random.split(key)
    actor = qwen2.lora.init_adapters(actor_key, config, mesh)
    critic = init_lora_critic(critic_key, config, critic_config, mesh)
    return actor, critic, (base, lora_critic_base(base, critic_config))


def with_frozen(params: tuple[Params, Params], frozen: Optional[tuple]) -> tuple[Params, Params]:
    """``(actor, critic)`` whole: the trainable trees over the ``frozen`` ones (None: as they are)."""
    if frozen is None:
        return params
    return (qwen2.lora.combine(params[0], frozen[0]), qwen2.lora.combine(params[1], frozen[1]))


def _segment_ids(valid: Array) -> Array:
    return valid.astype(jnp.int32)


def _scored(stat: Array) -> Array:
    """``[N, L - 1]`` stats of targets ``tokens[:, 1:]`` -> ``[N, L]`` aligned to scored tokens."""
    return jnp.pad(stat, ((0, 0), (1, 0)))


def policy_token_stats(actor: Params, config: qwen2.Qwen2Config, tokens: Array, valid: Array,
                       temperature: float = 1.0, remat: bool = False,
                       allowed: Optional[qwen2.AllowedTokens] = None, logits_chunk: int = 128,
                       positions: Optional[Array] = None, features: Optional[Array] = None):
    """Log-probs and entropies of every scored token, ``[N, L]`` each, plus hidden ``[N, L, E]``
    (logits ``logits_chunk`` positions at a time, :func:`hiper_jax.models.qwen2.token_logprobs`).

    ``allowed`` (``mode``/``ids`` aligned to scored tokens, ``[N, L]`` / ``[N, L, K]``) makes
    them those of the constrained distribution the tokens were sampled from. A Qwen2.5-VL
    ``config`` needs ``positions [N, L, 3]`` and ``features [N, F, E]``
    (:func:`hiper_jax.models.qwen2_5_vl.scoring.token_stats`).
    """
    if is_vision(config):
        if positions is None or features is None:
            raise ValueError("a Qwen2.5-VL policy needs positions and features")
        rows = vl_scoring.ScoringRows(tokens, _segment_ids(valid), jnp.moveaxis(positions, -1, 0),
                                      features)
        return vl_scoring.token_stats(actor, config, rows, temperature, allowed, remat=remat,
                                      logits_chunk=logits_chunk)
    hidden, _ = qwen2.forward(actor, config, tokens, segment_ids=_segment_ids(valid), remat=remat)
    if allowed is not None:
        allowed = allowed._replace(mode=allowed.mode[:, 1:], ids=allowed.ids[:, 1:])
    stats = qwen2.token_logprobs(actor, config, hidden[:, :-1], tokens[:, 1:], temperature=temperature,
                                 chunk_size=logits_chunk, allowed=allowed)
    return _scored(stats.logprobs), _scored(stats.entropy), hidden


def batch_allowed(batch, text_mask: Optional[Array]) -> Optional[qwen2.AllowedTokens]:
    """The batch's allowed sets with the grammar's ``text_mask [V]`` (None: unconstrained)."""
    if batch.allowed_mode is None:
        return None
    if text_mask is None:
        raise ValueError("a batch sampled with a constraint needs the grammar's text_mask")
    return qwen2.AllowedTokens(batch.allowed_mode, batch.allowed_ids, text_mask)


def read_values(critic: Params, config: qwen2.Qwen2Config, tokens: Array, valid: Array,
                value_read: Array, policy_hidden: Optional[Array] = None, remat: bool = False) -> Array:
    """Critic values ``[N, 3]`` at each head's read position ``value_read [N, 3]`` (per
    segment of packed rows: ``[N, S, 3]`` at ``[N, S, 3]``)."""
    if is_vision(config):
        if "backbone" in critic or policy_hidden is None:
            raise ValueError("a Qwen2.5-VL policy's critic is value heads on its hidden states "
                             "(CriticConfig(shared_backbone=True))")
        config = config.text
    values = critic_values(critic, config, tokens, segment_ids=_segment_ids(valid),
                           policy_hidden=policy_hidden, remat=remat)
    if value_read.ndim == 3:
        return jnp.take_along_axis(values, value_read, axis=1)
    return jnp.take_along_axis(values, value_read[:, None, :], axis=1)[:, 0, :]


@functools.partial(jax.jit, static_argnames=("config", "temperature"))
def logprob_pass(params: Params, config: qwen2.Qwen2Config, tokens: Array, valid: Array,
                 temperature: float = 1.0, allowed: Optional[qwen2.AllowedTokens] = None) -> Array:
    """Jitted log-probs ``[N, L]`` of every scored token (old or reference policy), under the
    constraint when ``allowed`` is given."""
    check_token_rows(tokens, valid)
    check_allowed(allowed, tokens, config.vocab_size)
    logp, _, _ = policy_token_stats(params, config, tokens, valid, temperature, allowed=allowed)
    return logp


@functools.partial(jax.jit, static_argnames=("config",))
def value_pass(critic: Params, actor: Params, config: qwen2.Qwen2Config, tokens: Array,
               valid: Array, value_read: Array) -> Array:
    """Jitted critic values ``[N, 3]`` at the read positions (uses the actor's hidden states
    when the critic shares its backbone)."""
    check_token_rows(tokens, valid, value_read)
    hidden = None
    if "backbone" not in critic:
        hidden, _ = qwen2.forward(actor, config, tokens, segment_ids=_segment_ids(valid))
    return read_values(critic, config, tokens, valid, value_read, policy_hidden=hidden)


@functools.partial(jax.jit, static_argnames=("config", "temperature"))
def logprob_value_pass(actor: Params, critic: Params, config: qwen2.Qwen2Config, tokens: Array,
                       valid: Array, value_read: Array, temperature: float = 1.0,
                       allowed: Optional[qwen2.AllowedTokens] = None) -> tuple[Array, Array]:
    """:func:`logprob_pass` and :func:`value_pass` in one jitted call: log-probs ``[N, L]``
    and values ``[N, 3]``. A critic sharing the actor's backbone reads the same forward pass,
    so the batch costs one forward instead of two."""
    check_token_rows(tokens, valid, value_read)
    check_allowed(allowed, tokens, config.vocab_size)
    logp, _, hidden = policy_token_stats(actor, config, tokens, valid, temperature, allowed=allowed)
    policy_hidden = None if "backbone" in critic else hidden
    return logp, read_values(critic, config, tokens, valid, value_read, policy_hidden=policy_hidden)


def _loss(params, batch: PPOBatch, counts: dict, text_mask: Optional[Array], config: qwen2.Qwen2Config,
          ppo: PPOConfig, frozen: Optional[tuple] = None):
    """Loss of one micro-batch, scaled so that summing micro-batches gives mini-batch means.
    ``params`` are the trainable trees; ``frozen`` (LoRA) the weights they sit on, which get
    no gradient."""
    actor, critic = with_frozen(params, frozen)
    logp, entropy, hidden = policy_token_stats(actor, config, batch.tokens, batch.valid,
                                               ppo.temperature, ppo.remat,
                                               allowed=batch_allowed(batch, text_mask),
                                               logits_chunk=ppo.logits_chunk,
                                               positions=batch.positions, features=batch.features)
    mask = batch.loss_mask
    share = jnp.sum(mask) / jnp.maximum(counts["tokens"], 1.0)
    pg = ppo_dual_clip_loss(logp, batch.old_logp, batch.advantages, mask,
                            clip_ratio=ppo.clip_ratio, dual_clip=ppo.dual_clip)
    kl = jnp.zeros((), jnp.float32)
    if ppo.kl_coef:  # without the term the batch carries no reference log-probs
        kl = jnp.sum(jnp.where(mask, kl_penalty(logp, batch.ref_logp, ppo.kl_estimator), 0.0))
    ent = jnp.sum(jnp.where(mask, entropy, 0.0))
    denominator = jnp.maximum(counts["tokens"], 1.0)
    actor_loss = pg.loss * share + (ppo.kl_coef * kl - ppo.entropy_coef * ent) / denominator

    value_loss = jnp.zeros((), jnp.float32)
    if ppo.value_heads:  # critic-free estimators (grpo, rloo) skip the critic entirely
        policy_hidden = None if "backbone" in critic else hidden
        values = read_values(critic, config, batch.tokens, batch.valid, batch.value_read,
                             policy_hidden=policy_hidden, remat=ppo.remat)
    for head, name in enumerate(VALUE_HEADS):
        if name not in ppo.value_heads:
            continue
        head_mask = batch.value_mask[..., head]
        head_share = jnp.sum(head_mask) / jnp.maximum(counts[name], 1.0)
        value_loss += head_share * clipped_value_loss(
            values[..., head], batch.old_values[..., head], batch.value_targets[..., head], head_mask,
            clip=ppo.value_clip)
    metrics = {
        "pg_loss": pg.loss * share, "kl": kl / denominator, "entropy": ent / denominator,
        "clip_fraction": pg.clip_fraction * share, "dual_clip_fraction": pg.dual_clip_fraction * share,
        "approx_kl": pg.approx_kl * share, "value_loss": value_loss,
        # |log pi - log pi_old| on the loss tokens: at an update's first step (the sampling
        # policy's parameters) the sampler-vs-learner mismatch.
        "abs_log_ratio": token_mean(jnp.abs(logp - batch.old_logp), mask) * share,
        "max_abs_log_ratio": jnp.max(jnp.where(mask, jnp.abs(logp - batch.old_logp), 0.0)),
    }
    return actor_loss + ppo.value_coef * value_loss, metrics


def _split(batch: PPOBatch, parts: int) -> PPOBatch:
    """``[N, ...]`` -> ``[parts, N / parts, ...]``, part p taking rows p, p + parts, ..."""
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape((-1, parts) + x.shape[1:]), 0, 1), batch)


def _counts(batch: PPOBatch) -> dict:
    counts = {"tokens": jnp.sum(batch.loss_mask).astype(jnp.float32)}
    for head, name in enumerate(VALUE_HEADS):
        counts[name] = jnp.sum(batch.value_mask[..., head]).astype(jnp.float32)
    return counts


def _all_finite(tree) -> Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


@functools.partial(jax.jit, static_argnames=("config", "ppo", "actor_tx", "critic_tx"), donate_argnums=(0,))
def ppo_step(state: TrainState, mini: PPOBatch, text_mask: Optional[Array] = None,
             frozen: Optional[tuple] = None, *,
             config: qwen2.Qwen2Config, ppo: PPOConfig, actor_tx, critic_tx) -> tuple[TrainState, dict]:
    """One optimizer step on a mini-batch of ``ppo.mini_batch_rows`` rows, accumulating
    gradients over micro-batches of ``ppo.micro_batch_rows`` rows (token means are over the whole
    mini-batch, so the result does not depend on the micro-batch size). ``text_mask [V]`` is
    the grammar's, for a batch sampled with a constraint. ``frozen`` (LoRA, from
    :func:`init_lora_params`): the base weights under the state's adapters; not donated, not
    differentiated, not optimized."""
    num_rows, _ = check_ppo_batch(mini)
    check_batch_matches(mini, config)
    vocab = config.text.vocab_size if is_vision(config) else config.vocab_size
    check_shape((vocab,), "[V]", text_mask=text_mask)
    check_type(bool, text_mask=text_mask)
    if num_rows % ppo.micro_batch_rows:
        raise ValueError(f"a mini-batch of {num_rows} rows does not split into micro-batches of "
                         f"{ppo.micro_batch_rows} rows")
    grad_fn = jax.value_and_grad(_loss, has_aux=True)
    counts = _counts(mini)

    def micro_step(grads, micro):
        (loss, metrics), g = grad_fn((state.actor, state.critic), micro, counts, text_mask, config, ppo,
                                     frozen)
        return jax.tree.map(jnp.add, grads, g), (loss, metrics)

    zeros = jax.tree.map(jnp.zeros_like, (state.actor, state.critic))
    grads, (losses, metrics) = jax.lax.scan(micro_step, zeros, _split(mini, num_rows // ppo.micro_batch_rows))
    metrics = {k: jnp.max(v) if k.startswith("max_") else jnp.sum(v) for k, v in metrics.items()}
    loss = jnp.sum(losses)
    actor_updates, actor_opt = actor_tx.update(grads[0], state.actor_opt, state.actor)
    critic_updates, critic_opt = critic_tx.update(grads[1], state.critic_opt, state.critic)
    if ppo.train_actor:
        actor, actor_opt = optax.apply_updates(state.actor, actor_updates), actor_opt
    else:
        actor, actor_opt = state.actor, state.actor_opt
    candidate = TrainState(actor, optax.apply_updates(state.critic, critic_updates),
                           actor_opt, critic_opt, state.step + 1)
    kept = state._replace(step=state.step + 1)
    finite = jnp.isfinite(loss) & _all_finite(grads)
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), candidate, kept)
    metrics.update(loss=loss, actor_grad_norm=optax.tree.norm(grads[0]),
                   critic_grad_norm=optax.tree.norm(grads[1]), skipped=(~finite).astype(jnp.float32))
    return new_state, metrics


def row_lengths(valid) -> np.ndarray:
    """``[N]`` real tokens per row of ``valid [N, L]`` (flags or segment ids)."""
    return (np.asarray(valid) != 0).sum(axis=1)


def _carries(batch: PPOBatch) -> np.ndarray:
    """``[N]`` bool: rows with a loss token or a trained value head."""
    value_mask = np.asarray(batch.value_mask)
    return np.asarray(batch.loss_mask).any(1) | value_mask.reshape(value_mask.shape[0], -1).any(1)


def length_groups(lengths: np.ndarray, rows: int, length_multiple: int, width: int,
                  rng: Optional[np.random.Generator] = None) -> list[tuple[np.ndarray, int]]:
    """Rows sorted by length (ties in random order with ``rng``) in groups of ``rows``, each
    with the bucketed width its longest row needs (at most ``width``): ``[(indices, L_g)]``.

    Right-padded rows of similar length then share a narrower array: padding, not real
    tokens, is what a length bucket of the whole batch wastes.
    """
    from hiper_jax.rollout.packing import bucket_size

    tiebreak = rng.random(len(lengths)) if rng is not None else np.arange(len(lengths))
    order = np.lexsort((tiebreak, lengths))
    groups = []
    for start in range(0, len(order), rows):
        index = order[start: start + rows]
        groups.append((index, min(bucket_size(int(lengths[index].max(initial=1)), length_multiple), width)))
    return groups


def mini_batches(batch: PPOBatch, rows: int, rng: np.random.Generator,
                 length_multiple: int = 0) -> list[PPOBatch]:
    """Shuffles the rows that carry a loss and cuts them into mini-batches of ``rows`` rows;
    the last one is padded with rows that carry none.

    With ``length_multiple > 0`` rows of similar length go together (mini-batches in random
    order), each mini-batch cut to the bucketed width of its longest row, so the update
    computes on far fewer padding tokens; a handful of widths compile.
    """
    carries = np.flatnonzero(_carries(batch))
    empty = np.flatnonzero(~np.isin(np.arange(np.shape(batch.tokens)[0]), carries))
    width = np.shape(batch.tokens)[1]
    if length_multiple > 0:
        groups = length_groups(row_lengths(batch.valid)[carries], rows, length_multiple, width, rng)
        groups = [(carries[index], cut) for index, cut in groups]
        groups = [groups[i] for i in rng.permutation(len(groups))]
    else:
        order = rng.permutation(carries)
        groups = [(order[start: start + rows], width) for start in range(0, max(len(order), 1), rows)]
    out = []
    for chosen, cut in groups:
        index = np.concatenate([chosen, np.resize(empty if empty.size else carries, rows - len(chosen))])
        part = jax.tree.map(lambda x: np.asarray(x)[index], batch)
        if cut < width:
            part = _cut_width(part, cut)
        if len(chosen) < rows:  # padding rows: no loss, no value loss
            keep = np.arange(rows) < len(chosen)
            part = part._replace(loss_mask=part.loss_mask & keep[:, None],
                                 value_mask=part.value_mask & keep.reshape((-1,) + (1,) * (part.value_mask.ndim - 1)))
        out.append(part)
    return out


def _cut_width(batch: PPOBatch, width: int) -> PPOBatch:
    """The first ``width`` positions of every ``[N, L, ...]`` array (value reads lie inside)."""
    per_token = ("tokens", "valid", "loss_mask", "advantages", "old_logp", "ref_logp",
                 "allowed_mode", "allowed_ids", "positions")
    return batch._replace(**{name: getattr(batch, name)[:, :width] for name in per_token
                             if getattr(batch, name) is not None})


def token_counts(mini: PPOBatch) -> dict[str, float]:
    """Tokens of a host mini-batch: ``real_tokens`` (valid tokens of the rows that carry a loss
    or a value loss), their ``real_attention_pairs`` (sum of squared segment lengths: each token
    attends to its segment, a whole row unless packed) and ``computed_tokens`` (every position
    the step computes, ``N * L``)."""
    valid = np.asarray(mini.valid)
    lengths = segment_lengths(valid[_carries(mini)]).astype(np.float64)
    return {"real_tokens": float(lengths.sum()), "real_attention_pairs": float(np.square(lengths).sum()),
            "computed_tokens": float(valid.size)}


def ppo_update(state: TrainState, batch: PPOBatch, rng: np.random.Generator, *,
               config: qwen2.Qwen2Config, ppo: PPOConfig, actor_tx, critic_tx,
               mesh=None, text_mask=None, frozen=None) -> tuple[TrainState, dict]:
    """``ppo.epochs`` passes over ``batch`` in shuffled mini-batches of ``ppo.mini_batch_rows``
    rows, one :func:`ppo_step` each; returns the new state and the metrics averaged over steps,
    with the steps' :func:`token_counts` summed over all of them.

    Every step has the same shape, so the update compiles once per token length. With a
    ``mesh`` (one process or several, each holding the whole batch), each host mini-batch goes
    in with its rows split over the mesh's batch axes
    (:func:`hiper_jax.distributed.place_rows`) and the step runs under the mesh, so the model's
    activation hints apply; without one, :func:`jax.device_put`. ``text_mask [V]``: the
    grammar's, for a batch sampled with a constraint. ``frozen``: see :func:`ppo_step`.

    With ``ppo.pack_rows`` the turn rows are first packed into rows of ``ppo.pack_length`` (or
    the batch's width; :func:`~hiper_jax.train.row_packing.pack_ppo_batch`); an epoch then takes
    about as many steps as unpacked (:func:`~hiper_jax.train.row_packing.packed_rows_per_step`),
    each over packed rows, in micro-batches of at most about as many tokens
    (:func:`~hiper_jax.train.row_packing.packed_micro_rows`).
    """
    check_ppo_batch(batch)
    check_batch_matches(batch, config)
    if ppo.pack_rows and is_vision(config):
        raise ValueError("packed rows (ppo.pack_rows) are not supported for a Qwen2.5-VL policy")
    place = jax.device_put if mesh is None else functools.partial(distributed.place_rows, mesh=mesh)
    rows, length_multiple = ppo.mini_batch_rows, ppo.length_multiple
    if ppo.pack_rows:
        batch, plan = pack_ppo_batch(batch, ppo.pack_length or None)
        micro = packed_micro_rows(ppo.micro_batch_rows, plan.source_width, plan.width)
        rows = packed_rows_per_step(plan.num_rows, plan.source.size, rows, micro)
        ppo = dataclasses.replace(ppo, micro_batch_rows=micro)
        length_multiple = 0  # packed rows are full: nothing to gain from grouping by length
    history, counts = [], []
    for _ in range(ppo.epochs):
        for mini in mini_batches(batch, rows, rng, length_multiple):
            counts.append(token_counts(mini))
            with distributed.on_mesh(mesh):
                state, metrics = ppo_step(state, place(mini), text_mask, frozen, config=config, ppo=ppo,
                                          actor_tx=actor_tx, critic_tx=critic_tx)
            history.append(metrics)
    means = {k: float(np.max([float(m[k]) for m in history]) if k.startswith("max_") else
                      np.mean([float(m[k]) for m in history])) for k in history[0]}
    # The first step runs at the parameters that sampled the batch: its log-ratio is the
    # sampler-vs-learner mismatch (when the old log-probs are the sampler's).
    means["first_step_abs_log_ratio"] = float(history[0]["abs_log_ratio"])
    means["first_step_max_abs_log_ratio"] = float(history[0]["max_abs_log_ratio"])
    means["steps"] = len(history)
    means.update({k: float(sum(c[k] for c in counts)) for k in counts[0]})
    return state, means
