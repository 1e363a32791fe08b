"""Trajectories with images -> a PPO batch for a Qwen2.5-VL policy: :mod:`hiper_jax.train.batch`
for a vision-language actor.

    built = build_vision_ppo_batch(trajectories, state, ref_params, vl_config, settings, hae_cfg,
                                   pad_id, text_mask=grammar.text_mask)
    state, metrics = ppo.ppo_update(state, built.batch, rng, config=vl_config, ppo=ppo_cfg,
                                    actor_tx=ppo.freeze_vision(actor_tx), critic_tx=critic_tx)

The steps are those of :func:`hiper_jax.train.batch.build_ppo_batch`, with the text passes
replaced by the scoring pass of :mod:`hiper_jax.models.qwen2_5_vl.scoring`:

1. the turn rows (one per turn, as :func:`~hiper_jax.rollout.packing.pack_tokens` lays them
   out) and each turn's images, re-made from the record
   (:func:`~hiper_jax.rollout.images.turn_sequence`), become scoring inputs: M-RoPE positions
   ``[N, L, 3]`` and the index of each placeholder's feature;
2. the frozen vision tower runs once per batch (:func:`vision_features`, ``settings.rows`` rows'
   images a call), giving each row its features ``[N, F, E]``: the passes and every PPO epoch
   read them;
3. the actor's log-probs and the value heads on its hidden states, and the reference policy's
   log-probs, in chunks of ``settings.rows`` rows at the batch's width;
4. the estimator and :func:`~hiper_jax.train.batch.assemble`, as for text, and the positions
   and features added to the :class:`~hiper_jax.train.ppo.PPOBatch`.

The vision tower is frozen (``model.train_vision=False``): its features are inputs of the loss,
so it gets no gradient, and :func:`hiper_jax.train.ppo.freeze_vision` keeps the optimizer off
it. The critic is value heads on the policy's hidden states
(``CriticConfig(shared_backbone=True)``). Rows are not grouped by length nor packed.
"""

from __future__ import annotations

import functools
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hiper_jax.advantages import anchor_state_ids
from hiper_jax.hae import HAEConfig
from hiper_jax.models import qwen2
from hiper_jax.models.qwen2.model import Params
from hiper_jax.models.qwen2_5_vl import scoring
from hiper_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from hiper_jax.models.qwen2_5_vl.model import rope_index
from hiper_jax.rollout.images import turn_sequence
from hiper_jax.rollout.packing import TokenArrays, pack_tokens, pack_turns
from hiper_jax.rollout.types import Trajectory
from hiper_jax.train.batch import (BatchSettings, BuiltBatch, Passes, assemble, run_estimator,
                                   token_advantages, turn_batch, turn_observations, value_reads)
from hiper_jax.train.ppo import TrainState, policy_token_stats, read_values

Array = jax.Array


def turn_sequences(trajectories: Sequence[Trajectory], tokens: TokenArrays,
                   config: Qwen2_5_VLConfig) -> list[scoring.VisionSequence]:
    """The scoring sequence (tokens, patches, grid) of each real row of ``tokens`` (one turn
    each, in order; the real rows come first, as :func:`~hiper_jax.rollout.packing.pack_tokens`
    lays them out)."""
    real = np.flatnonzero(tokens.row_valid)
    if not len(real) or not np.array_equal(real, np.arange(len(real))):
        raise ValueError("the token rows must start with every real row (pack_tokens' layout)")
    return [turn_sequence(trajectories[b].turns[t], config.vision)
            for b, t in zip(tokens.traj_index[real], tokens.turn_index[real])]


def scoring_positions(sequences: Sequence[scoring.VisionSequence], tokens: TokenArrays,
                      config: Qwen2_5_VLConfig) -> np.ndarray:
    """M-RoPE positions ``[N, L, 3]`` int32 of the rows (0 at padding). Raises ValueError if a
    row's tokens are not its turn's prompt + response."""
    num_rows, width = tokens.tokens.shape
    positions = np.zeros((num_rows, width, 3), np.int32)
    for row, sequence in enumerate(sequences):
        ids = np.asarray(sequence.tokens)
        count = len(ids)
        if count > width or not tokens.valid[row, :count].all() or tokens.valid[row, count:].any() \
                or not np.array_equal(tokens.tokens[row, :count], ids):
            raise ValueError(f"row {row} is not its turn's prompt + response tokens")
        grid = [tuple(g) for g in sequence.grid] or None
        positions[row, :count] = rope_index(config, ids[None], grid)[0][:, 0].T
    return positions


def vision_features(params: Params, config: Qwen2_5_VLConfig, sequences: Sequence[scoring.VisionSequence],
                    num_rows: int, chunk_rows: int, patch_multiple: int = scoring.DEFAULT_PATCH_MULTIPLE,
                    feature_multiple: int = 64, max_patches: int = 4096) -> np.ndarray:
    """``[N, F, E]``: each row's image features in placeholder order (zeros past its count and
    for padding rows), from the frozen vision tower run on at most ``chunk_rows`` rows' images
    at a time, fewer where the rows hold many patches: a call's attention is dense over its
    patches (memory ~ patches^2), so a chunk holds at most ``max_patches`` of them (or one row,
    whatever its count). The chunk size is the same for every call of a batch, so the tower
    compiles for few shapes."""
    most = max((int(sum(np.prod(g) for g in s.grid)) for s in sequences), default=0)
    if most:
        chunk_rows = max(1, min(chunk_rows, max_patches // most))
    chunks = []
    for start in range(0, len(sequences), chunk_rows):
        part = sequences[start: start + chunk_rows]
        inputs = scoring.prepare_rows(config, [[s] for s in part], length_multiple=1,
                                      feature_multiple=feature_multiple, patch_multiple=patch_multiple)
        chunks.append(np.asarray(scoring.scoring_rows(params, config, inputs).features))
    width = max(c.shape[1] for c in chunks)
    features = np.zeros((num_rows, width, config.vision.out_hidden_size), chunks[0].dtype)
    start = 0
    for chunk in chunks:
        features[start: start + len(chunk), : chunk.shape[1]] = chunk
        start += len(chunk)
    return features


@functools.partial(jax.jit, static_argnames=("config", "temperature", "with_values"))
def vision_pass(actor: Params, critic: Params, config: Qwen2_5_VLConfig, tokens: Array, valid: Array,
                positions: Array, features: Array, value_read: Array, temperature: float = 1.0,
                allowed: Optional[qwen2.AllowedTokens] = None, with_values: bool = True
                ) -> tuple[Array, Array]:
    """Jitted log-probs ``[N, L]`` of every scored token and values ``[N, 3]`` at the read
    positions (value heads on the policy's hidden states; zeros when not ``with_values``)."""
    logp, _, hidden = policy_token_stats(actor, config, tokens, valid, temperature, allowed=allowed,
                                         positions=positions, features=features)
    if not with_values:
        return logp, jnp.zeros(value_read.shape, jnp.float32)
    return logp, read_values(critic, config, tokens, valid, value_read, policy_hidden=hidden)


def vision_passes(tokens: TokenArrays, positions: np.ndarray, features: np.ndarray, state: TrainState,
                  ref_params: Optional[Params], config: Qwen2_5_VLConfig, settings: BatchSettings,
                  uses_critic: bool, text_mask: Optional[np.ndarray] = None) -> Passes:
    """The actor's log-probs and values and the reference policy's log-probs (zeros without
    ``settings.reference_pass``) of the rows, ``settings.rows`` rows a call. With
    ``settings.old_logp == "sampler"`` the old log-probs are the sampler's."""
    temperature = settings.temperature or 1.0
    reads = value_reads(tokens).astype(np.int32)
    real = int(tokens.row_valid.sum())
    old_logp = np.zeros(tokens.tokens.shape, np.float32)
    ref_logp = np.zeros_like(old_logp)
    values = np.zeros(reads.shape, np.float32)
    for start in range(0, real, settings.rows):
        index = np.resize(np.arange(start, min(start + settings.rows, real)), settings.rows)
        count = min(settings.rows, real - start)
        allowed = None
        if tokens.allowed_mode is not None:
            if text_mask is None:
                raise ValueError("rows sampled with a constraint need the grammar's text_mask")
            allowed = qwen2.AllowedTokens(tokens.allowed_mode[index], tokens.allowed_ids[index], text_mask)
        args = (tokens.tokens[index], tokens.valid[index], positions[index], features[index], reads[index])
        logp, vals = vision_pass(state.actor, state.critic, config, *args, temperature, allowed,
                                 with_values=uses_critic)
        old_logp[index[:count]] = np.asarray(logp)[:count]
        values[index[:count]] = np.asarray(vals)[:count]
        if settings.reference_pass:
            ref, _ = vision_pass(ref_params, state.critic, config, *args, temperature, allowed,
                                 with_values=False)
            ref_logp[index[:count]] = np.asarray(ref)[:count]
    if settings.old_logp == "sampler":
        old_logp = tokens.old_logp
    return Passes(old_logp, ref_logp, values)


def build_vision_ppo_batch(trajectories: Sequence[Trajectory], state: TrainState,
                           ref_params: Optional[Params], config: Qwen2_5_VLConfig,
                           settings: BatchSettings, hae_cfg: HAEConfig, pad_id: int,
                           text_mask: Optional[np.ndarray] = None,
                           patch_multiple: int = scoring.DEFAULT_PATCH_MULTIPLE,
                           feature_multiple: int = 64) -> BuiltBatch:
    """The PPO batch of a Qwen2.5-VL policy's trajectories (the steps of the module docstring);
    ``stats`` as :func:`hiper_jax.train.batch.build_ppo_batch`'s, plus ``vision_s`` (the
    tower's seconds) and ``batch_images``."""
    if not isinstance(config, Qwen2_5_VLConfig):
        raise ValueError(f"build_vision_ppo_batch needs a Qwen2_5_VLConfig, got {type(config).__name__}")
    if settings.pack_rows:
        raise ValueError("packed rows (pack_rows) are not supported for a Qwen2.5-VL policy")
    if "backbone" in state.critic:
        raise ValueError("a Qwen2.5-VL policy's critic is value heads on its hidden states "
                         "(CriticConfig(shared_backbone=True))")
    spec = settings.estimator_spec()
    turns = pack_turns(trajectories, settings.max_turns)
    tokens = pack_tokens(trajectories, pad_id, row_multiple=settings.rows,
                         length_multiple=settings.length_multiple)
    vision_start = time.perf_counter()
    sequences = turn_sequences(trajectories, tokens, config)
    positions = scoring_positions(sequences, tokens, config)
    features = vision_features(state.actor, config, sequences, tokens.tokens.shape[0], settings.rows,
                               patch_multiple, feature_multiple)
    vision_s = time.perf_counter() - vision_start
    passes_start = time.perf_counter()
    passes = vision_passes(tokens, positions, features, state, ref_params, config, settings,
                           bool(spec.value_heads), text_mask)
    passes_s = time.perf_counter() - passes_start
    state_ids = (anchor_state_ids(turn_observations(trajectories), turns.group_ids, settings.max_turns,
                                  settings.gigpo_similarity) if spec.needs_states else None)
    advantages_start = time.perf_counter()
    out = run_estimator(spec, turn_batch(turns, tokens, passes.values, state_ids), hae_cfg)
    advantages = token_advantages(out, tokens)
    advantages_s = time.perf_counter() - advantages_start
    batch, stats = assemble(tokens, passes, out, advantages, spec.value_heads,
                            recomputed=settings.old_logp == "recompute")
    batch = batch._replace(positions=positions, features=features)
    images = sum(len(trajectories[b].turns[t].images)
                 for b, t, ok in zip(tokens.traj_index, tokens.turn_index, tokens.row_valid) if ok)
    stats.update(passes_s=passes_s, advantages_s=advantages_s, vision_s=vision_s,
                 batch_images=float(images))
    return BuiltBatch(batch, turns, out, stats)
