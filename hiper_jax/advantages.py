"""Advantage estimators under one per-turn contract, and a registry that picks one by name.

Every estimator maps a :class:`TurnBatch` (``[B, T]`` arrays) to an :class:`~hiper_jax.hae.HAEOutput`
so the trainer spreads advantages onto tokens the same way whatever the estimator:

* ``hae``: Hierarchical Advantage Estimation (:func:`hiper_jax.hae.compute_hae`).
* ``turn_gae``: flat credit, GAE over turns with one value per turn (the low head). Every
  block of a response (switch, subgoal, action) gets the same turn advantage.
* ``grpo``: group-normalised episode return (several rollouts per task, ``group_ids``).
* ``rloo``: episode return minus the leave-one-out mean of its group.
* ``gigpo``: GiGPO (Feng et al., arXiv 2505.10978): the group-normalised episode return plus,
  weighted, a step-level advantage that compares the discounted return of a turn with those of
  the other turns of its group that saw the same observation (its *anchor state*).

HAE ablations, each HAE with one part taken out (the study's ``hae`` minus one idea):

* ``hae_no_term``: the switch decision gets no termination-head credit (``adv_term = 0``; the
  term head is not trained).
* ``hae_no_keep_penalty``: HAE on rewards shaped without the keep and keep-consistency
  penalties, whatever the config says.
* ``hae_flat_subgoal``: subgoal tokens of segment starts get the flat turn-level GAE
  advantage of their turn instead of the segment-level (SMDP) one.

Flat estimators mark every real turn in ``boundary`` (each turn's subgoal tokens get credit)
and set ``adv_low = adv_high = adv_term``. Which value heads they train is in
:attr:`EstimatorSpec.value_heads`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

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
from hiper_jax.shapes import check_rank, check_shape, check_type
from hiper_jax.vocab import ESTIMATOR_NAMES, ESTIMATOR_TRAITS

Array = jax.Array


class TurnBatch(NamedTuple):
    """Per-turn inputs of an estimator, each ``[B, T]`` (``group_ids``: ``[B]`` int).

    ``values_term``, ``invalid``, ``keep_changed``, ``group_ids`` and ``state_ids`` may be None;
    ``group_ids`` is required by ``grpo``, ``rloo`` and ``gigpo`` (rollouts of the same task
    share an id in ``[0, B)``); ``state_ids`` (``[B, T]`` int) by ``gigpo``: turns of one group
    with equal ids saw the same observation (see :func:`anchor_state_ids`).
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
    state_ids: Optional[Array] = None


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
    check_type(float, rewards=rewards, values=values)
    mask = jnp.asarray(mask) != 0
    v = masked_float32(values, mask)
    adv, _, _, _ = hae_scan(
        masked_float32(rewards, mask), v, v, jnp.zeros_like(mask), as_flags(dones, mask), mask,
        gamma, lam, 1.0, bootstrap_truncated,
    )
    adv = jnp.where(mask, adv, 0.0)
    return adv, jnp.where(mask, adv + v, 0.0)


def check_groups(returns: Array, group_ids: Array, present: Optional[Array]) -> None:
    """``returns`` ``[B]`` float, ``group_ids`` ``[B]`` int, ``present`` ``[B]`` or None."""
    check_rank(1, "[B]", returns=returns)
    check_type(float, returns=returns)
    check_shape(jnp.shape(returns), "[B]", group_ids=group_ids, present=present)
    check_type(int, group_ids=group_ids)


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
    check_groups(returns, group_ids, present)
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
    check_groups(returns, group_ids, present)
    returns = jnp.asarray(returns, jnp.float32)
    count, total, _ = _group_stats(returns, group_ids, present)
    others_mean = (total - returns) / jnp.maximum(count - 1.0, 1.0)
    return jnp.where(count > 1, returns - others_mean, 0.0)


GIGPO_MODES = ("mean_norm", "mean_std_norm")


def discounted_returns(rewards: Array, gamma: float) -> Array:
    """``G_t = sum_{j >= t} gamma^(j - t) r_j`` along the last axis (no bootstrap).

    Args:
      rewards: ``[..., T]`` float, 0 on padding (real turns first, so padding adds nothing).
    Returns:
      ``[..., T]`` float32.
    """
    rewards = jnp.moveaxis(jnp.asarray(rewards, jnp.float32), -1, 0)

    def step(ret_next, r_t):
        ret = r_t + gamma * ret_next
        return ret, ret

    _, returns = jax.lax.scan(step, jnp.zeros_like(rewards[0]), rewards, reverse=True)
    return jnp.moveaxis(returns, 0, -1)


def _segment_normalize(x: Array, segments: Array, weight: Array, num_segments: int, remove_std: bool,
                       eps: float, lone_mean_zero: bool) -> Array:
    """``x - mean_s`` (or ``(x - mean_s) / (std_s + eps)``) over the members of each segment.

    ``x``, ``segments``, ``weight``: ``[N]``; members are the entries with ``weight``; std is
    the unbiased one. A segment of one member has std 1 and mean 0 (``lone_mean_zero``) or its
    own value. Sums are taken relative to a member's value, so a segment of equal values gets
    exactly 0 whatever the float rounding. Returns ``[N]``, 0 off ``weight``.
    """
    count = jax.ops.segment_sum(weight.astype(jnp.float32), segments, num_segments)[segments]
    shift = jax.ops.segment_max(jnp.where(weight, x, -jnp.inf), segments, num_segments)[segments]
    shift = jnp.where(count > 0, shift, 0.0)
    offset = jax.ops.segment_sum(jnp.where(weight, x - shift, 0.0), segments, num_segments)[segments]
    mean = shift + offset / jnp.maximum(count, 1.0)
    square = jax.ops.segment_sum(jnp.where(weight, jnp.square(x - mean), 0.0), segments, num_segments)
    std = jnp.sqrt(square[segments] / jnp.maximum(count - 1.0, 1.0))
    lone = count <= 1
    if lone_mean_zero:
        mean = jnp.where(lone, 0.0, mean)
    centred = x - mean
    if not remove_std:
        centred = centred / (jnp.where(lone, 1.0, std) + eps)
    return jnp.where(weight, centred, 0.0)


def _anchor_clusters(group_ids: Array, state_ids: Array, mask: Array) -> Array:
    """Dense ids ``[B, T]`` of the (group, state) pairs of real turns; padding turns get
    clusters of their own (group -1), so they never join a real one."""
    groups = jnp.where(mask, jnp.asarray(group_ids)[:, None], -1).ravel()
    states = jnp.where(mask, jnp.asarray(state_ids), 0).ravel()
    order = jnp.lexsort((states, groups))
    sorted_groups, sorted_states = groups[order], states[order]
    starts = jnp.concatenate([jnp.ones((1,), bool), (sorted_groups[1:] != sorted_groups[:-1])
                              | (sorted_states[1:] != sorted_states[:-1])])
    dense = jnp.cumsum(starts) - 1
    return jnp.zeros_like(dense).at[order].set(dense).reshape(mask.shape)


def gigpo_advantages(
    rewards: Array,
    mask: Array,
    group_ids: Array,
    state_ids: Array,
    gamma: float,
    step_weight: float = 1.0,
    mode: str = "mean_norm",
    eps: float = 1e-6,
) -> Array:
    """GiGPO's per-turn advantage ``A_t = A^E(episode) + step_weight * A^S_t``.

    Episode level (GiGPO eq. 3, with the statistics taken across the group's *turns*, as
    verl-agent's ``compute_mean_std_cross_steps``): every real turn of a trajectory contributes
    its episode return ``R = sum_t r_t``; ``A^E = R - mean_g`` (``mean_norm``) or
    ``(R - mean_g) / (std_g + eps)`` (``mean_std_norm``), unbiased std. A group with one turn
    in all keeps its raw return (mean 0, std 1).

    Step level (eqs. 5-7): ``G_t`` the discounted return from turn t (no bootstrap); turns of
    one group with equal ``state_ids`` form an anchor state; ``A^S_t = G_t - mean_anchor`` (or
    divided by ``std_anchor + eps``). A turn whose state no other turn of its group saw gets 0.

    Args:
      rewards: ``[B, T]`` (shaped) rewards.  mask: ``[B, T]`` real turns first.
      group_ids: ``[B]`` ints in ``[0, B)``.  state_ids: ``[B, T]`` ints.
      gamma: discount of the step returns.  step_weight: weight of the step-level term.
      mode: ``"mean_norm"`` (GiGPO's default) or ``"mean_std_norm"``.
    Returns:
      ``[B, T]`` float32, 0 outside ``mask``. Jittable and vmappable.
    """
    if mode not in GIGPO_MODES:
        raise ValueError(f"GiGPO mode must be one of {GIGPO_MODES}, got {mode!r}")
    num_rows, _ = check_turn_arrays(rewards=rewards, mask=mask, state_ids=state_ids)
    check_type(float, rewards=rewards)
    check_type(int, state_ids=state_ids)
    check_shape((num_rows,), "[B]", group_ids=group_ids)
    check_type(int, group_ids=group_ids)
    remove_std = mode == "mean_norm"
    mask = jnp.asarray(mask) != 0
    rewards = masked_float32(rewards, mask)
    num_rows, num_turns = mask.shape
    group_ids = jnp.asarray(group_ids)
    episode_return = jnp.broadcast_to(rewards.sum(axis=1, keepdims=True), mask.shape)
    episode = _segment_normalize(
        episode_return.ravel(), jnp.broadcast_to(group_ids[:, None], mask.shape).ravel(), mask.ravel(),
        num_rows, remove_std, eps, lone_mean_zero=True)
    clusters = _anchor_clusters(group_ids, state_ids, mask)
    step = _segment_normalize(discounted_returns(rewards, gamma).ravel(), clusters.ravel(), mask.ravel(),
                              num_rows * num_turns, remove_std, eps, lone_mean_zero=False)
    return (episode + step_weight * step).reshape(mask.shape)


def anchor_state_ids(
    observations: Sequence[Sequence[str]],
    group_ids: Sequence[int],
    num_turns: int,
    similarity: float = 1.0,
) -> np.ndarray:
    """GiGPO's anchor states as integer ids ``[B, T]`` (-1 on padding), built on the host.

    Turn t of trajectory b saw ``observations[b][t]`` (the env observation its prompt showed,
    without history). With ``similarity == 1`` two turns of one group share an id exactly when
    their observations are equal. With ``similarity < 1`` (verl-agent's ``enable_similarity``)
    a group's turns are clustered greedily in trajectory-major order: a turn joins the first
    cluster whose first member's text has ``difflib`` ratio >= ``similarity`` with its own,
    else opens a cluster.

    Args:
      observations: per trajectory, one string per turn (``len(observations[b]) <= num_turns``).
      group_ids: ``[B]`` group of each trajectory.
      num_turns: T.
      similarity: in (0, 1].
    """
    if not 0.0 < similarity <= 1.0:
        raise ValueError(f"GiGPO similarity must be in (0, 1], got {similarity}")
    if len(observations) != len(group_ids):
        raise ValueError(f"{len(observations)} observation lists for {len(group_ids)} group ids")
    ids = np.full((len(observations), num_turns), -1, np.int32)
    exact: dict[tuple[int, str], int] = {}
    firsts: dict[int, list[tuple[str, int]]] = {}  # group -> (first member's text, id) per cluster
    num_clusters = 0
    for b, (texts, group) in enumerate(zip(observations, group_ids)):
        if len(texts) > num_turns:
            raise ValueError(f"trajectory {b} has {len(texts)} observations, more than num_turns={num_turns}")
        for t, text in enumerate(texts):
            if similarity == 1.0:
                key = (int(group), text)
                if key not in exact:
                    exact[key], num_clusters = num_clusters, num_clusters + 1
                ids[b, t] = exact[key]
                continue
            clusters = firsts.setdefault(int(group), [])
            found = next((cluster_id for first, cluster_id in clusters
                          if difflib.SequenceMatcher(None, text, first).ratio() >= similarity), None)
            if found is None:
                found, num_clusters = num_clusters, num_clusters + 1
                clusters.append((text, found))
            ids[b, t] = found
    return ids


def _flat_output(adv: Array, ret: Array, mask: Array) -> HAEOutput:
    zeros = jnp.zeros_like(adv)
    return HAEOutput(adv_low=adv, ret_low=ret, adv_high=adv, ret_high=zeros, adv_term=adv,
                     ret_term=zeros, boundary=mask)


def _shaped(batch: TurnBatch, cfg: HAEConfig) -> tuple[Array, Array]:
    mask = jnp.asarray(batch.mask) != 0
    shaped = shape_rewards(batch.rewards, batch.switch, mask, cfg, invalid=batch.invalid,
                           keep_changed=batch.keep_changed)
    return shaped, mask


def _check(batch: TurnBatch, needs_groups: bool, needs_states: bool = False) -> None:
    """Shapes and dtypes of a :class:`TurnBatch` and the fields the estimator needs; raises
    ValueError naming the field."""
    fields = {k: v for k, v in batch._asdict().items() if k != "group_ids"}
    num_rows, _ = check_turn_arrays(**fields)
    check_type(float, rewards=batch.rewards, values_low=batch.values_low,
               values_high=batch.values_high, values_term=batch.values_term)
    check_type(int, state_ids=batch.state_ids)
    if needs_states and batch.state_ids is None:
        raise ValueError("state_ids [B, T] is required by gigpo (anchor_state_ids builds it)")
    if needs_groups:
        if batch.group_ids is None:
            raise ValueError("group_ids is required by group-based estimators (grpo, rloo, gigpo)")
        check_shape((num_rows,), "[B]", group_ids=batch.group_ids)
        check_type(int, group_ids=batch.group_ids)


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


def hae_no_term_estimator(batch: TurnBatch, cfg: HAEConfig, axis_name=None) -> HAEOutput:
    """``hae_no_term``: HAE without the termination advantage.

    Every field is :func:`hae_estimator`'s except ``adv_term``, which is 0 on every turn
    (``[B, T]``): switch tokens carry no policy-gradient signal, so the SWITCH/KEEP decision
    is only moved by the entropy and KL terms and by parameters it shares with the other
    blocks. The term head is not trained (its spec lists only the low and high heads).
    """
    out = hae_estimator(batch, cfg, axis_name)
    return out._replace(adv_term=jnp.zeros_like(out.adv_term))


def hae_no_keep_penalty_estimator(batch: TurnBatch, cfg: HAEConfig, axis_name=None) -> HAEOutput:
    """``hae_no_keep_penalty``: HAE with ``keep_penalty`` and ``keep_consistency_penalty``
    forced to 0 (the invalid-action penalty and every other setting stay as in ``cfg``).

    Returns :class:`~hiper_jax.hae.HAEOutput`, fields ``[B, T]``.
    """
    return hae_estimator(batch, dataclasses.replace(cfg, keep_penalty=0.0, keep_consistency_penalty=0.0),
                         axis_name)


def hae_flat_subgoal_estimator(batch: TurnBatch, cfg: HAEConfig, axis_name=None) -> HAEOutput:
    """``hae_flat_subgoal``: HAE whose subgoal credit is flat.

    At segment starts (``boundary``, ``[B, T]``) ``adv_high`` is the flat turn-level GAE
    advantage of that turn (:func:`turn_gae` on the shaped rewards with the low head,
    ``lam = cfg.lam_turn``; standardised over ``boundary`` when ``cfg.normalize``, as HAE's
    high stream is) instead of HAE's SMDP advantage over segments; 0 elsewhere. Action and
    switch credit and every return (so every value target) stay HAE's: the high head still
    learns the segment values that the low level bootstraps from.
    """
    _check(batch, needs_groups=False)
    return _hae_flat_subgoal_jit(batch, cfg=cfg, axis_name=axis_name)


@functools.partial(jax.jit, static_argnames=("cfg", "axis_name"))
def _hae_flat_subgoal_jit(batch: TurnBatch, *, cfg: HAEConfig, axis_name) -> HAEOutput:
    out = hae_estimator(batch, cfg, axis_name)
    shaped, mask = _shaped(batch, cfg)
    flat, _ = turn_gae(shaped, batch.values_low, batch.dones, mask, cfg.gamma, cfg.lam_turn,
                       cfg.bootstrap_truncated)
    if cfg.normalize:
        flat = masked_standardize(flat, out.boundary, axis_name)
    return out._replace(adv_high=jnp.where(out.boundary, flat, 0.0))


@dataclasses.dataclass(frozen=True)
class GiGPOConfig:
    """Options of the ``gigpo`` estimator (verl-agent's ``algorithm.gigpo``).

    Attributes:
      step_weight: weight of the step-level advantage (``step_advantage_w``).
      mode: ``"mean_norm"`` (no std, the default) or ``"mean_std_norm"``.
      epsilon: added to the std in ``mean_std_norm``.
    """

    step_weight: float = 1.0
    mode: str = "mean_norm"
    epsilon: float = 1e-6

    def __post_init__(self):
        if self.mode not in GIGPO_MODES:
            raise ValueError(f"GiGPOConfig.mode must be one of {GIGPO_MODES}, got {self.mode!r}")
        for name in ("step_weight", "epsilon"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
                raise ValueError(f"GiGPOConfig.{name} must be a finite number, got {value!r}")


def gigpo_estimator(batch: TurnBatch, cfg: HAEConfig, axis_name=None,
                    options: GiGPOConfig = GiGPOConfig()) -> HAEOutput:
    """``gigpo``: :func:`gigpo_advantages` of the shaped rewards with ``gamma = cfg.gamma``
    (``cfg.normalize`` does not apply: GiGPO normalises within groups)."""
    _check(batch, needs_groups=True, needs_states=True)
    if axis_name is not None:
        raise ValueError("group-based estimators need whole groups: call them unsharded")
    return _gigpo_jit(batch, cfg=cfg, options=options)


@functools.partial(jax.jit, static_argnames=("cfg", "options"))
def _gigpo_jit(batch: TurnBatch, *, cfg: HAEConfig, options: GiGPOConfig) -> HAEOutput:
    shaped, mask = _shaped(batch, cfg)
    adv = gigpo_advantages(shaped, mask, batch.group_ids, batch.state_ids, cfg.gamma,
                           options.step_weight, options.mode, options.epsilon)
    return _flat_output(adv, jnp.zeros_like(adv), mask)


@dataclasses.dataclass(frozen=True)
class EstimatorSpec:
    """An estimator and what the trainer needs to know about it.

    Attributes:
      fn: ``fn(batch: TurnBatch, cfg: HAEConfig, axis_name=None) -> HAEOutput``.
      value_heads: value heads trained on this estimator's returns (subset of low/high/term).
      needs_groups: whether several rollouts per task (``group_ids``) are required.
      needs_states: whether per-turn observation identities (``state_ids``) are required.
      options: the frozen dataclass of the estimator's own options, if it has any.
    """

    fn: Callable[..., HAEOutput]
    value_heads: tuple[str, ...]
    needs_groups: bool
    needs_states: bool = False
    options: Optional[type] = None


_FUNCTIONS: dict[str, Callable[..., HAEOutput]] = {
    "hae": hae_estimator,
    "turn_gae": turn_gae_estimator,
    "grpo": _episode_estimator(grpo_advantages),
    "rloo": _episode_estimator(rloo_advantages),
    "gigpo": gigpo_estimator,
    "hae_no_term": hae_no_term_estimator,
    "hae_no_keep_penalty": hae_no_keep_penalty_estimator,
    "hae_flat_subgoal": hae_flat_subgoal_estimator,
}
_OPTIONS: dict[str, type] = {"gigpo": GiGPOConfig}
if set(_FUNCTIONS) != set(ESTIMATOR_TRAITS):
    raise ImportError(f"estimator functions {sorted(_FUNCTIONS)} and names {ESTIMATOR_NAMES} differ")
# Names and what each needs: hiper_jax.vocab.ESTIMATOR_TRAITS (read by the config without JAX).
ESTIMATORS: dict[str, EstimatorSpec] = {
    name: EstimatorSpec(_FUNCTIONS[name], traits.value_heads, traits.needs_groups, traits.needs_states,
                        _OPTIONS.get(name))
    for name, traits in ESTIMATOR_TRAITS.items()
}


def get_estimator(name: str, **options) -> EstimatorSpec:
    """Looks up an estimator by config name; the error lists the known names.

    ``options`` (e.g. ``step_weight=0.5`` for ``gigpo``) are bound into the returned spec's
    ``fn``; an estimator without options, or an unknown option, is an error.
    """
    try:
        spec = ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown advantage estimator {name!r}; known: {sorted(ESTIMATORS)}") from None
    if not options:
        return spec
    if spec.options is None:
        raise ValueError(f"advantage estimator {name!r} takes no options, got {sorted(options)}")
    known = {f.name for f in dataclasses.fields(spec.options)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for estimator {name!r}; known: {sorted(known)}")
    return dataclasses.replace(spec, fn=functools.partial(spec.fn, options=spec.options(**options)))
