"""Qwen2.5-VL: the vision tower (:mod:`.vision`) feeding a Qwen2 language model with multimodal
rotary positions, as Flax NNX modules run through pure functions of a parameter tree.

The language model *is* the Qwen2 port (:class:`~hiper_jax.models.qwen2.Qwen2ForCausalLM`, same
parameter tree, stacked or unstacked layers, same KV cache); this module adds what differs:

* **Image placeholders.** Each image occupies ``t * h * w / spatial_merge_size**2`` copies of
  ``image_token_id`` in the token sequence; their embeddings are replaced, in order over the
  whole batch (row-major), by the rows of the image features (:func:`merge_image_features`).
* **M-RoPE.** Positions are ``[3, B, L]``: temporal, height and width ids. Text tokens have all
  three equal (consecutive); an image's tokens share one temporal id and take their row and
  column offsets; the text after an image continues from ``start + max(h, w) / merge``
  (:func:`rope_index`, computed on the host like HF's ``get_rope_index``). Of each head's
  ``D/2`` rotary frequencies the first ``mrope_section[0]`` rotate with the temporal id, the
  next ``mrope_section[1]`` with the height id and the rest with the width id
  (:func:`mrope_tables`).

Parameter tree: ``{"visual": <vision tree>, "language_model": <Qwen2ForCausalLM tree>}``, so
``params["language_model"]`` goes to every Qwen2 function (``lm_head``, ``token_logprobs``,
``unstack_layers``) under ``config.text``.

Host data: ``image_grid_thw`` (static shapes of the vision program) and the 3-D positions (a
function of the token ids and the grid) are computed outside jit; :func:`compute_logits` does
both for a prefill, :func:`forward` takes them as arrays. Videos are not supported yet: a video
placeholder token is refused with :class:`UnsupportedInputError`.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from hiper_jax.models import qwen2, sharding
from hiper_jax.models.qwen2.model import KVCache, Params, abstract_specs
from hiper_jax.models.qwen2_5_vl import vision
from hiper_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig

Array = jax.Array


class UnsupportedInputError(ValueError):
    """An input this port does not handle yet (video placeholders), or placeholders that do not
    match the images' grid."""


class Qwen2_5_VLForConditionalGeneration(nnx.Module):
    """The vision tower and the Qwen2 language model with its head.

    ``stacked`` chooses the language model's layer layout (see :mod:`hiper_jax.models.qwen2`);
    the vision blocks are always stacked.
    """

    def __init__(self, config: Qwen2_5_VLConfig, *, rngs: nnx.Rngs, stacked: bool = True):
        self.config = config
        self.visual = vision.VisionTransformer(config.vision, rngs=rngs)
        self.language_model = qwen2.Qwen2ForCausalLM(config.text, rngs=rngs, stacked=stacked)

    def __call__(self, tokens: Array, positions: Array, *,
                 pixel_values: Optional[Array] = None, grid: vision.Grid = (),
                 segment_ids: Optional[Array] = None) -> Array:
        """Logits ``[B, L, V]`` float32; ``positions [3, B, L]`` from :func:`rope_index`."""
        features = None if pixel_values is None else self.visual(pixel_values, grid)
        embeddings = _embed(self.language_model.embed_tokens.embedding[...], self.config, tokens,
                            features)
        hidden, _ = self.language_model(tokens, segment_ids=segment_ids, embeddings=embeddings,
                                        rope=mrope_tables(positions, self.config))
        return self.language_model.logits(hidden)


def mrope_tables(positions: Array, config: Qwen2_5_VLConfig) -> tuple[Array, Array]:
    """cos/sin ``[B, L, 1, D/2]`` float32 of multimodal positions ``[3, B, L]``: frequency ``j``
    rotates with the temporal, height or width id as ``mrope_section`` assigns it."""
    text = config.text
    inv_freq = 1.0 / (text.rope_theta ** (jnp.arange(0, text.head_dim, 2, dtype=jnp.float32)
                                          / text.head_dim))
    section = np.repeat(np.arange(3), config.mrope_section)  # [D/2]: which id each uses
    chosen = positions.astype(jnp.float32)[section]           # [D/2, B, L]
    angles = jnp.moveaxis(chosen, 0, -1) * inv_freq           # [B, L, D/2]
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def merge_image_features(embeddings: Array, tokens: Array, features: Array,
                         image_token_id: int) -> Array:
    """``embeddings [B, L, E]`` with the ``K`` placeholder positions (``tokens == image_token_id``,
    row-major over the batch) replaced by ``features [K, E]`` in order. The count must match
    (checked on the host by :func:`compute_logits`; inside jit it cannot be)."""
    is_image = tokens == image_token_id
    index = jnp.clip(jnp.cumsum(is_image.reshape(-1)) - 1, 0, features.shape[0] - 1)
    rows = features.astype(embeddings.dtype)[index].reshape(embeddings.shape)
    return jnp.where(is_image[..., None], rows, embeddings)


def merge_row_features(embeddings: Array, tokens: Array, features: Array,
                       image_token_id: int) -> Array:
    """``embeddings [B, L, E]`` with row ``b``'s placeholder positions replaced, in order, by
    ``features[b] [F, E]`` (the row's image features first, then any padding rows, never read).
    The per-row form of :func:`merge_image_features`: rows can be split into mini-batches."""
    is_image = tokens == image_token_id
    index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, features.shape[1] - 1)
    rows = jnp.take_along_axis(features.astype(embeddings.dtype), index[..., None], axis=1)
    return jnp.where(is_image[..., None], rows, embeddings)


def _embed(table: Array, config: Qwen2_5_VLConfig, tokens: Array,
           features: Optional[Array]) -> Array:
    x = jnp.take(table, tokens, axis=0).astype(jnp.dtype(config.text.compute_dtype))
    if features is None or features.shape[-2] == 0:
        return x
    if features.ndim == 3:
        return merge_row_features(x, tokens, features, config.image_token_id)
    return merge_image_features(x, tokens, features, config.image_token_id)


def text_positions(segment_ids: Array, cache: Optional[KVCache] = None) -> Array:
    """``[3, B, L]`` positions of a text-only chunk (all three ids equal), after the tokens
    already in ``cache``. With images earlier in the sequence, add their ``rope_deltas``."""
    positions = qwen2.positions_from_segments(segment_ids)
    if cache is not None:
        positions = positions + jnp.sum(cache.segment_ids != 0, axis=1, keepdims=True)
    return jnp.broadcast_to(positions[None], (3,) + positions.shape)


def rope_index(config: Qwen2_5_VLConfig, tokens: Any, image_grid_thw: Any = None,
               attention_mask: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Multimodal positions of a batch of text+image sequences (host, numpy), as HF's
    ``get_rope_index`` computes them.

    Args:
        config: the model config (token ids, merge size).
        tokens: ``[B, L]`` token ids; images are runs of ``image_token_id``, one run of
            ``t * h * w / merge**2`` tokens per image, images in ``image_grid_thw`` order over
            the batch (row-major).
        image_grid_thw: ``[num_images, 3]`` (None or empty: text only).
        attention_mask: optional ``[B, L]`` 0/1 (0: padding, which gets position 0 and is not
            counted); one sequence per row.

    Returns:
        ``(positions [3, B, L] int32, rope_deltas [B] int32)``: the next token of row ``b``
        (at index ``n_b``, its number of real tokens) has position ``n_b + rope_deltas[b]``.

    Raises:
        UnsupportedInputError: video placeholders, or placeholders that do not match the grid.
    """
    tokens = np.asarray(tokens)
    batch, length = tokens.shape
    mask = (np.ones((batch, length), bool) if attention_mask is None
            else np.asarray(attention_mask) != 0)
    grid = (() if image_grid_thw is None or np.size(image_grid_thw) == 0
            else vision.as_grid(image_grid_thw))
    merge = config.vision.spatial_merge_size
    images = iter(grid)
    used = 0
    positions = np.zeros((3, batch, length), np.int64)
    deltas = np.zeros(batch, np.int64)
    for b in range(batch):
        ids = tokens[b][mask[b]]
        if np.any(ids == config.video_token_id):
            raise UnsupportedInputError(
                f"row {b} holds video placeholder tokens (id {config.video_token_id}); video "
                "inputs are not supported by this port yet")
        pieces, current, i = [], 0, 0
        while i < len(ids):
            if ids[i] == config.image_token_id:
                t, h, w = next(images, (0, 0, 0))
                if not t:
                    raise UnsupportedInputError(f"more image placeholder runs than the {len(grid)} "
                                                "image(s) of image_grid_thw")
                gh, gw = h // merge, w // merge
                count = t * gh * gw
                if not np.all(ids[i:i + count] == config.image_token_id) or (
                        i + count < len(ids) and ids[i + count] == config.image_token_id):
                    raise UnsupportedInputError(
                        f"image {used} (grid {(t, h, w)}) needs a run of exactly {count} "
                        f"placeholder tokens in row {b}")
                tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw),
                                         indexing="ij")
                pieces.append(np.stack([tt, hh, ww]).reshape(3, -1) + current)
                current += max(h, w) // merge
                i += count
                used += 1
            else:
                end = i + 1
                while end < len(ids) and ids[end] != config.image_token_id:
                    end += 1
                pieces.append(np.broadcast_to(np.arange(end - i) + current, (3, end - i)))
                current += end - i
                i = end
        if pieces:
            row = np.concatenate(pieces, axis=1)
            positions[:, b, mask[b]] = row
            deltas[b] = row.max() + 1 - len(ids)
    if used != len(grid):
        raise UnsupportedInputError(f"image_grid_thw has {len(grid)} image(s) but the tokens hold "
                                    f"{used} placeholder run(s)")
    return positions.astype(np.int32), deltas.astype(np.int32)


@functools.partial(jax.jit, static_argnames=("config", "remat"))
def forward(params: Params, config: Qwen2_5_VLConfig, tokens: Array, positions: Optional[Array] = None,
            *, image_features: Optional[Array] = None, segment_ids: Optional[Array] = None,
            cache: Optional[KVCache] = None, remat: bool = False
            ) -> tuple[Array, Optional[KVCache]]:
    """Runs the language model on tokens with image features in their placeholders.

    Args:
        params: the full parameter tree (``visual`` is not read).
        config: the architecture (static).
        tokens: ``[B, L]`` token ids.
        positions: ``[3, B, L]`` multimodal positions (:func:`rope_index`; for a later chunk,
            text positions plus ``rope_deltas``); default :func:`text_positions`.
        image_features: ``[K, E]`` (:func:`~hiper_jax.models.qwen2_5_vl.vision_features`), ``K``
            the number of placeholder tokens in ``tokens``, in order over the batch; or
            ``[B, F, E]``, each row's own (:func:`merge_row_features`).
        segment_ids, cache, remat: as in :func:`hiper_jax.models.qwen2.forward`.

    Returns:
        ``(hidden [B, L, E]``, updated cache or None).
    """
    text = params["language_model"]
    if segment_ids is None:
        segment_ids = jnp.ones(tokens.shape, jnp.int32)
    if positions is None:
        positions = text_positions(segment_ids, cache)
    embeddings = _embed(text["embed_tokens"]["embedding"], config, tokens, image_features)
    model = qwen2.as_module(text, config.text, qwen2.Qwen2Model)
    return model(tokens, segment_ids=segment_ids, cache=cache, remat=remat,
                 embeddings=embeddings, rope=mrope_tables(positions, config))


def compute_logits(params: Params, config: Qwen2_5_VLConfig, tokens: Any,
                   pixel_values: Any = None, image_grid_thw: Any = None,
                   attention_mask: Any = None) -> Array:
    """Prefill logits ``[B, L, V]`` float32 of text+image sequences (no cache).

    Host work first (the grid, the 3-D positions, the placeholder count check), then the jitted
    vision tower and language model.

    Args:
        tokens: ``[B, L]`` token ids with the images' placeholder runs.
        pixel_values: ``[N, C*T*P*P]`` of all images (None for text only).
        image_grid_thw: ``[num_images, 3]``.
        attention_mask: optional ``[B, L]`` 0/1 (0 marks padding).
    """
    tokens = np.asarray(tokens)
    grid = () if image_grid_thw is None else vision.as_grid(image_grid_thw)
    if (pixel_values is None) != (not grid):
        raise ValueError("pass pixel_values and image_grid_thw together")
    positions, _ = rope_index(config, tokens, grid, attention_mask)
    features = None
    if grid:
        expected = sum(vision.num_image_tokens(grid, config.vision))
        found = int(np.sum(tokens == config.image_token_id))
        if found != expected:
            raise UnsupportedInputError(f"tokens hold {found} image placeholders; the images' "
                                        f"grid gives {expected} features")
        features = vision.vision_features(params["visual"], config.vision, pixel_values, grid)
    segments = None if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    hidden, _ = forward(params, config, jnp.asarray(tokens), jnp.asarray(positions),
                        image_features=features, segment_ids=segments)
    return qwen2.lm_head(params["language_model"], config.text, hidden)


# Modules <-> parameter trees.

@functools.lru_cache(maxsize=None)
def _abstract(config: Qwen2_5_VLConfig) -> tuple[nnx.GraphDef, Params]:
    return abstract_specs(lambda: Qwen2_5_VLForConditionalGeneration(config, rngs=nnx.Rngs(0)))


def module_params(module: Qwen2_5_VLForConditionalGeneration) -> Params:
    """The parameter tree of a model module (plain nested dicts; see the module docstring)."""
    return {"visual": nnx.to_pure_dict(nnx.state(module.visual, nnx.Param)),
            "language_model": qwen2.module_params(module.language_model)}


def as_module(params: Params, config: Qwen2_5_VLConfig) -> Qwen2_5_VLForConditionalGeneration:
    """The module over a (stacked) parameter tree: ``nnx.merge`` of a cached graph definition."""
    return nnx.merge(_abstract(config)[0], params)


def param_specs(config: Qwen2_5_VLConfig) -> Params:
    """The parameter tree with :class:`~hiper_jax.models.qwen2.ParamSpec` leaves."""
    return _abstract(config)[1]


def param_shardings(config: Qwen2_5_VLConfig, mesh: Mesh,
                    rules: sharding.AxisRules = sharding.DEFAULT_RULES) -> Any:
    """NamedShardings of every parameter on ``mesh`` under ``rules`` (same tree as the params)."""
    specs = param_specs(config)
    leaf = lambda x: isinstance(x, qwen2.ParamSpec)
    return sharding.named_shardings(jax.tree.map(lambda s: s.axes, specs, is_leaf=leaf),
                                    jax.tree.map(lambda s: s.shape, specs, is_leaf=leaf),
                                    mesh, rules)


def count_params(config: Qwen2_5_VLConfig) -> int:
    """Number of parameters (tied embeddings counted once)."""
    return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(
        param_specs(config), is_leaf=lambda x: isinstance(x, qwen2.ParamSpec)))


def init_params(key: Array, config: Qwen2_5_VLConfig) -> Params:
    """Random parameters of a fresh module (normal(0, initializer_range) weights, zero biases,
    unit norms) in each part's ``param_dtype``."""
    return _initializer(config)(key)


@functools.lru_cache(maxsize=None)
def _initializer(config: Qwen2_5_VLConfig):
    return jax.jit(lambda key: module_params(
        Qwen2_5_VLForConditionalGeneration(config, rngs=nnx.Rngs(key))))
