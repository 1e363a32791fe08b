"""Packing trajectories into fixed-shape, device-ready arrays.

* Turn level ``[B, T]`` for the advantage estimators (:class:`TurnArrays`).
* Token level ``[N, L]`` for the update (:class:`TokenArrays`): one row per turn, the prompt
  followed by the response, right-padded; ``traj_index``/``turn_index`` map rows back to
  ``[B, T]``.

N and L are rounded up to bucket sizes (1x or 1.5x a power of two, times a multiple) so that a
jitted update compiles for a handful of shapes rather than for every batch.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import numpy as np

from hiper_jax.rollout.types import Trajectory


class TurnArrays(NamedTuple):
    """Per-turn arrays ``[B, T]`` (``group_ids``, ``won``: ``[B]``); padding is masked out."""

    rewards: np.ndarray
    switch: np.ndarray
    dones: np.ndarray
    mask: np.ndarray
    invalid: np.ndarray
    keep_changed: np.ndarray
    group_ids: np.ndarray
    won: np.ndarray


class TokenArrays(NamedTuple):
    """Per-token arrays ``[N, L]`` (one row per turn) and per-row arrays ``[N]``.

    ``tokens[n, j]`` is scored by the logits at ``j - 1``: ``response_mask``, the block masks
    and ``old_logp`` sit at the positions of the scored tokens. ``*_read`` are the positions of
    the hidden state a value head reads: the state that produces the response token the span
    names (``prompt_len + p - 1``).
    """

    tokens: np.ndarray          # [N, L] int32
    valid: np.ndarray           # [N, L] bool, real (non-padding) tokens
    response_mask: np.ndarray   # [N, L] bool
    action_mask: np.ndarray     # [N, L] bool
    subgoal_mask: np.ndarray    # [N, L] bool
    switch_mask: np.ndarray     # [N, L] bool
    old_logp: np.ndarray        # [N, L] float32, sampling log-probs at response positions
    traj_index: np.ndarray      # [N] int32
    turn_index: np.ndarray      # [N] int32
    row_valid: np.ndarray       # [N] bool
    v_low_read: np.ndarray      # [N] int32
    v_high_read: np.ndarray     # [N] int32
    v_term_read: np.ndarray     # [N] int32
    # Constrained sampling only (else None): each scored token's allowed set, see
    # hiper_jax.agent.grammar.allowed_sets; prompt and padding positions are mode 0 (all).
    allowed_mode: Optional[np.ndarray] = None   # [N, L] int8
    allowed_ids: Optional[np.ndarray] = None    # [N, L, K] int32, -1 padding


def bucket_size(n: int, multiple: int = 1) -> int:
    """Smallest size >= n of the form ``multiple * {1, 1.5} * 2^k`` (at least ``multiple``)."""
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    units = max(1, math.ceil(n / multiple))
    power = 1 << max(0, (units - 1).bit_length())
    three_quarters = power * 3 // 4
    if power >= 4 and three_quarters >= units:
        power = three_quarters
    return power * multiple


def pack_turns(trajectories: Sequence[Trajectory], max_turns: int, num_rows: int | None = None) -> TurnArrays:
    """Turn-level arrays ``[B, max_turns]`` with ``B = num_rows or len(trajectories)``."""
    num_traj = len(trajectories)
    batch = num_traj if num_rows is None else num_rows
    if batch < num_traj:
        raise ValueError(f"num_rows={num_rows} is smaller than the {num_traj} trajectories")
    shape = (batch, max_turns)
    out = TurnArrays(
        rewards=np.zeros(shape, np.float32), switch=np.zeros(shape, bool),
        dones=np.zeros(shape, bool), mask=np.zeros(shape, bool), invalid=np.zeros(shape, bool),
        keep_changed=np.zeros(shape, bool),
        # Padding rows get their own groups so they never join a real group.
        group_ids=np.arange(batch, dtype=np.int32), won=np.zeros(batch, bool),
    )
    for b, traj in enumerate(trajectories):
        if traj.num_turns > max_turns:
            raise ValueError(f"trajectory {b} has {traj.num_turns} turns, more than max_turns={max_turns}")
        for t, turn in enumerate(traj.turns):
            out.rewards[b, t] = turn.reward
            out.switch[b, t] = turn.switch
            out.dones[b, t] = turn.done
            out.invalid[b, t] = turn.invalid
            out.keep_changed[b, t] = turn.keep_changed
        out.mask[b, : traj.num_turns] = True
        out.group_ids[b] = traj.group_id
        out.won[b] = traj.won
    if num_traj and (out.group_ids[:num_traj].min() < 0 or out.group_ids[:num_traj].max() >= batch):
        raise ValueError(f"group ids must lie in [0, {batch}), got {sorted(set(out.group_ids[:num_traj]))}")
    return out


def pack_tokens(
    trajectories: Sequence[Trajectory],
    pad_id: int,
    row_multiple: int = 1,
    length_multiple: int = 64,
    max_length: int | None = None,
) -> TokenArrays:
    """Token-level arrays, one row per turn, N and L rounded up to bucket sizes.

    Args:
      trajectories: the episodes; their turns become rows in order.
      pad_id: token id used for padding.
      row_multiple: N is a multiple of this (micro-batch size x data-parallel devices).
      length_multiple: L is a multiple of this.
      max_length: error if a turn's prompt + response is longer (None: no limit).
    """
    rows = [(b, t, turn) for b, traj in enumerate(trajectories) for t, turn in enumerate(traj.turns)]
    longest = max((len(turn.prompt_ids) + len(turn.response_ids) for _, _, turn in rows), default=1)
    if max_length is not None and longest > max_length:
        raise ValueError(f"a turn has {longest} prompt + response tokens, over max_length={max_length}")
    length = bucket_size(longest, length_multiple)
    num_rows = bucket_size(len(rows), row_multiple)
    shape = (num_rows, length)
    tokens = np.full(shape, pad_id, np.int32)
    valid, response = np.zeros(shape, bool), np.zeros(shape, bool)
    action, subgoal, switch = np.zeros(shape, bool), np.zeros(shape, bool), np.zeros(shape, bool)
    old_logp = np.zeros(shape, np.float32)
    traj_index, turn_index = np.zeros(num_rows, np.int32), np.zeros(num_rows, np.int32)
    row_valid = np.zeros(num_rows, bool)
    reads = np.zeros((3, num_rows), np.int32)
    constrained = [turn for _, _, turn in rows if turn.allowed_mode is not None]
    allowed_mode = allowed_ids = None
    if constrained:
        width = bucket_size(max(turn.allowed_ids.shape[1] for turn in constrained))
        allowed_mode = np.zeros(shape, np.int8)
        allowed_ids = np.full(shape + (width,), -1, np.int32)
    for n, (b, t, turn) in enumerate(rows):
        prompt_len, response_len = len(turn.prompt_ids), len(turn.response_ids)
        end = prompt_len + response_len
        tokens[n, :prompt_len] = turn.prompt_ids
        tokens[n, prompt_len:end] = turn.response_ids
        valid[n, :end] = True
        response[n, prompt_len:end] = True
        action[n, prompt_len:end] = turn.spans.action
        subgoal[n, prompt_len:end] = turn.spans.subgoal
        switch[n, prompt_len:end] = turn.spans.switch
        old_logp[n, prompt_len:end] = turn.response_logp
        if constrained and turn.allowed_mode is not None:
            allowed_mode[n, prompt_len:end] = turn.allowed_mode
            allowed_ids[n, prompt_len:end, : turn.allowed_ids.shape[1]] = turn.allowed_ids
        traj_index[n], turn_index[n], row_valid[n] = b, t, True
        spans = turn.spans
        reads[:, n] = [max(prompt_len + p - 1, 0) for p in (spans.v_low_pos, spans.v_high_pos, spans.v_term_pos)]
    return TokenArrays(tokens, valid, response, action, subgoal, switch, old_logp,
                       traj_index, turn_index, row_valid, reads[0], reads[1], reads[2],
                       allowed_mode, allowed_ids)
