"""Log-probs of sampled turns with their images: the scoring pass PPO trains a Qwen2.5-VL policy on.

    from hiper_jax.models.qwen2_5_vl import scoring
    turns = [scoring.VisionSequence(prompt + response, pixels, grid), ...]
    inputs = scoring.prepare_rows(config, [[turns[0], turns[1]], [turns[2]]],   # 2 packed rows
                                  length_multiple=64, patch_multiple=256)
    rows = scoring.scoring_rows(params, config, inputs)       # the vision tower runs here, once
    logp, entropy, hidden = scoring.token_stats(params, config, rows, temperature=1.0)

A row holds one or more sequences (turns) packed one after another, each with its own segment id
(1, 2, ...; 0 is padding), so attention never crosses turns. Each sequence's 3-D M-RoPE
positions are those of :func:`~hiper_jax.models.qwen2_5_vl.rope_index` over that sequence alone:
the positions the sampler gave it, so ``token_stats`` reproduces the sampler's log-probs.

The vision tower is frozen here (``model.train_vision=False``): :func:`scoring_rows` runs it
once over every image of the batch (patches padded to a bucket, as the sampler does) and gives
each row its image features ``[F, E]`` in placeholder order, so rows can be split into
mini-batches like text rows, and every PPO epoch reads the same features. The language model's
log-probs and their gradients come from :func:`token_stats`.

Static shapes: rows ``N``, length ``L`` (a multiple of ``length_multiple``), features per row
``F`` (a multiple of ``feature_multiple``) and the padded patch count, so few programs compile.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hiper_jax.models import qwen2
from hiper_jax.models.qwen2.model import Params
from hiper_jax.models.qwen2_5_vl import vision
from hiper_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from hiper_jax.models.qwen2_5_vl.model import UnsupportedInputError, forward, rope_index
from hiper_jax.rollout.packing import bucket_size
from hiper_jax.shapes import check_shape

Array = jax.Array

DEFAULT_PATCH_MULTIPLE = 256


class VisionSequence(NamedTuple):
    """One turn to score: its tokens and the images its placeholders stand for.

    Attributes:
        tokens: the token ids (prompt then response), one run of ``image_token_id`` per image.
        pixel_values: ``[n, C*T*P*P]`` the images' patches as HF's processor gives them, or
            None for a text-only sequence.
        grid: ``[(t, h, w), ...]`` one per image, in placeholder order.
    """

    tokens: Sequence[int]
    pixel_values: Any = None
    grid: Sequence[Sequence[int]] = ()


class ScoringInputs(NamedTuple):
    """Host arrays of a batch of rows (:func:`prepare_rows`).

    Attributes:
        tokens: ``[N, L]`` int32, packed sequences then padding (0).
        segments: ``[N, L]`` int32, 1, 2, ... per sequence of the row, 0 for padding.
        positions: ``[3, N, L]`` int32 M-RoPE positions of each sequence (0 at padding).
        pixel_values: ``[P, C*T*P*P]`` float32 the patches of every image of the batch in row,
            then sequence, then image order, zero patches up to the bucket; None without images.
        layout: the :class:`~hiper_jax.models.qwen2_5_vl.vision.PatchLayout` of those patches.
        feature_index: ``[N, F]`` int32, for each row the index of its ``j``-th placeholder's
            feature among the batch's features (rows past the row's count repeat its last one;
            0 for a row without images).
    """

    tokens: np.ndarray
    segments: np.ndarray
    positions: np.ndarray
    pixel_values: Optional[np.ndarray]
    layout: Optional[vision.PatchLayout]
    feature_index: np.ndarray


class ScoringRows(NamedTuple):
    """Device inputs of :func:`token_stats` (:func:`scoring_rows`).

    Attributes:
        tokens: ``[N, L]`` int32.
        segments: ``[N, L]`` int32 (0: padding).
        positions: ``[3, N, L]`` int32.
        features: ``[N, F, E]`` each row's image features in placeholder order (zeros for a row
            without images), in the vision tower's compute dtype.
    """

    tokens: Array
    segments: Array
    positions: Array
    features: Array


def _round_up(value: int, multiple: int) -> int:
    return max(multiple, -(-value // multiple) * multiple)


def _check_sequence(config: Qwen2_5_VLConfig, number: int, sequence: VisionSequence
                    ) -> tuple[np.ndarray, tuple, Optional[np.ndarray]]:
    tokens = np.asarray(sequence.tokens)
    if tokens.ndim != 1 or not len(tokens) or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"sequence {number}: tokens must be a non-empty 1-D list of ints, got "
                         f"shape {tokens.shape} dtype {tokens.dtype}")
    grid = tuple(tuple(int(v) for v in image) for image in sequence.grid)
    if (sequence.pixel_values is None) != (not grid):
        raise ValueError(f"sequence {number}: pass pixel_values and grid together (both or "
                         "neither)")
    pixels = None
    if grid:
        count = sum(t * h * w for t, h, w in grid)
        pixels = np.asarray(sequence.pixel_values, np.float32)
        if pixels.shape != (count, config.vision.patch_dim):
            raise ValueError(f"sequence {number}: pixel_values has shape {pixels.shape}; its grid "
                             f"{list(grid)} needs {(count, config.vision.patch_dim)}")
    expected = sum(vision.num_image_tokens(grid, config.vision)) if grid else 0
    found = int(np.sum(tokens == config.image_token_id))
    if found != expected:
        raise UnsupportedInputError(f"sequence {number} holds {found} image placeholders; its "
                                    f"grid gives {expected} features")
    return tokens, grid, pixels


def prepare_rows(config: Qwen2_5_VLConfig, rows: Sequence[Sequence[VisionSequence]],
                 length_multiple: int = 64, feature_multiple: int = 64,
                 patch_multiple: int = DEFAULT_PATCH_MULTIPLE,
                 num_rows: Optional[int] = None) -> ScoringInputs:
    """The host half of the scoring pass: packs each row's sequences, computes their positions
    and gathers the batch's patches into one bucket.

    Args:
        config: the model config.
        rows: per row, the sequences packed into it, in order.
        length_multiple: ``L`` is the longest row rounded up to a multiple of this.
        feature_multiple: ``F`` is the most placeholders of a row rounded up to a multiple.
        patch_multiple: the patch-count bucket unit (a multiple of ``merge_unit``).
        num_rows: pad the batch to this many rows (empty rows: all padding); default
            ``len(rows)``.

    Raises:
        ValueError: an empty row, bad sequence inputs, ``num_rows`` below the row count, or a
            bad multiple.
        UnsupportedInputError: placeholders that do not match a sequence's grid, videos.
    """
    for name, value in (("length_multiple", length_multiple), ("feature_multiple", feature_multiple),
                        ("patch_multiple", patch_multiple)):
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")
    if patch_multiple % config.vision.merge_unit:
        raise ValueError(f"patch_multiple={patch_multiple} must be a multiple of "
                         f"merge_unit={config.vision.merge_unit}")
    total_rows = len(rows) if num_rows is None else int(num_rows)
    if not rows or total_rows < len(rows):
        raise ValueError(f"need at least one row and num_rows >= {len(rows)} rows, got "
                         f"num_rows={num_rows}")
    checked, number = [], 0
    for r, row in enumerate(rows):
        if not row:
            raise ValueError(f"row {r} holds no sequence")
        checked.append([])
        for sequence in row:
            checked[-1].append(_check_sequence(config, number, sequence))
            number += 1
    length = _round_up(max(sum(len(t) for t, _, _ in row) for row in checked), length_multiple)
    tokens = np.zeros((total_rows, length), np.int32)
    segments = np.zeros((total_rows, length), np.int32)
    positions = np.zeros((3, total_rows, length), np.int32)
    counts = np.zeros(total_rows, np.int64)
    grid, pixels = [], []
    for r, row in enumerate(checked):
        start = 0
        for s, (ids, seq_grid, seq_pixels) in enumerate(row):
            end = start + len(ids)
            tokens[r, start:end] = ids
            segments[r, start:end] = s + 1
            positions[:, r, start:end] = rope_index(config, ids[None], seq_grid or None)[0][:, 0]
            if seq_grid:
                grid.extend(seq_grid)
                pixels.append(seq_pixels)
                counts[r] += int(np.sum(ids == config.image_token_id))
            start = end
    width = _round_up(int(counts.max()), feature_multiple)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    last = np.maximum(counts - 1, 0)
    feature_index = (offsets[:, None] + np.minimum(np.arange(width)[None], last[:, None])).astype(np.int32)
    if not grid:
        return ScoringInputs(tokens, segments, positions, None, None, np.zeros_like(feature_index))
    patches = np.concatenate(pixels)
    padded = bucket_size(len(patches), patch_multiple)
    patches = np.concatenate([patches, np.zeros((padded - len(patches), patches.shape[1]), np.float32)])
    layout = vision.patch_layout(tuple(grid), config.vision, num_patches=padded)
    return ScoringInputs(tokens, segments, positions, patches, layout, feature_index)


@functools.partial(jax.jit, static_argnames=("config",))
def _row_features(visual: Params, config: Qwen2_5_VLConfig, pixel_values: Array,
                  layout: vision.PatchLayout, feature_index: Array) -> Array:
    features = vision.as_module(visual, config.vision).run(pixel_values, layout)
    return features[feature_index]


def scoring_rows(params: Params, config: Qwen2_5_VLConfig, inputs: ScoringInputs) -> ScoringRows:
    """Runs the (frozen) vision tower over the batch's images and gives each row its features:
    :class:`ScoringRows` on the device, ready for :func:`token_stats`."""
    rows, _ = inputs.tokens.shape
    if inputs.pixel_values is None:
        width = inputs.feature_index.shape[1]
        features = jnp.zeros((rows, width, config.vision.out_hidden_size),
                             jnp.dtype(config.vision.compute_dtype))
    else:
        features = _row_features(params["visual"], config, jnp.asarray(inputs.pixel_values),
                                 jax.tree.map(jnp.asarray, inputs.layout),
                                 jnp.asarray(inputs.feature_index))
    return ScoringRows(jnp.asarray(inputs.tokens), jnp.asarray(inputs.segments),
                       jnp.asarray(inputs.positions), features)


def token_stats(params: Params, config: Qwen2_5_VLConfig, rows: ScoringRows,
                temperature: float = 1.0, allowed: Optional[qwen2.AllowedTokens] = None,
                remat: bool = False, logits_chunk: int = 128) -> tuple[Array, Array, Array]:
    """Log-probs and entropies of every token given the tokens before it in its sequence.

    Args:
        params: the full parameter tree (``visual`` is not read: features are inputs).
        config: the model config (static under jit).
        rows: :func:`scoring_rows`' output.
        temperature: the sampling temperature the tokens were drawn at.
        allowed: the constrained sampler's allowed sets, aligned to the scored tokens
            (``mode [N, L]``, ``ids [N, L, K]``), as in :func:`hiper_jax.train.ppo.policy_token_stats`.
        remat, logits_chunk: as in :func:`hiper_jax.models.qwen2.forward` /
            :func:`hiper_jax.models.qwen2.token_logprobs`.

    Returns:
        ``(logp [N, L], entropy [N, L], hidden [N, L, E])``: entry ``t`` scores ``tokens[:, t]``
        from position ``t - 1`` (0 at ``t = 0``; the first token of each later packed sequence
        and padding get values that a loss must mask out).
    """
    check_shape((3,) + tuple(rows.tokens.shape), "[3, N, L]", **{"rows.positions": rows.positions})
    check_shape(rows.tokens.shape, "[N, L]", **{"rows.segments": rows.segments})
    hidden, _ = forward(params, config, rows.tokens, rows.positions, image_features=rows.features,
                        segment_ids=rows.segments, remat=remat)
    text = params["language_model"]
    if allowed is not None:
        allowed = allowed._replace(mode=allowed.mode[:, 1:], ids=allowed.ids[:, 1:])
    stats = qwen2.token_logprobs(text, config.text, hidden[:, :-1], rows.tokens[:, 1:],
                                 temperature=temperature, chunk_size=logits_chunk, allowed=allowed)

    def scored(stat: Array) -> Array:
        return jnp.pad(stat, ((0, 0), (1, 0)))

    return scored(stats.logprobs), scored(stats.entropy), hidden


@functools.partial(jax.jit, static_argnames=("config", "temperature"))
def logprob_pass(params: Params, config: Qwen2_5_VLConfig, rows: ScoringRows,
                 temperature: float = 1.0, allowed: Optional[qwen2.AllowedTokens] = None) -> Array:
    """Jitted :func:`token_stats` log-probs ``[N, L]`` (old or reference policy)."""
    logp, _, _ = token_stats(params, config, rows, temperature, allowed)
    return logp
