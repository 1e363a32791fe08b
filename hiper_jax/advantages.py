"""Advantage estimators under one per-turn contract, and a registry that picks one by name.

Every estimator maps a :class:`TurnBatch` (``[B, T]`` arrays) to an :class:`~hiper_jax.hae.HAEOutput`
so the trainer spreads advantages onto tokens the same way whatever the estimator:

* ``hae``: Hierarchical Advantage Estimation (:func:`hiper_jax.hae.compute_hae`).
* ``turn_gae``: flat credit, GAE over turns with one value per turn (the low head). Every
  block of a response (switch, subgoal, action) gets the same turn advantage.
* ``grpo``: group-normalised episode return (several rollouts per task, ``group_ids``).
* ``rloo``: episode return minus the leave-one-out mean of its group.

Flat estimators mark every real turn in ``boundary`` (each turn's subgoal tokens get credit)
and set ``adv_low = adv_high = adv_term``. Which value heads they train is in
:attr:`EstimatorSpec.value_heads`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from hiper_jax.hae import (
    HAEConfig,
    HAEOutput,
    as_flags,
    check_turn_arrays,
    compute_hae,
    hae_scan,
    masked_float32,
    masked_standardize,
    shape_rewards,
)

Array = jax.Array


class TurnBatch(NamedTuple):
    """Per-turn inputs of an estimator, each ``[B, T]`` (``group_ids``: ``[B]`` int).

    ``values_term``, ``invalid``, ``keep_changed`` and ``group_ids`` may be None;
    ``group_ids`` is required by ``grpo`` and ``rloo`` (rollouts of the same task share an id
    in ``[0, B)``).
    """

    rewards: Array
    values_low: Array
    values_high: Array
    switch: Array
    dones: Array
    mask: Array
    values_term: Optional[Array] = None
    invalid: Optional[Array] = None
    keep_changed: Optional[Array] = None
    group_ids: Optional[Array] = None


def turn_gae(
    rewards: Array,
    values: Array,
    dones: Array,
    mask: Array,
    gamma: float,
    lam: float,
    bootstrap_truncated: bool = False,
) -> tuple[Array, Array]:
    """Flat turn-level GAE: one value per turn, no segments.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` (``V_{T}`` is 0 when done, ``V_{T-1}`` when
    truncated and ``bootstrap_truncated``, else 0); ``A_t = sum_j (gamma lam)^j delta_{t+j}``.

    Args:
      rewards, values, dones, mask: ``[B, T]``.
    Returns:
      ``(adv, ret)``, each ``[B, T]`` float32, 0 outside ``mask``.
    """
    check_turn_arrays(rewards=rewards, values=values, dones=dones, mask=mask)
    mask = jnp.asarray(mask) != 0
    v = masked_float32(values, mask)
    adv, _, _, _ = hae_scan(
        masked_float32(rewards, mask), v, v, jnp.zeros_like(mask), as_flags(dones, mask), mask,
        gamma, lam, 1.0, bootstrap_truncated,
    )
    adv = jnp.where(mask, adv, 0.0)
    return adv, jnp.where(mask, adv + v, 0.0)


def _group_stats(values: Array, group_ids: Array, present: Optional[Array] = None
                 ) -> tuple[Array, Array, Array]:
    """Per-row group count, sum and sum of squares over the rows that are ``present``;
    ``values``/``group_ids``/``present``: ``[B]`` (``present`` None: every row)."""
    num_segments = values.shape[0]
    weight = jnp.ones_like(values) if present is None else jnp.asarray(present, values.dtype)
    count = jax.ops.segment_sum(weight, group_ids, num_segments)[group_ids]
    total = jax.ops.segment_sum(weight * values, group_ids, num_segments)[group_ids]
    total_sq = jax.ops.segment_sum(weight * values * values, group_ids, num_segments)[group_ids]
    return count, total, total_sq


def grpo_advantages(returns: Array, group_ids: Array, eps: float = 1e-6,
                    present: Optional[Array] = None) -> Array:
    """GRPO: ``(R_i - mean_g) / (std_g + eps)`` with the unbiased group std (0 for a lone row).

    Args:
      returns: ``[B]`` episode returns.  group_ids: ``[B]`` ints in ``[0, B)``.
      present: ``[B]`` bool, rows that count in the group statistics (None: all); an episode
        lost to an env fault has no turns and must not pull its group's mean to 0.
    Returns:
      ``[B]`` float32 advantages.
    """
    returns = jnp.asarray(returns, jnp.float32)
    count, total, total_sq = _group_stats(returns, group_ids, present)
    mean = total / count
    var = jnp.maximum(total_sq - count * mean * mean, 0.0) / jnp.maximum(count - 1.0, 1.0)
    std = jnp.where(count > 1, jnp.sqrt(var), 0.0)
    return (returns - mean) / (std + eps)


def rloo_advantages(returns: Array, group_ids: Array, present: Optional[Array] = None) -> Array:
    """RLOO: ``R_i - mean_{j != i in group} R_j`` (0 for a lone row).

    Args:
      returns: ``[B]`` episode returns.  group_ids: ``[B]`` ints in ``[0, B)``.
      present: ``[B]`` bool, rows that count in the group statistics (None: all).
    Returns:
      ``[B]`` float32 advantages.
    """
    returns = jnp.asarray(returns, jnp.float32)
    count, total, _ = _group_stats(returns, group_ids, present)
    others_mean = (total - returns) / jnp.maximum(count - 1.0, 1.0)
    return jnp.where(count > 1, returns - others_mean, 0.0)


def _flat_output(adv: Array, ret: Array, mask: Array) -> HAEOutput:
    zeros = jnp.zeros_like(adv)
    return HAEOutput(adv_low=adv, ret_low=ret, adv_high=adv, ret_high=zeros, adv_term=adv,
                     ret_term=zeros, boundary=mask)


def _shaped(batch: TurnBatch, cfg: HAEConfig) -> tuple[Array, Array]:
    mask = jnp.asarray(batch.mask) != 0
    shaped = shape_rewards(batch.rewards, batch.switch, mask, cfg, invalid=batch.invalid,
                           keep_changed=batch.keep_changed)
    return shaped, mask


def _check(batch: TurnBatch, needs_groups: bool) -> None:
    fields = {k: v for k, v in batch._asdict().items() if k != "group_ids"}
    num_rows, _ = check_turn_arrays(**fields)
    if needs_groups:
        if batch.group_ids is None:
            raise ValueError("group_ids is required by group-based estimators (grpo, rloo)")
        if tuple(jnp.shape(batch.group_ids)) != (num_rows,):
            raise ValueError(
                f"group_ids must have shape [B]=({num_rows},), got {tuple(jnp.shape(batch.group_ids))}"
            )


def hae_estimator(batch: TurnBatch, cfg: HAEConfig, axis_name=None) -> HAEOutput:
    """``hae``: :func:`~hiper_jax.hae.compute_hae` on a :class:`TurnBatch`."""
    return compute_hae(
        batch.rewards, batch.values_low, batch.values_high, batch.values_term, batch.switch,
        batch.dones, batch.mask, cfg, invalid=batch.invalid, keep_changed=batch.keep_changed,
        axis_name=axis_name,
    )


def turn_gae_estimator(batch: TurnBatch, cfg: HAEConfig, axis_name=None) -> HAEOutput:
    """``turn_gae``: flat GAE on shaped rewards with the low value head, ``lam = cfg.lam_turn``."""
    _check(batch, needs_groups=False)
    return _turn_gae_jit(batch, cfg=cfg, axis_name=axis_name)


@functools.partial(jax.jit, static_argnames=("cfg", "axis_name"))
def _turn_gae_jit(batch: TurnBatch, *, cfg: HAEConfig, axis_name) -> HAEOutput:
    shaped, mask = _shaped(batch, cfg)
    adv, ret = turn_gae(shaped, batch.values_low, batch.dones, mask, cfg.gamma, cfg.lam_turn,
                        cfg.bootstrap_truncated)
    if cfg.normalize:
        adv = masked_standardize(adv, mask, axis_name)
    return _flat_output(adv, ret, mask)


def _episode_estimator(advantage_fn: Callable[[Array, Array], Array]):
    def estimator(batch: TurnBatch, cfg: HAEConfig, axis_name=None) -> HAEOutput:
        _check(batch, needs_groups=True)
        if axis_name is not None:
            raise ValueError("group-based estimators need whole groups: call them unsharded")
        return _episode_jit(batch, cfg=cfg, advantage_fn=advantage_fn)

    return estimator


@functools.partial(jax.jit, static_argnames=("cfg", "advantage_fn"))
def _episode_jit(batch: TurnBatch, *, cfg: HAEConfig, advantage_fn) -> HAEOutput:
    shaped, mask = _shaped(batch, cfg)
    returns = shaped.sum(axis=1)
    present = mask.any(axis=1)  # rows without turns (lost episodes, padding) join no group
    adv = jnp.where(mask, advantage_fn(returns, jnp.asarray(batch.group_ids), present=present)[:, None], 0.0)
    return _flat_output(adv, jnp.zeros_like(adv), mask)


@dataclasses.dataclass(frozen=True)
class EstimatorSpec:
    """An estimator and what the trainer needs to know about it.

    Attributes:
      fn: ``fn(batch: TurnBatch, cfg: HAEConfig, axis_name=None) -> HAEOutput``.
      value_heads: value heads trained on this estimator's returns (subset of low/high/term).
      needs_groups: whether several rollouts per task (``group_ids``) are required.
    """

    fn: Callable[..., HAEOutput]
    value_heads: tuple[str, ...]
    needs_groups: bool


ESTIMATORS: dict[str, EstimatorSpec] = {
    "hae": EstimatorSpec(hae_estimator, ("low", "high", "term"), needs_groups=False),
    "turn_gae": EstimatorSpec(turn_gae_estimator, ("low",), needs_groups=False),
    "grpo": EstimatorSpec(_episode_estimator(grpo_advantages), (), needs_groups=True),
    "rloo": EstimatorSpec(_episode_estimator(rloo_advantages), (), needs_groups=True),
}


def get_estimator(name: str) -> EstimatorSpec:
    """Looks up an estimator by config name; the error lists the known names."""
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown advantage estimator {name!r}; known: {sorted(ESTIMATORS)}") from None
