"""Jitted batched generation for Qwen2.5-VL: prompts with images in, sampled continuations out.

    from hiper_jax.models.qwen2_5_vl import sampling as vl_sampling
    tokens, mask = pad_prompts(prompt_ids, pad_token_id=pad, length_multiple=64)
    out = vl_sampling.generate(params, config, tokens, mask, pixel_values, image_grid_thw, key,
                               SamplingConfig(max_new_tokens=64, stop_token_ids=(eos,)))
    out.tokens [B, N], out.logprobs [B, N], out.lengths [B]      (hiper_jax.sampling's output)

    # The same in two steps (the host part can run while the device is busy):
    prompt = vl_sampling.prepare_prompt(config, tokens, mask, pixel_values, image_grid_thw)
    out = vl_sampling.generate_from_prompt(params, config, prompt, key, sampling)

Prefill (one jitted program with the decode loop): the vision tower runs once over the patches
of every image of the batch, its features replace the placeholder tokens, and the language model
reads the prompt at its 3-D M-RoPE positions (:func:`~hiper_jax.models.qwen2_5_vl.rope_index`,
computed on the host; left padding sits at position 0 and is masked out), filling the KV cache.
Decode: the loop of :func:`hiper_jax.sampling.decode`, the one the Qwen2 sampler runs (sampling
settings, stop tokens, :class:`~hiper_jax.sampling.DecodeConstraint`, log-probs of the sampled
distribution); generated token ``s`` (from 0) of a row has position ``max prompt position + 1 + s``
on all three axes, which is transformers' ``rope_deltas`` rule.

Static shapes, so few programs compile: the batch ``B`` and prompt length ``P`` (bucket them with
:func:`hiper_jax.sampling.pad_prompts`) and the patch count. The patches of all images are padded
to ``bucket_size(N, patch_multiple)`` (:func:`hiper_jax.rollout.packing.bucket_size`: the smallest
``patch_multiple * {1, 1.5} * 2^k`` that holds them); the grid becomes data
(:class:`~hiper_jax.models.qwen2_5_vl.vision.PatchLayout`), so any number and sizes of images with
the same padded count share one program. Padding patches attend only among themselves and their
features are never read.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from hiper_jax.models import qwen2
from hiper_jax.models.qwen2.model import KVCache, Params
from hiper_jax.models.qwen2_5_vl import vision
from hiper_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from hiper_jax.models.qwen2_5_vl.model import UnsupportedInputError, forward, rope_index
from hiper_jax.rollout.packing import bucket_size
from hiper_jax.sampling import (DecodeConstraint, GenerationOutput, SamplingConfig,
                                check_constraint, check_prompts, decode)
from hiper_jax.shapes import check_shape, check_type

Array = jax.Array

DEFAULT_PATCH_MULTIPLE = 256  # one 224 x 224 image at patch size 14


class VisionPrompt(NamedTuple):
    """A batch of prompts with their images, ready for :func:`generate_from_prompt`.

    Attributes:
        tokens: ``[B, P]`` int32 left-padded prompts holding each image's placeholder run.
        mask: ``[B, P]`` int32, 1 for prompt tokens, 0 for left padding.
        positions: ``[3, B, P]`` int32 M-RoPE positions (0 at padding).
        pixel_values: ``[N_b, C*T*P*P]`` float32, the patches of every image in grid order, then
            zero patches up to the bucketed count ``N_b``; None for a text-only batch.
        layout: the :class:`~hiper_jax.models.qwen2_5_vl.vision.PatchLayout` of those ``N_b``
            patches; None for a text-only batch.
    """

    tokens: Any
    mask: Any
    positions: Any
    pixel_values: Any = None
    layout: Optional[vision.PatchLayout] = None


def prepare_prompt(config: Qwen2_5_VLConfig, prompt_tokens: Any, prompt_mask: Any = None,
                   pixel_values: Any = None, image_grid_thw: Any = None,
                   patch_multiple: int = DEFAULT_PATCH_MULTIPLE) -> VisionPrompt:
    """The host half of :func:`generate`: checks the inputs, computes the 3-D positions and pads
    the patches to their bucket (numpy arrays).

    Args:
        config: the model config.
        prompt_tokens: ``[B, P]`` int, left-padded prompts; each image is one run of
            ``t * h * w / merge**2`` placeholder tokens, images in ``image_grid_thw`` order over
            the batch (row-major).
        prompt_mask: ``[B, P]`` 0/1 (0: left padding); None: no padding.
        pixel_values: ``[N, C*T*P*P]`` the images' patches as HF's processor gives them (None for
            a text-only batch).
        image_grid_thw: ``[num_images, 3]`` (temporal, height, width in patches).
        patch_multiple: the patch-count bucket unit (a multiple of ``merge_unit``).

    Raises:
        ValueError: bad ranks or dtypes, ``pixel_values`` and ``image_grid_thw`` not given
            together, or ``pixel_values`` not the grid's ``[N, C*T*P*P]``.
        UnsupportedInputError: placeholders that do not match the grid (a run of the wrong
            length, more or fewer runs than images, placeholders inside the padding), videos.
    """
    tokens = np.asarray(prompt_tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"prompt_tokens must be [B, P] int, got shape {tokens.shape} "
                         f"dtype {tokens.dtype}")
    mask = (np.ones(tokens.shape, np.int32) if prompt_mask is None
            else (np.asarray(prompt_mask) != 0).astype(np.int32))
    if mask.shape != tokens.shape:
        raise ValueError(f"prompt_mask has shape {mask.shape}, but prompt_tokens has shape "
                         f"{tokens.shape}; they must match")
    grid = () if image_grid_thw is None or np.size(image_grid_thw) == 0 else vision.as_grid(
        image_grid_thw)
    if (pixel_values is None) != (not grid):
        raise ValueError("pass pixel_values and image_grid_thw together (both or neither)")
    positions, _ = rope_index(config, tokens, grid, mask)
    expected = sum(vision.num_image_tokens(grid, config.vision))
    found = int(np.sum(tokens == config.image_token_id))
    if found != expected:
        raise UnsupportedInputError(f"prompt_tokens hold {found} image placeholders (padding "
                                    f"included); the images' grid gives {expected} features")
    prompt = VisionPrompt(tokens.astype(np.int32), mask, positions)
    if not grid:
        return prompt
    vconfig = config.vision
    if patch_multiple < 1 or patch_multiple % vconfig.merge_unit:
        raise ValueError(f"patch_multiple={patch_multiple} must be a positive multiple of "
                         f"merge_unit={vconfig.merge_unit}")
    count = sum(t * h * w for t, h, w in grid)
    pixels = np.asarray(pixel_values, np.float32)
    if pixels.shape != (count, vconfig.patch_dim):
        raise ValueError(f"pixel_values has shape {pixels.shape}; image_grid_thw {list(grid)} "
                         f"needs {(count, vconfig.patch_dim)} ({count} patches)")
    padded = bucket_size(count, patch_multiple)
    pixels = np.concatenate([pixels, np.zeros((padded - count, vconfig.patch_dim), np.float32)])
    return prompt._replace(pixel_values=pixels,
                           layout=vision.patch_layout(grid, vconfig, num_patches=padded))


@functools.partial(jax.jit, static_argnames=("config", "sampling"))
def generate_from_prompt(params: Params, config: Qwen2_5_VLConfig, prompt: VisionPrompt,
                         key: Array, sampling: SamplingConfig,
                         constraint: Optional[DecodeConstraint] = None) -> GenerationOutput:
    """Samples up to ``sampling.max_new_tokens`` tokens after each prompt of ``prompt``
    (:func:`prepare_prompt`); ``key``, ``sampling``, ``constraint`` and the output are those of
    :func:`hiper_jax.sampling.generate`.

    Raises:
        ValueError naming the argument when a shape or dtype is wrong (checked while tracing).
    """
    tokens, mask = prompt.tokens, prompt.mask
    check_prompts(tokens, mask, key)
    batch, length = tokens.shape
    check_shape((3, batch, length), "[3, B, P]", **{"prompt.positions": prompt.positions})
    check_type(int, **{"prompt.positions": prompt.positions})
    check_constraint(constraint, batch, config.text.vocab_size)
    mask = mask.astype(jnp.int32)
    positions = prompt.positions.astype(jnp.int32)
    features = None
    if prompt.pixel_values is not None:
        check_shape((None, config.vision.patch_dim), "[N, C*T*P*P]",
                    **{"prompt.pixel_values": prompt.pixel_values})
        check_shape(prompt.pixel_values.shape[:1], "[N]",
                    **{"prompt.layout.order": prompt.layout.order})
        features = vision.as_module(params["visual"], config.vision).run(prompt.pixel_values,
                                                                          prompt.layout)
    # The last generated token is never fed back, so the cache needs max_new - 1 extra slots.
    cache = qwen2.init_cache(config.text, batch, length + sampling.max_new_tokens - 1)
    hidden, cache = forward(params, config, tokens, positions, image_features=features,
                            segment_ids=mask, cache=cache)
    text = params["language_model"]

    def step(last: Array, step_positions: Array, cache: KVCache) -> tuple[Array, KVCache]:
        hidden, cache = forward(params, config, last,
                                jnp.broadcast_to(step_positions[None, :, None], (3, batch, 1)),
                                segment_ids=jnp.ones_like(last), cache=cache)
        return qwen2.lm_head(text, config.text, hidden[:, 0]), cache

    start = jnp.max(jnp.where(mask[None] != 0, positions, -1), axis=(0, 2)) + 1
    return decode(step, qwen2.lm_head(text, config.text, hidden[:, -1]), cache, start, key,
                  sampling, constraint)


def generate(params: Params, config: Qwen2_5_VLConfig, prompt_tokens: Any, prompt_mask: Any,
             pixel_values: Any, image_grid_thw: Any, key: Array, sampling: SamplingConfig,
             constraint: Optional[DecodeConstraint] = None,
             patch_multiple: int = DEFAULT_PATCH_MULTIPLE) -> GenerationOutput:
    """:func:`prepare_prompt` on the host, then :func:`generate_from_prompt` (see both).

    Returns:
        :class:`~hiper_jax.sampling.GenerationOutput`: ``tokens [B, N]``, ``logprobs [B, N]``
        (of the distribution each token was sampled from), ``lengths [B]``, and with a
        constraint its allowed sets.
    """
    prompt = prepare_prompt(config, prompt_tokens, prompt_mask, pixel_values, image_grid_thw,
                            patch_multiple)
    return generate_from_prompt(params, config, prompt, key, sampling, constraint)
