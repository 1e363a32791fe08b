"""Packed update rows: several turn rows in one row of the length bucket.

One turn per row, right-padded to the batch's length bucket, leaves a third or more of the
positions the update computes as padding. Packing puts several turns (segments) one after the
other in a row of the same width; each token carries its segment id (``1, 2, ...`` in the row,
0 for padding) where the unpacked layout has its ``valid`` flag, so the model's attention never
crosses a segment and positions restart at 0 in each one (:func:`hiper_jax.models.qwen2.forward`
derives both from the segment ids). A segment is a turn row moved whole, so every per-token
array moves with its tokens and stays aligned to the scored token; the first position of a
segment is scored from the previous segment's last token, but it is a prompt token, which no
loss reads.

Per-row arrays (``[N, ...]``) become per-segment arrays ``[P, S, ...]`` (P packed rows, up to S
segments each, empty slots zero or masked); value-read positions are shifted by the segment's
offset. Loss means are over the masks, never per row, so the PPO loss of a packed batch equals
the unpacked one.

These are host functions on NumPy arrays: the plan (which row and offset each turn gets) is
first-fit decreasing over the turn lengths, deterministic (ties in row order).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import numpy as np

from hiper_jax.rollout.packing import bucket_size


class PackPlan(NamedTuple):
    """Where each kept source row goes: ``[M]`` arrays over the M rows that are packed.

    ``source`` indexes the unpacked rows ``[N]``; the row's tokens ``0..lengths - 1`` land at
    ``(row, offset + j)`` of a ``[num_rows, width]`` array, as segment ``segment`` (0-based; its
    id is ``segment + 1``). ``num_segments`` is S of the per-segment arrays (a bucket size, so
    batches share compiled shapes).
    """

    source: np.ndarray    # [M] int, index of the unpacked row
    row: np.ndarray       # [M] int, packed row
    offset: np.ndarray    # [M] int, first position in the packed row
    segment: np.ndarray   # [M] int, 0-based segment within the packed row
    lengths: np.ndarray   # [M] int, tokens of the row
    num_rows: int         # P
    width: int            # W
    num_segments: int     # S
    source_rows: int      # N
    source_width: int     # L


def right_padded_lengths(valid: np.ndarray) -> np.ndarray:
    """``[N]`` tokens per row of a right-padded ``valid [N, L]`` (bool or 0/1); raises ValueError
    when a row has a gap (a packed layout cannot move such a row as one segment)."""
    valid = np.asarray(valid) != 0
    lengths = valid.sum(axis=1)
    if not np.array_equal(valid, np.arange(valid.shape[1]) < lengths[:, None]):
        raise ValueError("valid must be right-padded (each row's real tokens first)")
    return lengths


def first_fit_decreasing(lengths: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Bins of capacity ``width`` for items of ``lengths [M]`` (each <= width), longest first,
    each into the first row with room: returns ``(row [M], offset [M], num_rows)``.

    Deterministic: equal lengths keep their order. The loop is over items (turns), the search
    for a row is vectorised.
    """
    lengths = np.asarray(lengths, np.int64)
    if lengths.size and (lengths.min() < 1 or lengths.max() > width):
        raise ValueError(f"lengths must lie in [1, {width}] (the packed width), got "
                         f"[{lengths.min()}, {lengths.max()}]")
    row = np.zeros(lengths.size, np.int64)
    offset = np.zeros(lengths.size, np.int64)
    used = np.zeros(max(lengths.size, 1), np.int64)  # filled positions of each open row
    num_rows = 0
    for item in np.argsort(-lengths, kind="stable"):
        fits = np.flatnonzero(used[:num_rows] + lengths[item] <= width)
        target = int(fits[0]) if fits.size else num_rows
        num_rows += not fits.size
        row[item], offset[item] = target, used[target]
        used[target] += lengths[item]
    return row, offset, num_rows


def plan_rows(valid: np.ndarray, width: int, keep: np.ndarray | None = None) -> PackPlan:
    """The packing of the rows of ``valid [N, L]`` (right-padded) into rows of ``width``.

    Args:
      valid: real tokens of each unpacked row.
      width: W, the packed rows' width (at least the longest kept row).
      keep: ``[N]`` bool, the rows to pack (default: every row with a real token).
    """
    lengths = right_padded_lengths(valid)
    keep = lengths > 0 if keep is None else np.asarray(keep, bool) & (lengths > 0)
    source = np.flatnonzero(keep)
    row, offset, num_rows = first_fit_decreasing(lengths[source], width)
    # Segment order inside a row follows the offsets (rows fill left to right).
    order = np.lexsort((offset, row))
    segment = np.zeros(source.size, np.int64)
    if source.size:
        starts = np.r_[True, row[order][1:] != row[order][:-1]]
        first = np.maximum.accumulate(np.where(starts, np.arange(source.size), 0))
        segment[order] = np.arange(source.size) - first
    most = int(segment.max()) + 1 if source.size else 1
    return PackPlan(source, row, offset, segment, lengths[source], max(num_rows, 1), width,
                    bucket_size(most), valid.shape[0], valid.shape[1])


def _token_index(plan: PackPlan) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(src_row, src_pos, dst_row, dst_pos)`` of every moved token, ``[T]`` each."""
    item = np.repeat(np.arange(plan.source.size), plan.lengths)
    within = np.arange(item.size) - np.repeat(np.cumsum(plan.lengths) - plan.lengths, plan.lengths)
    return plan.source[item], within, plan.row[item], plan.offset[item] + within


def pack_tokens(x: np.ndarray, plan: PackPlan, fill=0) -> np.ndarray:
    """A per-token array ``[N, L, ...]`` -> ``[P, W, ...]`` (``fill`` at padding)."""
    x = np.asarray(x)
    src_row, src_pos, dst_row, dst_pos = _token_index(plan)
    out = np.full((plan.num_rows, plan.width) + x.shape[2:], fill, x.dtype)
    out[dst_row, dst_pos] = x[src_row, src_pos]
    return out


def segment_ids(plan: PackPlan) -> np.ndarray:
    """``[P, W]`` int32: the segment id of each packed position (1, 2, ...; 0 at padding)."""
    _, _, dst_row, dst_pos = _token_index(plan)
    out = np.zeros((plan.num_rows, plan.width), np.int32)
    out[dst_row, dst_pos] = np.repeat(plan.segment + 1, plan.lengths)
    return out


def unpack_tokens(y: np.ndarray, plan: PackPlan) -> np.ndarray:
    """A packed per-token array ``[P, W, ...]`` -> ``[N, L, ...]`` (zeros where no token went)."""
    y = np.asarray(y)
    src_row, src_pos, dst_row, dst_pos = _token_index(plan)
    out = np.zeros((plan.source_rows, plan.source_width) + y.shape[2:], y.dtype)
    out[src_row, src_pos] = y[dst_row, dst_pos]
    return out


def pack_segments(x: np.ndarray, plan: PackPlan, fill=0) -> np.ndarray:
    """A per-row array ``[N, ...]`` -> per-segment ``[P, S, ...]`` (``fill`` in empty slots)."""
    x = np.asarray(x)
    out = np.full((plan.num_rows, plan.num_segments) + x.shape[1:], fill, x.dtype)
    out[plan.row, plan.segment] = x[plan.source]
    return out


def pack_reads(read: np.ndarray, plan: PackPlan) -> np.ndarray:
    """Read positions ``[N, ...]`` (inside each unpacked row) -> ``[P, S, ...]`` positions in the
    packed rows (0 in empty slots)."""
    read = np.asarray(read)
    shift = plan.offset.reshape((-1,) + (1,) * (read.ndim - 1)).astype(read.dtype)
    out = np.zeros((plan.num_rows, plan.num_segments) + read.shape[1:], read.dtype)
    out[plan.row, plan.segment] = read[plan.source] + shift
    return out


def unpack_segments(y: np.ndarray, plan: PackPlan) -> np.ndarray:
    """A per-segment array ``[P, S, ...]`` -> ``[N, ...]`` (zeros for rows not packed)."""
    y = np.asarray(y)
    out = np.zeros((plan.source_rows,) + y.shape[2:], y.dtype)
    out[plan.source] = y[plan.row, plan.segment]
    return out


def real_fraction(plan: PackPlan) -> float:
    """Real tokens over the positions of the packed rows, ``sum(lengths) / (P * W)``."""
    return float(plan.lengths.sum()) / float(plan.num_rows * plan.width)


def segment_lengths(segments: np.ndarray) -> np.ndarray:
    """Lengths of the segments of ``segments [N, L]`` (segment ids, 0 padding; a bool ``valid``
    is one segment per row), as a flat array of the non-empty ones."""
    segments = np.asarray(segments).astype(np.int64)
    ids = segments.max(initial=0) + 1
    keys = (np.arange(segments.shape[0])[:, None] * ids + segments)[segments != 0]
    counts = np.bincount(keys, minlength=1)
    return counts[counts > 0]


def packed_pass(run: Callable, valid: np.ndarray, width: int | None = None) -> Callable:
    """Wraps a row-wise pass runner ``run(fn, token_arrays, read_arrays, per_token=...)`` (whose
    ``token_arrays`` are ``(tokens, valid, ...)`` ``[N, L, ...]`` and ``read_arrays`` read
    positions ``[N, ...]``) so that it runs on packed rows and returns outputs in the unpacked
    layout: per-token ``[N, L, ...]``, per-row ``[N, ...]``.

    ``valid [N, L]``: the unpacked rows' real tokens; ``width``: W (default L). Per-token outputs
    are aligned to scored tokens: position 0 of a row scores nothing (0, as unpacked), where a
    packed segment's first position holds a score from the previous segment.
    """
    plan = plan_rows(valid, width or np.shape(valid)[1])

    def wrapped(fn, token_arrays: Sequence[np.ndarray], read_arrays: Sequence[np.ndarray],
                per_token: tuple[bool, ...] = (True,)) -> tuple[np.ndarray, ...]:
        tokens, _, *rest = token_arrays
        packed = (pack_tokens(tokens, plan), segment_ids(plan)) + tuple(pack_tokens(a, plan) for a in rest)
        outs = run(fn, packed, tuple(pack_reads(r, plan) for r in read_arrays), per_token=per_token)
        return tuple(_unscored_first(unpack_tokens(o, plan)) if tok else unpack_segments(o, plan)
                     for o, tok in zip(outs, per_token))

    return wrapped


def _unscored_first(x: np.ndarray) -> np.ndarray:
    x[:, 0] = 0
    return x


def pack_ppo_batch(batch, width: int | None = None):
    """A :class:`~hiper_jax.train.ppo.PPOBatch` of turn rows ``[N, L]`` -> the same batch in
    packed rows ``[P, W]`` (default W = L): ``valid`` holds segment ids, the value arrays are
    per segment ``[P, S, 3]``. Only rows that carry a loss or a value loss are packed. Returns
    ``(packed batch, plan)``."""
    loss_rows = np.asarray(batch.loss_mask).any(1)
    value_rows = np.asarray(batch.value_mask).reshape(np.shape(batch.value_mask)[0], -1).any(1)
    plan = plan_rows(batch.valid, width or np.shape(batch.tokens)[1], keep=loss_rows | value_rows)
    per_token = ("tokens", "loss_mask", "advantages", "old_logp", "ref_logp", "allowed_mode",
                 "allowed_ids")
    fills = {"allowed_ids": -1}
    fields = {name: pack_tokens(getattr(batch, name), plan, fills.get(name, 0)) for name in per_token
              if getattr(batch, name) is not None}
    fields.update(valid=segment_ids(plan), value_read=pack_reads(batch.value_read, plan),
                  **{name: pack_segments(getattr(batch, name), plan)
                     for name in ("value_targets", "old_values", "value_mask")})
    return batch._replace(**fields), plan


def packed_micro_rows(micro_rows: int, length: int, width: int) -> int:
    """Packed rows per micro-batch: ``micro_rows`` when packed rows are as wide as the unpacked
    ones (``width <= length``), else about as many tokens as ``micro_rows`` unpacked rows (the
    largest power of two of rows within them, at least 1), so a micro-batch needs no more memory."""
    if width <= length:
        return micro_rows
    share = max(1, micro_rows * length // width)
    return 1 << (share.bit_length() - 1)


def packed_rows_per_step(num_packed: int, num_unpacked: int, rows: int, multiple: int) -> int:
    """Packed rows per optimizer step so that an epoch over ``num_packed`` packed rows takes as
    many steps as one over ``num_unpacked`` rows in steps of ``rows`` rows: the packed rows split
    evenly over those steps, rounded up to a multiple of ``multiple`` (the micro-batch; the
    rounding can leave fewer steps, never more)."""
    steps = max(1, math.ceil(num_unpacked / rows))
    return max(multiple, math.ceil(num_packed / steps / multiple) * multiple)
