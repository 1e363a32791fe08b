"""Trajectories -> log-probs and values -> advantages -> PPO batch: the stage between the
collector and the update.

:func:`build_ppo_batch` runs it in four steps, each a function of its own:

1. :func:`model_passes`: the actor's log-probs and the critic's values of every token row
   ``[N, L]`` (and the reference policy's log-probs when the loss has a KL term), in chunks
   of rows (:func:`chunked`);
2. :func:`turn_batch`: the per-row values ``[N, 3]`` (low, high, term) scattered onto the
   per-turn grid ``[B, T]`` the estimators read (:class:`~hiper_jax.advantages.TurnBatch`);
3. :func:`estimate`: the estimator's per-turn output, spread back onto the tokens
   (:func:`~hiper_jax.hae.assign_token_advantages`);
4. :func:`assemble`: the :class:`~hiper_jax.train.ppo.PPOBatch` (value targets, masks) and
   its statistics.

Inputs and outputs are typed (:class:`BatchSettings`, :class:`Passes`, :class:`BuiltBatch`);
no config object reaches this module (:func:`hiper_jax.train.config.batch_settings` makes the
settings from one).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import jax
import numpy as np

from hiper_jax import distributed
from hiper_jax.advantages import EstimatorSpec, TurnBatch, anchor_state_ids, get_estimator
from hiper_jax.agent.grammar import forced_tokens
from hiper_jax.hae import HAEConfig, HAEOutput, assign_token_advantages
from hiper_jax.models import qwen2
from hiper_jax.rollout.packing import TokenArrays, TurnArrays, pack_tokens, pack_turns
from hiper_jax.rollout.types import Trajectory
from hiper_jax.train.row_packing import packed_pass
from hiper_jax.train.ppo import PPOBatch, TrainState, length_groups, logprob_pass, logprob_value_pass, row_lengths


@dataclasses.dataclass(frozen=True)
class BatchSettings:
    """How a batch is built.

    Attributes:
      estimator: the advantage estimator's name (:data:`hiper_jax.advantages.ESTIMATORS`).
      estimator_options: its keyword options (e.g. GiGPO's ``step_weight``).
      max_turns: turns per episode at most (the per-turn grid's ``T``).
      rows: rows per chunk of the passes; the token rows are padded to a multiple of it.
      length_multiple: token widths are padded to multiples of this.
      group_by_length: rows of similar length share a chunk, cut to its bucketed width.
      temperature: the sampling temperature the log-probs are taken at (0 counts as 1).
      reference_pass: run the reference policy's pass (the loss has a KL term).
      gigpo_similarity: GiGPO's anchor-state similarity threshold.
      pack_rows: run the passes on packed rows (several turns per row,
        :func:`hiper_jax.train.row_packing.packed_pass`); ``pack_length`` their width (0: the
        batch's length bucket).
      old_logp: ``"recompute"`` (the actor's pass gives the old log-probs) or ``"sampler"``
        (the sampler's log-probs are the old log-probs; the pass runs only for the critic's
        values, and not at all for a critic-free estimator).
    """

    estimator: str
    max_turns: int
    rows: int
    length_multiple: int
    group_by_length: bool = True
    temperature: float = 1.0
    reference_pass: bool = True
    gigpo_similarity: float = 1.0
    pack_rows: bool = False
    pack_length: int = 0
    old_logp: str = "recompute"
    estimator_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def estimator_spec(self) -> EstimatorSpec:
        return get_estimator(self.estimator, **dict(self.estimator_options))


class Passes(NamedTuple):
    """Per-token log-probs ``[N, L]`` (actor at sampling time, reference) and per-row values
    ``[N, 3]`` (low, high, term heads; zeros for an estimator without a critic)."""

    old_logp: np.ndarray
    ref_logp: np.ndarray
    values: np.ndarray


class BuiltBatch(NamedTuple):
    """What :func:`build_ppo_batch` returns: the update's batch, the per-turn arrays it came
    from, the estimator's output (``[B, T]`` arrays) and statistics (``passes_s`` and
    ``advantages_s``: the seconds of the passes and of the estimator with token assignment)."""

    batch: PPOBatch
    turns: TurnArrays
    estimate: HAEOutput
    stats: dict[str, float]


def chunked(fn, token_arrays: tuple, row_arrays: tuple, rows: int, mesh=None, length_multiple: int = 0,
            per_token: tuple[bool, ...] = (True,)) -> tuple[np.ndarray, ...]:
    """Applies a jitted row-wise ``fn(*token_arrays, *row_arrays)`` in chunks of ``rows`` rows.

    ``token_arrays`` are ``[N, L, ...]`` (the second is ``valid``), ``row_arrays`` ``[N, ...]``;
    ``fn`` returns a tuple whose outputs are per token (``[rows, L_c, ...]``) or per row where
    ``per_token`` says so. Only rows with real tokens are computed; with ``length_multiple > 0``
    rows of similar length go together, each chunk cut to the bucketed width of its longest row
    (a few compiled shapes, little padding), and per-token outputs are padded back to ``L``
    (zeros elsewhere, as for padding rows).

    With a ``mesh`` (one or several processes, every process holding the same arrays), each
    chunk goes in as global arrays split over the mesh's batch axes
    (:func:`hiper_jax.distributed.place_rows`), ``fn`` runs under the mesh (its activation
    hints apply), and the results come back whole on every process.
    """
    num_rows, width = token_arrays[0].shape[:2]
    lengths = row_lengths(token_arrays[1])
    real = np.flatnonzero(lengths > 0)
    if length_multiple > 0:
        groups = [(real[index], cut) for index, cut in length_groups(lengths[real], rows, length_multiple, width)]
    else:
        groups = [(real[i: i + rows], width) for i in range(0, len(real), rows)]
    outs = None
    for index, cut in groups:
        full = np.resize(index, rows)  # the last chunk repeats rows to keep the compiled shape
        chunk = tuple(a[full][:, :cut] for a in token_arrays) + tuple(a[full] for a in row_arrays)
        if mesh is not None:
            with distributed.on_mesh(mesh):
                results = distributed.gather_to_all_hosts(fn(*distributed.place_rows(chunk, mesh)))
        else:
            results = jax.tree.map(np.asarray, fn(*chunk))
        if outs is None:
            outs = tuple(np.zeros((num_rows, width) + r.shape[2:] if tok else (num_rows,) + r.shape[1:], r.dtype)
                         for r, tok in zip(results, per_token))
        for out, result, tok in zip(outs, results, per_token):
            if tok:
                out[index, :cut] = result[: len(index)]
            else:
                out[index] = result[: len(index)]
    return outs


def value_reads(tokens: TokenArrays) -> np.ndarray:
    """``[N, 3]`` int32: the positions each row's low, high and term heads read."""
    return np.stack([tokens.v_low_read, tokens.v_high_read, tokens.v_term_read], axis=1)


def model_passes(tokens: TokenArrays, state: TrainState, ref_params, model_config: qwen2.Qwen2Config,
                 settings: BatchSettings, uses_critic: bool, mesh=None,
                 text_mask: Optional[np.ndarray] = None) -> Passes:
    """The actor's log-probs and critic's values of the token rows (one chunked pass) and,
    with ``settings.reference_pass``, the reference policy's log-probs (else zeros). Without a
    critic (``uses_critic`` False) only log-probs are computed and the values are zeros. With
    ``settings.old_logp == "sampler"`` the old log-probs are the sampler's (``tokens.old_logp``)
    and the actor's pass runs only when the critic's values are needed.
    ``text_mask``: the grammar's, when the rows were sampled with a constraint (the log-probs
    are then those of the constrained distribution)."""
    rows = settings.rows
    temperature = settings.temperature or 1.0
    arrays = (tokens.tokens, tokens.valid)
    if tokens.allowed_mode is not None:
        arrays += (tokens.allowed_mode, tokens.allowed_ids)
    multiple = settings.length_multiple if settings.group_by_length else 0
    reads = value_reads(tokens)

    def allowed_of(allowed: tuple):
        return qwen2.AllowedTokens(*allowed, text_mask) if allowed else None

    def old_pass(t, v, *rest):
        *allowed, r = rest
        if not uses_critic:
            return logprob_pass(state.actor, model_config, t, v, temperature, allowed_of(allowed)), r
        return logprob_value_pass(state.actor, state.critic, model_config, t, v, r, temperature,
                                  allowed_of(allowed))

    def ref_pass(t, v, *allowed):
        return (logprob_pass(ref_params, model_config, t, v, temperature, allowed_of(allowed)),)

    run = functools.partial(chunked, rows=rows, mesh=mesh, length_multiple=multiple)
    if settings.pack_rows:
        run = packed_pass(run, tokens.valid, settings.pack_length or None)
    if settings.old_logp == "sampler" and not uses_critic:
        old_logp, values = tokens.old_logp, np.zeros(reads.shape, np.float32)
    else:
        old_logp, values = run(old_pass, arrays, (reads,), per_token=(True, False))
        if not uses_critic:
            values = np.zeros(reads.shape, np.float32)
        if settings.old_logp == "sampler":
            old_logp = tokens.old_logp
    # Without a KL term the reference policy is never used: skip its pass.
    ref_logp = run(ref_pass, arrays, ())[0] if settings.reference_pass else np.zeros_like(old_logp)
    return Passes(old_logp, ref_logp, values)


def turn_observations(trajectories: Sequence[Trajectory]) -> list[list[str]]:
    """The env observation each turn's prompt showed (its view's), per trajectory."""
    return [[t.view.observation if t.view is not None else "" for t in traj.turns] for traj in trajectories]


def turn_batch(turns: TurnArrays, tokens: TokenArrays, values: np.ndarray,
               state_ids: Optional[np.ndarray] = None) -> TurnBatch:
    """The estimator's input: the per-row ``values`` ``[N, 3]`` scattered onto the turn grid
    ``[B, T]`` (one token row per turn) beside the per-turn arrays."""
    valid_rows = tokens.row_valid
    values_bt = np.zeros(turns.mask.shape + (3,), np.float32)
    values_bt[tokens.traj_index[valid_rows], tokens.turn_index[valid_rows]] = values[valid_rows]
    return TurnBatch(
        rewards=turns.rewards, values_low=values_bt[..., 0], values_high=values_bt[..., 1],
        switch=turns.switch, dones=turns.dones, mask=turns.mask, values_term=values_bt[..., 2],
        invalid=turns.invalid, keep_changed=turns.keep_changed, group_ids=turns.group_ids,
        state_ids=state_ids)


def run_estimator(spec: EstimatorSpec, batch: TurnBatch, hae_cfg: HAEConfig, mesh=None) -> HAEOutput:
    """The estimator's output as NumPy. On a mesh with several batch shards, HAE and turn-GAE
    run under ``shard_map`` with trajectories split over the batch axes (normalisation
    statistics reduced across devices); GRPO/RLOO/GiGPO need whole groups and run unsharded."""
    shards = distributed.num_batch_shards(mesh) if mesh is not None else 1
    rows = np.shape(batch.rewards)[0]
    if shards == 1 or spec.needs_groups or rows % shards:
        return jax.tree.map(np.asarray, spec.fn(batch, hae_cfg))
    placed = distributed.place_rows(batch, mesh)
    return distributed.gather_to_all_hosts(distributed.sharded_estimator(spec.fn, mesh)(placed, hae_cfg))


def token_advantages(out: HAEOutput, tokens: TokenArrays) -> np.ndarray:
    """``[N, L]``: each token's advantage from its turn's (action, subgoal or switch block)."""
    return np.asarray(assign_token_advantages(out, tokens.traj_index, tokens.turn_index,
                                              tokens.action_mask, tokens.subgoal_mask,
                                              tokens.switch_mask))


def logp_mismatch(sampled: np.ndarray, recomputed: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """|sampler log-prob - learner log-prob| per response token (``[N, L]`` arrays): mean and
    max. Far from 0, the update trains a distribution other than the one that sampled."""
    diff = np.abs(np.asarray(sampled) - np.asarray(recomputed))[mask]
    return {"logp_mismatch_mean": float(diff.mean()) if diff.size else 0.0,
            "logp_mismatch_max": float(diff.max()) if diff.size else 0.0}


def assemble(tokens: TokenArrays, passes: Passes, out: HAEOutput, advantages: np.ndarray,
             value_heads: Sequence[str], recomputed: bool = True) -> tuple[PPOBatch, dict[str, float]]:
    """The :class:`PPOBatch` (per-row value targets ``[N, 3]`` from the estimator's returns,
    masks of the trained heads and loss tokens) and its statistics; the sampler-vs-learner
    log-prob mismatch among them when the old log-probs were ``recomputed`` (else the update's
    first step measures it)."""
    valid_rows = tokens.row_valid
    blocks = tokens.action_mask | tokens.subgoal_mask | tokens.switch_mask
    b, t = tokens.traj_index, tokens.turn_index
    targets = np.stack([np.asarray(out.ret_low)[b, t], np.asarray(out.ret_high)[b, t],
                        np.asarray(out.ret_term)[b, t]], axis=1).astype(np.float32)
    boundary = np.asarray(out.boundary)[b, t]
    value_mask = np.stack([valid_rows & ("low" in value_heads),
                           valid_rows & boundary & ("high" in value_heads),
                           valid_rows & ("term" in value_heads)], axis=1)
    loss_mask = blocks & tokens.response_mask
    if tokens.allowed_mode is not None:
        # A token the grammar forced is no decision: its log-prob is 0 under every policy, so
        # it would only dilute the token means of the loss.
        loss_mask &= ~forced_tokens(tokens.allowed_mode, tokens.allowed_ids)
    values = passes.values
    batch = PPOBatch(tokens=tokens.tokens, valid=tokens.valid, loss_mask=loss_mask,
                     advantages=advantages.astype(np.float32), old_logp=passes.old_logp,
                     ref_logp=passes.ref_logp, value_read=value_reads(tokens).astype(np.int32),
                     value_targets=targets, old_values=values.astype(np.float32), value_mask=value_mask,
                     allowed_mode=tokens.allowed_mode, allowed_ids=tokens.allowed_ids)
    adv_tokens = advantages[batch.loss_mask]
    stats = {"batch_rows": float(valid_rows.sum()), "batch_tokens": float(tokens.valid.sum()),
             "token_length": float(tokens.tokens.shape[1]),
             "advantage_mean": float(adv_tokens.mean()) if adv_tokens.size else 0.0,
             "advantage_std": float(adv_tokens.std()) if adv_tokens.size else 0.0,
             "value_mean": float(values[valid_rows, 0].mean()) if valid_rows.any() else 0.0}
    if recomputed:
        stats.update(logp_mismatch(tokens.old_logp, passes.old_logp, tokens.response_mask))
    return batch, stats


def build_ppo_batch(trajectories: Sequence[Trajectory], state: TrainState, ref_params,
                    model_config: qwen2.Qwen2Config, settings: BatchSettings, hae_cfg: HAEConfig,
                    pad_id: int, mesh=None, text_mask: Optional[np.ndarray] = None) -> BuiltBatch:
    """Packs trajectories, runs the log-prob and value passes, computes advantages (the steps
    of the module docstring). With ``mesh`` (every process holds all trajectories) the passes
    and the estimator run on it, rows split over its batch axes. ``text_mask``: the grammar's, when the
    trajectories were sampled with a constraint."""
    spec = settings.estimator_spec()
    turns = pack_turns(trajectories, settings.max_turns)
    tokens = pack_tokens(trajectories, pad_id, row_multiple=settings.rows,
                         length_multiple=settings.length_multiple)
    passes_start = time.perf_counter()
    passes = model_passes(tokens, state, ref_params, model_config, settings, bool(spec.value_heads),
                          mesh, text_mask)
    passes_s = time.perf_counter() - passes_start
    state_ids = (anchor_state_ids(turn_observations(trajectories), turns.group_ids, settings.max_turns,
                                  settings.gigpo_similarity) if spec.needs_states else None)
    inputs = turn_batch(turns, tokens, passes.values, state_ids)
    advantages_start = time.perf_counter()
    out = run_estimator(spec, inputs, hae_cfg, mesh)
    advantages = token_advantages(out, tokens)
    advantages_s = time.perf_counter() - advantages_start
    batch, stats = assemble(tokens, passes, out, advantages, spec.value_heads,
                            recomputed=settings.old_logp == "recompute")
    stats.update(passes_s=passes_s, advantages_s=advantages_s)
    return BuiltBatch(batch, turns, out, stats)
