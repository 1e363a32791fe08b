"""The Qwen2.5-VL vision tower as Flax NNX modules, run through a pure function of its parameters.

Input is what HF's image processor gives: ``pixel_values [N, C*T*P*P]`` (one row per patch of
``temporal_patch_size`` frames x ``patch_size`` x ``patch_size`` pixels, channel-major, the
patches of each image in block-major order over ``spatial_merge_size`` x ``spatial_merge_size``
blocks) and ``image_grid_thw`` ``[num_images, 3]`` (temporal, height, width in patches).

The grid is *host data*: the layout of the windows and the attention masks follow from it. Two
ways to run the tower: :func:`vision_features` takes the grid as a static argument (a tuple of
``(t, h, w)`` tuples), so every distinct set of image sizes compiles once; or the layout is
computed on the host as arrays (:func:`patch_layout`, optionally padded to a fixed patch count)
and passed in (:meth:`VisionTransformer.run`), so every set of images with the same padded patch
count shares one program (what the sampler does).

Pipeline (``u = spatial_merge_size**2`` patches merge into one language-model token)::

    patch_embed  [N, C*T*P*P] @ [C*T*P*P, E]           (HF's Conv3d with stride = kernel)
    permute      merge units into window order          (window_index, from the grid)
    blocks x depth: x += attn(norm1(x)); x += mlp(norm2(x))
                 attention inside a window (most blocks) or inside a frame
                 (``fullatt_block_indexes``), with 2-D rotary positions (height, width)
    merger       RMSNorm, [N/u, u*E] -> GELU MLP -> [N/u, out_hidden_size]
    un-permute   back to the merge units' original order

Attention runs as one dense masked product over all ``N`` patches of all images (a window or
frame is a block of the mask), exact and simple; its cost is ``O(N^2)`` per block, which a
blocked kernel over windows could cut when images get large.

Parameter tree (``depth`` blocks stacked on a leading axis; ``E`` hidden, ``H`` heads, ``D``
head dim, ``M`` MLP width, ``O`` out_hidden_size)::

    patch_embed.kernel              [C*T*P*P, E]
    blocks.norm{1,2}.scale          [depth, E]
    blocks.attn.qkv.kernel          [depth, E, 3, H, D]      .bias [depth, 3, H, D]
    blocks.attn.proj.kernel         [depth, H, D, E]         .bias [depth, E]
    blocks.mlp.{gate,up}_proj       .kernel [depth, E, M]    .bias [depth, M]
    blocks.mlp.down_proj            .kernel [depth, M, E]    .bias [depth, E]
    merger.ln_q.scale               [E]
    merger.mlp_0.kernel [u*E, u*E] .bias [u*E];  merger.mlp_2.kernel [u*E, O] .bias [O]
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from hiper_jax.models.qwen2.model import Dense, Params, RMSNorm, _apply_rope, _attention
from hiper_jax.models.qwen2_5_vl.config import VisionConfig

Array = jax.Array
Grid = tuple[tuple[int, int, int], ...]


def as_grid(image_grid_thw: Any) -> Grid:
    """``image_grid_thw`` (array or nested sequence, ``[num_images, 3]``) as the hashable tuple
    the jitted functions take as a static argument."""
    grid = tuple(tuple(int(v) for v in row) for row in np.asarray(image_grid_thw).reshape(-1, 3))
    if any(min(row) <= 0 for row in grid):
        raise ValueError(f"image_grid_thw entries must be positive, got {grid}")
    return grid


def _check_grid(grid: Grid, config: VisionConfig) -> None:
    m = config.spatial_merge_size
    for t, h, w in grid:
        if h % m or w % m:
            raise ValueError(f"image grid {(t, h, w)}: height and width (in patches) must be "
                             f"multiples of spatial_merge_size={m}")


def patch_positions(grid: Grid, config: VisionConfig) -> np.ndarray:
    """``[N, 2]`` (row, column) of every patch, in ``pixel_values`` order (block-major over
    merge blocks, frames repeating the image's positions)."""
    m = config.spatial_merge_size
    out = []
    for t, h, w in grid:
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        blocks = lambda x: x.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([blocks(rows), blocks(cols)], axis=-1), (t, 1)))
    return np.concatenate(out).astype(np.int32)


def window_layout(grid: Grid, config: VisionConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The window order of the merge units and the attention groups, from the grid.

    Each frame's ``h/m x w/m`` merge units are cut into windows of ``merger_window`` units a
    side (the last row and column of windows may be smaller), read window by window.

    Returns:
        ``window_index [N/u]``: the merge unit at each position of the window order;
        ``window_ids [N]`` and ``frame_ids [N]``: per patch, in window order, the window and the
        frame (image, temporal slice) it belongs to. Windowed blocks attend within a window id,
        full-attention blocks within a frame id.
    """
    _check_grid(grid, config)
    m, side, u = config.spatial_merge_size, config.merger_window, config.merge_unit
    index, windows, frames = [], [], []
    unit_offset = window_offset = frame_offset = 0
    for t, h, w in grid:
        gh, gw = h // m, w // m
        units = np.arange(t * gh * gw).reshape(t, gh, gw)
        nh, nw = -(-gh // side), -(-gw // side)
        padded = np.full((t, nh * side, nw * side), -1)
        padded[:, :gh, :gw] = units
        padded = padded.reshape(t, nh, side, nw, side).transpose(0, 1, 3, 2, 4)
        padded = padded.reshape(t * nh * nw, side * side)
        for window, members in enumerate(padded):
            members = members[members >= 0]
            index.append(members + unit_offset)
            windows.append(np.full(len(members) * u, window_offset + window))
            frames.append(np.repeat(members // (gh * gw) + frame_offset, u))
        unit_offset += t * gh * gw
        window_offset += len(padded)
        frame_offset += t
    return (np.concatenate(index).astype(np.int32), np.concatenate(windows).astype(np.int32),
            np.concatenate(frames).astype(np.int32))


def _rope_tables_2d(positions: Array, config: VisionConfig) -> tuple[Array, Array]:
    """cos/sin ``[1, N, 1, D/2]`` float32 of 2-D rotary positions ``[N, 2]``: the first ``D/4``
    frequencies of each half rotate with the row, the next ``D/4`` with the column (HF's
    "axial" rope: the same ``D/4`` frequencies for both)."""
    quarter = config.head_dim // 2
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, quarter, 2, dtype=jnp.float32)
                                            / quarter))
    angles = positions.astype(jnp.float32)[:, :, None] * inv_freq  # [N, 2, D/4]
    angles = angles.reshape(positions.shape[0], -1)
    return jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]


class VisionAttention(nnx.Module):
    """Non-causal multi-head attention with one fused, biased ``qkv`` projection."""

    def __init__(self, config: VisionConfig, *, rngs: nnx.Rngs, lead: tuple[int, ...] = ()):
        e, h, d = config.hidden_size, config.num_heads, config.head_dim
        self.qkv = Dense(config, (e,), (3, h, d), ("embed",), (None, "heads", "head_dim"),
                         rngs=rngs, bias=True, lead=lead)
        self.proj = Dense(config, (h, d), (e,), ("heads", "head_dim"), ("embed",), rngs=rngs,
                          bias=True, lead=lead)

    def __call__(self, x: Array, cos: Array, sin: Array, mask: Array) -> Array:
        """``x [1, N, E]``, ``cos, sin [1, N, 1, D/2]``, ``mask [1, N, N]`` -> ``[1, N, E]``."""
        qkv = self.qkv(x)
        q = _apply_rope(qkv[:, :, 0], cos, sin)
        k = _apply_rope(qkv[:, :, 1], cos, sin).swapaxes(1, 2)
        v = qkv[:, :, 2].swapaxes(1, 2)
        return self.proj(_attention(q, k, v, mask))


class VisionMLP(nnx.Module):
    """SwiGLU with biases: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: VisionConfig, *, rngs: nnx.Rngs, lead: tuple[int, ...] = ()):
        e, m = config.hidden_size, config.intermediate_size
        self.gate_proj = Dense(config, (e,), (m,), ("embed",), ("mlp",), rngs=rngs, bias=True,
                               lead=lead)
        self.up_proj = Dense(config, (e,), (m,), ("embed",), ("mlp",), rngs=rngs, bias=True,
                             lead=lead)
        self.down_proj = Dense(config, (m,), (e,), ("mlp",), ("embed",), rngs=rngs, bias=True,
                               lead=lead)

    def __call__(self, x: Array) -> Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nnx.Module):
    """One pre-norm block; with ``lead=(depth,)`` it holds all blocks stacked."""

    def __init__(self, config: VisionConfig, *, rngs: nnx.Rngs, lead: tuple[int, ...] = ()):
        self.norm1 = RMSNorm(config, rngs=rngs, lead=lead)
        self.attn = VisionAttention(config, rngs=rngs, lead=lead)
        self.norm2 = RMSNorm(config, rngs=rngs, lead=lead)
        self.mlp = VisionMLP(config, rngs=rngs, lead=lead)

    def __call__(self, x: Array, cos: Array, sin: Array, mask: Array) -> Array:
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """RMSNorm, then each ``u`` consecutive patches (one merge block) concatenated and mapped
    to the language model's width by a GELU MLP."""

    def __init__(self, config: VisionConfig, *, rngs: nnx.Rngs):
        wide = config.hidden_size * config.merge_unit
        self.ln_q = RMSNorm(config, rngs=rngs)
        self.mlp_0 = Dense(config, (wide,), (wide,), ("embed",), ("mlp",), rngs=rngs, bias=True)
        self.mlp_2 = Dense(config, (wide,), (config.out_hidden_size,), ("mlp",), ("embed",),
                           rngs=rngs, bias=True)
        self.wide = wide

    def __call__(self, x: Array) -> Array:
        """``[N, E]`` -> ``[N/u, out_hidden_size]``."""
        x = self.ln_q(x).reshape(-1, self.wide)
        return self.mlp_2(jax.nn.gelu(self.mlp_0(x), approximate=False))


class VisionTransformer(nnx.Module):
    """The whole tower: ``pixel_values [N, C*T*P*P]`` -> image features ``[N/u, O]``, one row
    per image placeholder token, images in grid order."""

    def __init__(self, config: VisionConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.patch_embed = Dense(config, (config.patch_dim,), (config.hidden_size,), (None,),
                                 ("embed",), rngs=rngs)
        self.blocks = VisionBlock(config, rngs=rngs, lead=(config.depth,))
        self.merger = PatchMerger(config, rngs=rngs)

    def __call__(self, pixel_values: Array, grid: Grid) -> Array:
        """``pixel_values [N, C*T*P*P]`` of the images of ``grid`` (static) -> ``[N/u, O]``."""
        layout = patch_layout(grid, self.config)
        if pixel_values.shape != (layout.order.shape[0], self.config.patch_dim):
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; the grid "
                             f"{grid} needs {(layout.order.shape[0], self.config.patch_dim)}")
        return self.run(pixel_values, layout)

    def run(self, pixel_values: Array, layout: "PatchLayout") -> Array:
        """The tower over a precomputed layout: ``pixel_values [N, C*T*P*P]`` (padding patches
        after the real ones) -> ``[N/u, O]``, the real images' features first, in grid order;
        the rows of padding units are finite and meaningless."""
        config = self.config
        dtype = jnp.dtype(config.compute_dtype)
        x = self.patch_embed(pixel_values.astype(dtype))[layout.order][None]
        cos, sin = _rope_tables_2d(jnp.asarray(layout.positions), config)
        window_ids, frame_ids = jnp.asarray(layout.window_ids), jnp.asarray(layout.frame_ids)
        window_mask = (window_ids[:, None] == window_ids[None, :])[None]
        frame_mask = (frame_ids[:, None] == frame_ids[None, :])[None]
        full = jnp.asarray(np.isin(np.arange(config.depth), config.fullatt_block_indexes))

        graphdef, state = nnx.split(self.blocks)

        def step(x: Array, block_in: tuple) -> tuple[Array, None]:
            state, full_attention = block_in
            mask = jnp.where(full_attention, frame_mask, window_mask)
            return nnx.merge(graphdef, state)(x, cos, sin, mask), None

        x, _ = lax.scan(step, x, (state, full))
        merged = self.merger(x[0])
        return merged[layout.unit_index]


class PatchLayout(NamedTuple):
    """The grid-dependent inputs of :meth:`VisionTransformer.run`, all int32, window order
    (``N`` patches, ``u`` patches per merge unit).

    Attributes:
        order: ``[N]`` the row of ``pixel_values`` at each position of the window order.
        positions: ``[N, 2]`` (row, column) of each of those patches.
        window_ids: ``[N]`` the attention window of each (windowed blocks attend within one).
        frame_ids: ``[N]`` the frame (image, temporal slice) of each (full-attention blocks).
        unit_index: ``[N/u]`` for each merge unit in grid order, its window-order position.

    Padding patches have window and frame id -1 (they attend among themselves only, so every
    real patch's result is unchanged) and position (0, 0); padding units come last.
    """

    order: Any
    positions: Any
    window_ids: Any
    frame_ids: Any
    unit_index: Any


def patch_layout(grid: Grid, config: VisionConfig,
                 num_patches: Optional[int] = None) -> PatchLayout:
    """The :class:`PatchLayout` (numpy) of the images of ``grid``, padded to ``num_patches``
    patches (default: no padding; a multiple of ``merge_unit`` at least the grid's count)."""
    u = config.merge_unit
    window_index, window_ids, frame_ids = window_layout(grid, config)
    real = len(window_ids)
    total = real if num_patches is None else int(num_patches)
    if total < real or total % u:
        raise ValueError(f"num_patches={total} must be a multiple of merge_unit={u} and at least "
                         f"the grid's {real} patches")
    pad = total - real
    order = (window_index[:, None] * u + np.arange(u)).reshape(-1)
    positions = patch_positions(grid, config)[order]
    filler = np.full(pad, -1, np.int32)
    return PatchLayout(
        order=np.concatenate([order, np.arange(real, total)]).astype(np.int32),
        positions=np.concatenate([positions, np.zeros((pad, 2), np.int32)]).astype(np.int32),
        window_ids=np.concatenate([window_ids, filler]).astype(np.int32),
        frame_ids=np.concatenate([frame_ids, filler]).astype(np.int32),
        unit_index=np.concatenate([np.argsort(window_index),
                                   np.arange(real // u, total // u)]).astype(np.int32))


def num_image_tokens(grid: Grid, config: VisionConfig) -> tuple[int, ...]:
    """Placeholder tokens (merged patches) of each image: ``t * h * w / u``."""
    return tuple(t * h * w // config.merge_unit for t, h, w in grid)


@functools.lru_cache(maxsize=None)
def _graphdef(config: VisionConfig) -> nnx.GraphDef:
    return nnx.split(nnx.eval_shape(lambda: VisionTransformer(config, rngs=nnx.Rngs(0))))[0]


def as_module(params: Params, config: VisionConfig) -> VisionTransformer:
    """The :class:`VisionTransformer` over a parameter tree (cheap: ``nnx.merge`` of a cached
    graph definition, so pure functions call it inside jit)."""
    return nnx.merge(_graphdef(config), params)


@functools.partial(jax.jit, static_argnames=("config", "grid"))
def _features(params: Params, config: VisionConfig, pixel_values: Array, grid: Grid) -> Array:
    return as_module(params, config)(pixel_values, grid)


def vision_features(params: Params, config: VisionConfig, pixel_values: Array,
                    image_grid_thw: Any) -> Array:
    """Image features ``[sum(num_image_tokens), out_hidden_size]`` in the vision compute dtype.

    Args:
        params: the vision tower's parameter tree (``params["visual"]`` of the full model).
        config: its config (static).
        pixel_values: ``[N, C*T*P*P]`` as HF's processor gives them.
        image_grid_thw: ``[num_images, 3]`` host data (array or sequence); see the module
            docstring: each distinct grid compiles once.
    """
    return _features(params, config, jnp.asarray(pixel_values), as_grid(image_grid_thw))


def split_features(features: Array, grid: Sequence[Sequence[int]],
                   config: VisionConfig) -> list[Array]:
    """The rows of each image: ``[K, O]`` -> ``[K_i, O]`` per image."""
    bounds = np.cumsum(num_image_tokens(as_grid(grid), config))[:-1]
    return jnp.split(features, bounds)
