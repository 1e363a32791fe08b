"""Qwen2 / Qwen2.5 decoder as Flax NNX modules, run through pure functions of a parameter tree.

The architecture lives in modules (:class:`Qwen2ForCausalLM`, :class:`Qwen2Model` without the
head, their :class:`DecoderLayer`, :class:`Attention`, :class:`MLP`, :class:`Dense`, ...), and
each ``nnx.Param`` carries its logical axis names as ``out_sharding`` metadata, which
:func:`param_shardings` maps onto a mesh through the rules of :mod:`hiper_jax.models.sharding`.
The rest of the package (sampler, PPO, optimizer, orbax checkpoints) holds the parameters as a
plain nested dict: the module's ``nnx.Param`` state as a pure dict (:func:`module_params`). The
pure entry points (:func:`forward`, :func:`compute_logits`, :func:`token_logprobs`) take that
tree and rebuild the module inside jit with ``nnx.merge`` of a cached graph definition
(:func:`as_module`): the split/merge pattern, chosen over ``nnx.jit`` on module arguments
because optax, orbax, ``jax.grad`` and the sharding code all work on the tree unchanged, and
merging costs nothing once traced (the compiled program is the one the plain-JAX port had).

Layer parameters come in two layouts, and every function here accepts both:

* *stacked* (the default; what loading and ``init_params`` return): each layer parameter has a
  leading ``layers`` axis and the decoder runs the layers with one ``lax.scan``. Compile time
  does not grow with depth, the program shards cleanly over a mesh, and per-layer
  rematerialisation is a flag: the layout for training.
* *unstacked* (:func:`unstack_layers`): ``layers`` is a list of per-layer trees and the layer loop
  is unrolled. Each step of a scan slices its layer's weights out of the stack, which is a copy
  on CPU (and costs memory bandwidth anywhere); token-by-token decoding is bandwidth-bound, so
  the sampler runs faster on unstacked weights.

The KV cache is stacked (``[layers, B, KV, S, D]``, head-major so attention reads it without a
transpose) and updated in place one slot range per call.

Parameter tree (shapes; ``N`` layers, ``E`` hidden, ``H``/``KV`` query/key-value heads, ``D``
head dim, ``M`` MLP width, ``V`` vocab)::

    embed_tokens.embedding                 [V, E]
    layers.input_layernorm.scale           [N, E]
    layers.self_attn.{q,k,v}_proj.kernel   [N, E, H|KV, D]     .bias [N, H|KV, D]
    layers.self_attn.o_proj.kernel         [N, H, D, E]
    layers.post_attention_layernorm.scale  [N, E]
    layers.mlp.{gate,up}_proj.kernel       [N, E, M]
    layers.mlp.down_proj.kernel            [N, M, E]
    norm.scale                             [E]
    lm_head.kernel                         [E, V]   (untied models only)

(unstacked: ``layers`` is a list of ``N`` trees with the same names and no leading ``N``.)

With ``config.lora_rank = r > 0`` each targeted projection also holds ``lora_a [N, *I, r]`` and
``lora_b [N, r, *O]`` (``nnx.LoRAParam``); a tree without them runs as the base model under the
same config (:func:`tree_config`). See :mod:`hiper_jax.models.qwen2.lora`.

Masks are *segment ids* ``[B, L]`` int: 0 marks padding, tokens attend causally to earlier
tokens of the same segment. A HF-style 0/1 ``attention_mask`` is a valid value (one segment per
row, e.g. left-padded prompts); ids 1, 2, 3, ... pack several sequences into one row.
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax
from flax import nnx
from jax.sharding import Mesh

from hiper_jax.models import sharding
from hiper_jax.models.qwen2.config import Qwen2Config

Array = jax.Array
Params = dict[str, Any]

_MASKED = -1e30  # finite, so fully masked (padding) rows give a uniform softmax, never NaN


class ParamSpec(NamedTuple):
    """Shape and logical axis names of one parameter (read from the module's metadata)."""

    shape: tuple[int, ...]
    axes: sharding.LogicalAxes


class KVCache(NamedTuple):
    """Static-size key/value cache of all layers.

    Attributes:
        k, v: ``[layers, B, KV, S, D]`` keys (after RoPE) and values, in the compute dtype.
        segment_ids: ``[B, S]`` int32 segment id of each slot (0: empty or padding).
        index: ``[]`` int32, number of slots written; the next call writes from here on.
    """

    k: Array
    v: Array
    segment_ids: Array
    index: Array


CACHE_AXES = KVCache(
    k=("layers", "batch", "kv_heads", "cache_length", "head_dim"),
    v=("layers", "batch", "kv_heads", "cache_length", "head_dim"),
    segment_ids=("batch", "cache_length"),
    index=(),
)


def init_cache(config: Qwen2Config, batch_size: int, max_length: int,
               dtype: Optional[jnp.dtype] = None) -> KVCache:
    """An empty cache for ``batch_size`` rows of up to ``max_length`` tokens (prompt + new)."""
    shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_length,
             config.head_dim)
    dtype = dtype or jnp.dtype(config.compute_dtype)
    return KVCache(k=sharding.constrain(jnp.zeros(shape, dtype), CACHE_AXES.k),
                   v=sharding.constrain(jnp.zeros(shape, dtype), CACHE_AXES.v),
                   segment_ids=sharding.constrain(jnp.zeros((batch_size, max_length), jnp.int32),
                                                  CACHE_AXES.segment_ids),
                   index=jnp.zeros((), jnp.int32))


def positions_from_segments(segment_ids: Array) -> Array:
    """Position of each token inside its segment: ``[B, L] -> [B, L]`` (0 at padding).

    For a left-padded row ``[0, 0, 1, 1, 1]`` this is ``[0, 0, 0, 1, 2]``, as HF computes from
    an attention mask; packed rows restart at 0 in every segment.
    """
    length = segment_ids.shape[-1]
    index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), segment_ids.shape)
    previous = jnp.pad(segment_ids[..., :-1], [(0, 0)] * (segment_ids.ndim - 1) + [(1, 0)],
                       constant_values=-1)
    starts = jnp.where(segment_ids != previous, index, 0)
    start_of_segment = lax.cummax(starts, axis=segment_ids.ndim - 1)
    return jnp.where(segment_ids != 0, index - start_of_segment, 0)


def _rms_norm(x: Array, scale: Array, eps: float) -> Array:
    """RMSNorm with float32 statistics, result in ``x.dtype`` (as HF computes it)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * normed.astype(x.dtype)


def _rope_tables(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """cos/sin tables ``[B, L, 1, D/2]`` in float32 for rotate-half RoPE."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def _apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates ``x [B, L, N, D]``: the two halves of each head form the complex pairs."""
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    first, second = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


def _attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """Grouped-query attention: ``q [B, L, H, D]``, ``k, v [B, KV, S, D]``, ``mask [B, L, S]``
    -> ``[B, L, H, D]``. Scores and softmax in float32.

    The queries of a KV group are laid out as one ``[G * L, D]`` matrix per (batch, KV head), so
    both products are plain batched matmuls (1.3x-2x faster on XLA CPU than contracting a
    5-D layout, measured at B=16, L=256 and at 0.5B shapes).
    """
    batch, length, heads, head_dim = q.shape
    kv_heads, span = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    q = q.reshape(batch, length, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
    q = q.reshape(batch, kv_heads, groups * length, head_dim)
    scores = jnp.einsum("bkmd,bksd->bkms", q, k, preferred_element_type=jnp.float32)
    scores = scores.reshape(batch, kv_heads, groups, length, span)
    scores = jnp.where(mask[:, None, None], scores * head_dim ** -0.5, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkms,bksd->bkmd", probs.reshape(batch, kv_heads, groups * length, span), v)
    out = out.reshape(batch, kv_heads, groups, length, head_dim).transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, length, heads, head_dim)


def _dense(x: Array, kernel: Array, preferred_element_type=None) -> Array:
    """``x [..., I] @ kernel [I, *O]`` -> ``[..., *O]`` as one 2-D matmul.

    XLA CPU differentiates 3-D einsums such as ``ble,em->blm`` 3x-4x slower than the same
    product on flattened rows; the flattening is free and shards like the batch axis.
    """
    lead, width = x.shape[:-1], x.shape[-1]
    out_shape = kernel.shape[1:]
    flat = jnp.matmul(x.reshape(-1, width), kernel.reshape(width, -1),
                      preferred_element_type=preferred_element_type)
    return flat.reshape(lead + out_shape)


def _param(rngs: nnx.Rngs, config: Qwen2Config, shape: tuple[int, ...],
           axes: sharding.LogicalAxes, init: str) -> nnx.Param:
    """One parameter in ``config.param_dtype``: ``init`` is "normal" (normal(0,
    initializer_range)), "zeros" or "ones"; ``axes`` (logical names) become its ``out_sharding``
    metadata, which :func:`param_shardings` maps onto a mesh (never sharded at creation: the
    jitted :func:`init_params` and the loader place every array themselves)."""
    dtype = jnp.dtype(config.param_dtype)
    if init == "normal":
        value = (config.initializer_range
                 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    else:
        value = jnp.full(shape, 1.0 if init == "ones" else 0.0, dtype)
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def _layer_axes(lead: tuple[int, ...]) -> sharding.LogicalAxes:
    return ("layers",) * len(lead)


class Embed(nnx.Module):
    """Token embedding ``embedding [V, E]``; also the output head of tied models."""

    def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs):
        self.embedding = _param(rngs, config, (config.vocab_size, config.hidden_size),
                                ("vocab", "embed"), "normal")

    def __call__(self, tokens: Array, dtype: jnp.dtype) -> Array:
        """``tokens [B, L]`` -> ``[B, L, E]`` in ``dtype``."""
        return jnp.take(self.embedding[...], tokens, axis=0).astype(dtype)


class RMSNorm(nnx.Module):
    """RMSNorm with a learned ``scale [*lead, E]``."""

    def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs, lead: tuple[int, ...] = ()):
        self.scale = _param(rngs, config, lead + (config.hidden_size,),
                            _layer_axes(lead) + ("embed",), "ones")
        self.eps = config.rms_norm_eps

    def __call__(self, x: Array) -> Array:
        return _rms_norm(x, self.scale[...], self.eps)


class Dense(nnx.Module):
    """A projection whose input and output may span several axes: ``kernel [*lead, *I, *O]``,
    optional ``bias [*lead, *O]`` (``lead`` is the stacked-layer axis, if any).

    It runs as one 2-D matmul on flattened rows and flattened ``I`` (see :func:`_dense`).
    Flattening ``(heads, head_dim)`` of o_proj's input too matters: contracting them as two
    axes makes XLA transpose the whole kernel on every call instead of the small activation.
    """

    def __init__(self, config: Qwen2Config, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
                 in_axes: sharding.LogicalAxes, out_axes: sharding.LogicalAxes, *,
                 rngs: nnx.Rngs, bias: bool = False, lead: tuple[int, ...] = (),
                 lora_rank: int = 0, lora_scale: float = 0.0):
        self.kernel = _param(rngs, config, lead + in_shape + out_shape,
                             _layer_axes(lead) + in_axes + out_axes, "normal")
        self.bias = (_param(rngs, config, lead + out_shape, _layer_axes(lead) + out_axes, "zeros")
                     if bias else None)
        self.in_dims = len(in_shape)
        self.lora_scale = lora_scale
        self.lora_a, self.lora_b = (
            _lora_params(rngs, config, lead, in_shape, out_shape, in_axes, out_axes, lora_rank)
            if lora_rank else (None, None))

    def __call__(self, x: Array) -> Array:
        """``x [..., *I]`` -> ``[..., *O]`` in ``x.dtype`` (plus the LoRA term, if any)."""
        kernel = self.kernel[...].astype(x.dtype)
        in_shape, out_shape = kernel.shape[:self.in_dims], kernel.shape[self.in_dims:]
        width = math.prod(in_shape)
        flat_in = x if self.in_dims == 1 else x.reshape(x.shape[:-self.in_dims] + (width,))
        y = _dense(flat_in, kernel if self.in_dims == 1 else kernel.reshape((width,) + out_shape))
        if self.lora_a is not None:
            # Two thin matmuls, never the [I, O] product: (x @ A) is [..., r].
            a = self.lora_a[...].astype(x.dtype).reshape(width, -1)
            y = y + self.lora_scale * _dense(_dense(flat_in, a), self.lora_b[...].astype(x.dtype))
        return y if self.bias is None else y + self.bias[...].astype(x.dtype)


def _lora_params(rngs: nnx.Rngs, config: Qwen2Config, lead: tuple[int, ...],
                 in_shape: tuple[int, ...], out_shape: tuple[int, ...],
                 in_axes: sharding.LogicalAxes, out_axes: sharding.LogicalAxes,
                 rank: int) -> tuple[nnx.LoRAParam, nnx.LoRAParam]:
    """LoRA adapters of one projection: ``lora_a [*lead, *I, r]`` ~ uniform(+-1/sqrt(prod I))
    (the bound of PyTorch's default linear init, which peft uses) and ``lora_b [*lead, r, *O]``
    zeros, so a fresh adapter changes nothing. They keep the kernel's logical axes on their
    ``I`` / ``O`` dimensions (sharded as the kernel is) and ``lora_rank`` (replicated) on ``r``."""
    dtype = jnp.dtype(config.param_dtype)
    bound = 1.0 / math.sqrt(math.prod(in_shape))
    a = jax.random.uniform(rngs.params(), lead + in_shape + (rank,), jnp.float32, -bound, bound)
    b = jnp.zeros(lead + (rank,) + out_shape, dtype)
    layer_axes = _layer_axes(lead)
    return (nnx.LoRAParam(a.astype(dtype), out_sharding=layer_axes + tuple(in_axes) + ("lora_rank",),
                          eager_sharding=False),
            nnx.LoRAParam(b, out_sharding=layer_axes + ("lora_rank",) + tuple(out_axes),
                          eager_sharding=False))


def _lora(config: Qwen2Config, name: str) -> dict[str, Any]:
    """:class:`Dense`'s LoRA arguments for the projection ``name`` under ``config``."""
    if not config.lora_rank or name not in config.lora_targets:
        return {}
    return {"lora_rank": config.lora_rank, "lora_scale": config.lora_scale}


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE and biased q/k/v projections."""

    def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs, lead: tuple[int, ...] = ()):
        e, h, kv, d = (config.hidden_size, config.num_attention_heads,
                       config.num_key_value_heads, config.head_dim)
        self.q_proj = Dense(config, (e,), (h, d), ("embed",), ("heads", "head_dim"), rngs=rngs,
                            bias=True, lead=lead, **_lora(config, "q_proj"))
        self.k_proj = Dense(config, (e,), (kv, d), ("embed",), ("kv_heads", "head_dim"),
                            rngs=rngs, bias=True, lead=lead, **_lora(config, "k_proj"))
        self.v_proj = Dense(config, (e,), (kv, d), ("embed",), ("kv_heads", "head_dim"),
                            rngs=rngs, bias=True, lead=lead, **_lora(config, "v_proj"))
        self.o_proj = Dense(config, (h, d), (e,), ("heads", "head_dim"), ("embed",), rngs=rngs,
                            lead=lead, **_lora(config, "o_proj"))

    def __call__(self, x: Array, cos: Array, sin: Array, mask: Array,
                 cache: Optional[tuple[Array, Array, Any, Array]] = None
                 ) -> tuple[Array, Optional[Array], Optional[Array]]:
        """``x [B, L, E]`` -> ``([B, L, E]``, updated cache keys, values).

        ``cos, sin [B, L, 1, D/2]`` (:func:`_rope_tables`), ``mask [B, L, S]``; ``cache`` is
        ``(k, v, layer_index, slot)`` with the stacked ``k, v [layers, B, KV, S, D]``: this
        layer's keys and values are written from ``slot`` on and attention reads all ``S``.
        """
        dtype = x.dtype
        q = _apply_rope(self.q_proj(x), cos, sin)
        k = _apply_rope(self.k_proj(x), cos, sin).swapaxes(1, 2)
        v = self.v_proj(x).swapaxes(1, 2)
        kv_axes = ("batch", "kv_heads", "length", "head_dim")
        q = sharding.constrain(q, ("batch", "length", "heads", "head_dim"))
        k, v = sharding.constrain(k, kv_axes), sharding.constrain(v, kv_axes)
        cache_k = cache_v = None
        if cache is not None:
            cache_k, cache_v, layer_index, slot = cache
            start = (layer_index, 0, 0, slot, 0)
            cache_k = lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype)[None], start)
            cache_v = lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype)[None], start)
            k = cache_k[layer_index].astype(dtype)
            v = cache_v[layer_index].astype(dtype)
        attn = _attention(q, k, v, mask)
        return self.o_proj(attn), cache_k, cache_v


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs, lead: tuple[int, ...] = ()):
        e, m = config.hidden_size, config.intermediate_size
        self.gate_proj = Dense(config, (e,), (m,), ("embed",), ("mlp",), rngs=rngs, lead=lead,
                               **_lora(config, "gate_proj"))
        self.up_proj = Dense(config, (e,), (m,), ("embed",), ("mlp",), rngs=rngs, lead=lead,
                             **_lora(config, "up_proj"))
        self.down_proj = Dense(config, (m,), (e,), ("mlp",), ("embed",), rngs=rngs, lead=lead,
                               **_lora(config, "down_proj"))

    def __call__(self, x: Array) -> Array:
        hidden = sharding.constrain(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x),
                                    ("batch", "length", "mlp"))
        return self.down_proj(hidden)


class DecoderLayer(nnx.Module):
    """One pre-norm decoder block; with ``lead=(N,)`` it holds all ``N`` layers stacked."""

    def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs, lead: tuple[int, ...] = ()):
        self.input_layernorm = RMSNorm(config, rngs=rngs, lead=lead)
        self.self_attn = Attention(config, rngs=rngs, lead=lead)
        self.post_attention_layernorm = RMSNorm(config, rngs=rngs, lead=lead)
        self.mlp = MLP(config, rngs=rngs, lead=lead)

    def __call__(self, x: Array, cos: Array, sin: Array, mask: Array,
                 cache: Optional[tuple[Array, Array, Any, Array]] = None
                 ) -> tuple[Array, Optional[Array], Optional[Array]]:
        """``x [B, L, E]`` -> ``([B, L, E]``, cache keys, values); see :meth:`Attention.__call__`."""
        attn, cache_k, cache_v = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return sharding.constrain(x, ("batch", "length", "embed")), cache_k, cache_v


class Qwen2Model(nnx.Module):
    """The decoder without its output head (what a separate critic runs on).

    ``stacked=True`` (the default) holds the layers as one :class:`DecoderLayer` with a leading
    ``layers`` axis, run by ``lax.scan``; ``stacked=False`` as an ``nnx.List`` of layers, run
    unrolled (see the module docstring).
    """

    def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs, stacked: bool = True):
        self.config = config
        self.embed_tokens = Embed(config, rngs=rngs)
        n = config.num_hidden_layers
        self.layers = (DecoderLayer(config, rngs=rngs, lead=(n,)) if stacked
                       else nnx.List([DecoderLayer(config, rngs=rngs) for _ in range(n)]))
        self.norm = RMSNorm(config, rngs=rngs)

    def __call__(self, tokens: Array, *, segment_ids: Optional[Array] = None,
                 positions: Optional[Array] = None, cache: Optional[KVCache] = None,
                 remat: bool = False, embeddings: Optional[Array] = None,
                 rope: Optional[tuple[Array, Array]] = None) -> tuple[Array, Optional[KVCache]]:
        """``tokens [B, L]`` -> (final normed hidden states ``[B, L, E]``, cache); see
        :func:`forward`.

        Two hooks for models that reuse this decoder (the Qwen2.5-VL language model):
        ``embeddings [B, L, E]`` replace the token embedding lookup (``tokens`` then only gives
        the shape), and ``rope = (cos, sin)``, each ``[B, L, 1, D/2]``, replace the tables
        computed from ``positions`` (multimodal rotary positions).
        """
        config = self.config
        batch, length = tokens.shape
        dtype = jnp.dtype(config.compute_dtype)
        if segment_ids is None:
            segment_ids = jnp.ones((batch, length), jnp.int32)
        segment_ids = segment_ids.astype(jnp.int32)
        if rope is not None:
            cos, sin = rope
        else:
            if positions is None:
                positions = positions_from_segments(segment_ids)
                if cache is not None:
                    positions = positions + jnp.sum(cache.segment_ids != 0, axis=1, keepdims=True)
            cos, sin = _rope_tables(positions, config.head_dim, config.rope_theta)

        if cache is None:
            query_slots = key_slots = jnp.arange(length)
            key_segments = segment_ids
        else:
            query_slots = cache.index + jnp.arange(length)
            key_slots = jnp.arange(cache.segment_ids.shape[1])
            key_segments = lax.dynamic_update_slice_in_dim(cache.segment_ids, segment_ids,
                                                           cache.index, axis=1)
        mask = ((key_slots[None, None, :] <= query_slots[None, :, None])
                & (key_segments[:, None, :] == segment_ids[:, :, None]))

        x = self.embed_tokens(tokens, dtype) if embeddings is None else embeddings.astype(dtype)
        x = sharding.constrain(x, ("batch", "length", "embed"))

        def layer_step(graphdef: nnx.GraphDef) -> Callable:
            # Pure in (carry, (layer state, index)): the scan slices the stacked state and each
            # step rebuilds one layer's module from its slice.
            def step(carry: tuple, layer_in: tuple) -> tuple:
                x, cache_k, cache_v = carry
                state, layer_index = layer_in
                layer_cache = None if cache_k is None else (cache_k, cache_v, layer_index,
                                                            cache.index)
                return nnx.merge(graphdef, state)(x, cos, sin, mask, layer_cache), None
            return jax.checkpoint(step, prevent_cse=False) if remat else step

        carry = (x, None, None) if cache is None else (x, cache.k, cache.v)
        if isinstance(self.layers, DecoderLayer):
            graphdef, state = nnx.split(self.layers)
            carry, _ = lax.scan(layer_step(graphdef), carry,
                                (state, jnp.arange(config.num_hidden_layers)),
                                unroll=min(config.scan_unroll, config.num_hidden_layers))
        else:
            for index, layer in enumerate(self.layers):
                graphdef, state = nnx.split(layer)
                carry, _ = layer_step(graphdef)(carry, (state, index))
        x, cache_k, cache_v = carry
        hidden = self.norm(x)
        if cache is None:
            return hidden, None
        return hidden, KVCache(cache_k, cache_v, key_segments, cache.index + length)


class Qwen2ForCausalLM(Qwen2Model):
    """The decoder plus its output head: ``lm_head.kernel [E, V]`` for untied models, the
    embedding for tied ones."""

    def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs, stacked: bool = True):
        super().__init__(config, rngs=rngs, stacked=stacked)
        self.lm_head = (None if config.tie_word_embeddings else
                        Dense(config, (config.hidden_size,), (config.vocab_size,), ("embed",),
                              ("vocab",), rngs=rngs))

    def logits(self, hidden: Array) -> Array:
        """Logits ``[..., V]`` in float32 from hidden states ``[..., E]``."""
        hidden = hidden.astype(jnp.dtype(self.config.compute_dtype))
        if self.lm_head is None:
            weight = self.embed_tokens.embedding[...].astype(hidden.dtype).T
        else:
            weight = self.lm_head.kernel[...].astype(hidden.dtype)
        return _dense(hidden, weight, preferred_element_type=jnp.float32)


# Modules <-> parameter trees. A module's state as a pure dict (``nnx.to_pure_dict``) is the
# parameter tree of the module docstring, except that an ``nnx.List`` of layers becomes a dict
# keyed 0, 1, ...: the conversions below turn it into the plain list the unstacked layout uses.

def abstract_specs(create: Callable[[], nnx.Module]) -> tuple[nnx.GraphDef, Params]:
    """Graph definition and parameter tree of :class:`ParamSpec` (shape, logical axes from each
    ``nnx.Param``'s ``out_sharding``) of the module ``create()`` builds, without any data.

    The module is traced in a worker thread: JAX's mesh and trace contexts are per thread, so
    this works the same when called under ``jax.set_mesh`` or inside a jitted function (where
    flax would otherwise resolve the logical axis names against the mesh and fail)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        module = pool.submit(nnx.eval_shape, create).result()
    specs: Params = {}
    for path, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Param):
            _set_path(specs, path, ParamSpec(tuple(node.shape), node.get_metadata()["out_sharding"]))
    return nnx.split(module)[0], _lists(specs)


@functools.lru_cache(maxsize=None)
def _abstract(cls: type, config: Qwen2Config, stacked: bool) -> tuple[nnx.GraphDef, Params]:
    """:func:`abstract_specs` of ``cls(config)``, cached."""
    return abstract_specs(lambda: cls(config, rngs=nnx.Rngs(0), stacked=stacked))


def _set_path(tree: Params, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _lists(tree: Any) -> Any:
    """A pure-dict module state with its ``layers`` dict ``{0: ..., 1: ...}`` as a list."""
    if isinstance(tree, dict) and isinstance(tree.get("layers"), dict) \
            and all(isinstance(k, int) for k in tree["layers"]):
        layers = tree["layers"]
        return dict(tree, layers=[layers[i] for i in range(len(layers))])
    return tree


def module_params(module: nnx.Module) -> Params:
    """The parameter tree of a model module (its ``nnx.Param`` state as plain nested dicts)."""
    return _lists(nnx.to_pure_dict(nnx.state(module, nnx.Param)))


LORA_LEAVES = ("lora_a", "lora_b")


def has_adapters(params: Any) -> bool:
    """Whether a parameter tree holds LoRA adapters (``lora_a`` / ``lora_b`` leaves)."""
    if isinstance(params, dict):
        return any(k in LORA_LEAVES or has_adapters(v) for k, v in params.items())
    if isinstance(params, (list, tuple)):
        return any(has_adapters(v) for v in params)
    return False


def tree_config(params: Params, config: Qwen2Config) -> Qwen2Config:
    """The config a tree runs under: ``config`` when the tree holds adapters, else the base
    config (:meth:`Qwen2Config.without_lora`). So the base weights alone are the model with
    the adapters off (the reference policy of a LoRA run), and no copy is needed for it.

    Raises:
        ValueError: the tree holds adapters but ``config.lora_rank`` is 0.
    """
    if has_adapters(params):
        if not config.lora_rank:
            raise ValueError("the parameter tree holds LoRA adapters (lora_a/lora_b) but "
                             "config.lora_rank is 0; pass the config they were made with, or "
                             "merge them first (qwen2.lora.merge_lora)")
        return config
    return config.without_lora()


def as_module(params: Params, config: Qwen2Config, cls: type = Qwen2ForCausalLM) -> nnx.Module:
    """The module ``cls`` (:class:`Qwen2ForCausalLM` or :class:`Qwen2Model`) over ``params``
    (stacked or unstacked; a :class:`Qwen2Model` ignores ``lm_head``). Cheap: ``nnx.merge`` of a
    cached graph definition with the given arrays, so pure functions call it inside jit.
    A tree without adapters runs as the base model even under a LoRA ``config``
    (:func:`tree_config`)."""
    config = tree_config(params, config)
    stacked = not isinstance(params["layers"], (list, tuple))
    graphdef, specs = _abstract(cls, config, stacked)
    tree = {name: params[name] for name in specs}
    if not stacked:
        tree["layers"] = dict(enumerate(tree["layers"]))
    return nnx.merge(graphdef, tree)


def param_specs(config: Qwen2Config, stacked: bool = True) -> dict[str, Any]:
    """The parameter tree of ``config`` with :class:`ParamSpec` leaves (shape, logical axes),
    read from the abstract :class:`Qwen2ForCausalLM`."""
    return _abstract(Qwen2ForCausalLM, config, stacked)[1]


def _spec_leaves(fn, config: Qwen2Config, stacked: bool) -> Any:
    return jax.tree.map(fn, param_specs(config, stacked),
                        is_leaf=lambda x: isinstance(x, ParamSpec))


def param_axes(config: Qwen2Config, stacked: bool = True) -> Any:
    """The parameter tree with each leaf replaced by its logical axis names."""
    return _spec_leaves(lambda s: s.axes, config, stacked)


def param_shapes(config: Qwen2Config, stacked: bool = True) -> Any:
    """The parameter tree with each leaf replaced by its shape."""
    return _spec_leaves(lambda s: s.shape, config, stacked)


def param_shardings(config: Qwen2Config, mesh: Mesh,
                    rules: sharding.AxisRules = sharding.DEFAULT_RULES,
                    stacked: bool = True) -> Any:
    """NamedShardings of every parameter on ``mesh`` under ``rules`` (same tree as the params)."""
    return sharding.named_shardings(param_axes(config, stacked), param_shapes(config, stacked),
                                    mesh, rules)


def unstack_layers(params: Params, dtype: Optional[jnp.dtype] = None) -> Params:
    """Stacked -> unstacked layout (optionally cast, e.g. fp32 master weights to bf16 for
    sampling). Makes a copy; jit it with ``out_shardings`` to place the result on a mesh."""
    cast = (lambda x: x) if dtype is None else (lambda x: x.astype(dtype))
    stacked = params["layers"]
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    layers = [jax.tree.map(lambda x: cast(x[i]), stacked) for i in range(num_layers)]
    rest = {k: jax.tree.map(cast, v) for k, v in params.items() if k != "layers"}
    return dict(rest, layers=layers)


def stack_layers(params: Params) -> Params:
    """Unstacked -> stacked layout (the inverse of :func:`unstack_layers`)."""
    return dict(params, layers=jax.tree.map(lambda *xs: jnp.stack(xs), *params["layers"]))


def count_params(config: Qwen2Config) -> int:
    """Number of parameters of the model (tied embeddings counted once)."""
    return sum(math.prod(s.shape) for s in jax.tree.leaves(
        param_specs(config), is_leaf=lambda x: isinstance(x, ParamSpec)))


def init_params(key: Array, config: Qwen2Config, mesh: Optional[Mesh] = None,
                rules: sharding.AxisRules = sharding.DEFAULT_RULES) -> Params:
    """Random parameters (normal(0, initializer_range) weights, zero biases, unit norms) in
    ``config.param_dtype``: a fresh :class:`Qwen2ForCausalLM`'s state, created by one jitted
    function directly on its shardings when a mesh is given (never whole on one device)."""
    return _initializer(config, mesh, tuple(rules))(key)


@functools.lru_cache(maxsize=None)
def _initializer(config: Qwen2Config, mesh: Optional[Mesh], rules: sharding.AxisRules):
    """The jitted ``key -> params`` of :func:`init_params` (cached per config and placement)."""
    targets = None if mesh is None else param_shardings(config, mesh, rules)
    return jax.jit(lambda key: module_params(Qwen2ForCausalLM(config, rngs=nnx.Rngs(key))),
                   out_shardings=targets)


@functools.partial(jax.jit, static_argnames=("config", "remat"))
def forward(params: Params, config: Qwen2Config, tokens: Array, *,
            segment_ids: Optional[Array] = None, positions: Optional[Array] = None,
            cache: Optional[KVCache] = None, remat: bool = False
            ) -> tuple[Array, Optional[KVCache]]:
    """Runs the decoder: ``tokens [B, L]`` -> final (normed) hidden states ``[B, L, E]``.

    Args:
        params: parameter tree, stacked or unstacked (see module docstring); ``lm_head`` is
            not read (a critic backbone has none).
        config: the architecture (static).
        tokens: ``[B, L]`` int token ids.
        segment_ids: ``[B, L]`` int, 0 for padding (see module docstring); default all ones.
        positions: ``[B, L]`` int RoPE positions; default: position within the segment, after
            the tokens already in ``cache`` (pass them explicitly for packed rows with a cache).
        cache: optional KV cache; the ``L`` new tokens are written at slots ``index ..
            index + L - 1`` and attend to everything cached before them.
        remat: recompute each layer's activations in the backward pass (saves memory).

    Returns:
        ``(hidden [B, L, E]`` in the compute dtype, updated cache or None).
    """
    model = as_module(params, config, Qwen2Model)
    return model(tokens, segment_ids=segment_ids, positions=positions, cache=cache, remat=remat)


def lm_head(params: Params, config: Qwen2Config, hidden: Array) -> Array:
    """Logits ``[..., V]`` in float32 from hidden states ``[..., E]`` (tied or untied head)."""
    return as_module(params, config).logits(hidden)


@functools.partial(jax.jit, static_argnames=("config",))
def compute_logits(params: Params, config: Qwen2Config, tokens: Array,
                   segment_ids: Optional[Array] = None,
                   positions: Optional[Array] = None) -> Array:
    """``tokens [B, L]`` -> logits ``[B, L, V]`` float32 (no cache)."""
    hidden, _ = forward(params, config, tokens, segment_ids=segment_ids, positions=positions)
    logits = lm_head(params, config, hidden)
    return sharding.constrain(logits, ("batch", "length", "vocab"))


class TokenStats(NamedTuple):
    """Per-token statistics of the next-token distribution (both ``[B, L]`` float32)."""

    logprobs: Array
    entropy: Array


class AllowedTokens(NamedTuple):
    """The allowed set of each scored position (grammar-constrained sampling, see
    :func:`hiper_jax.agent.grammar.allowed_sets`).

    Attributes:
        mode: ``[B, L]`` int8: 0 the whole vocabulary, 1 the listed ids, 2 ``text_mask`` plus
            the listed ids.
        ids: ``[B, L, K]`` int32 listed ids, -1 for none.
        text_mask: ``[V]`` bool.
    """

    mode: Array
    ids: Array
    text_mask: Array


def _allowed_mask(shape: tuple[int, ...], mode: Array, ids: Array, text_mask: Array) -> Array:
    """``[B, C, V]`` bool: the allowed set of each position (see :class:`AllowedTokens`)."""
    vocab = shape[-1]
    b, c = jnp.meshgrid(jnp.arange(shape[0]), jnp.arange(shape[1]), indexing="ij")
    listed = jnp.zeros(shape, bool).at[b[..., None], c[..., None], jnp.where(ids >= 0, ids, vocab)
                                       ].set(True, mode="drop")
    return listed | (mode == 0)[..., None] | ((mode == 2)[..., None] & text_mask)


@functools.partial(jax.jit, static_argnames=("config", "chunk_size"))
def token_logprobs(params: Params, config: Qwen2Config, hidden: Array, targets: Array,
                   temperature: float = 1.0, chunk_size: int = 128,
                   allowed: Optional[AllowedTokens] = None) -> TokenStats:
    """Log-probability of ``targets`` and entropy of ``softmax(logits / temperature)``.

    ``hidden [B, L, E]`` (from :func:`forward`) and ``targets [B, L]`` (usually tokens shifted by
    one) give :class:`TokenStats` ``[B, L]``. Logits are computed ``chunk_size`` positions at a
    time and recomputed in the backward pass, so neither direction ever holds more than a
    ``[B, chunk_size, V]`` slice of the ``[B, L, V]`` logits.

    With ``allowed`` (aligned to ``targets``), both are those of the distribution renormalised
    over each position's allowed tokens: the distribution a constrained sampler drew from.
    """
    batch, length, width = hidden.shape
    chunk = min(chunk_size, length)
    num_chunks = -(-length // chunk)
    pad = num_chunks * chunk - length

    def chunked(x: Array, fill=0) -> Array:
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2), constant_values=fill)
        return x.reshape((batch, num_chunks, chunk) + x.shape[2:]).swapaxes(0, 1)

    inputs = (chunked(hidden), chunked(targets.astype(jnp.int32)))
    if allowed is not None:
        inputs += (chunked(allowed.mode.astype(jnp.int32)), chunked(allowed.ids.astype(jnp.int32), -1))

    @jax.checkpoint
    def chunk_stats(args: tuple[Array, ...]) -> tuple[Array, Array]:
        h, t = args[:2]
        logits = lm_head(params, config, h) / temperature
        if allowed is None:
            masked = logits
        else:
            keep = _allowed_mask(logits.shape, args[2], args[3], allowed.text_mask)
            # Masked-out logits enter the entropy as 0 (their probability is 0): a -inf there
            # would turn the gradient of 0 * -inf into NaN.
            masked, logits = jnp.where(keep, logits, -jnp.inf), jnp.where(keep, logits, 0.0)
        log_norm = jax.nn.logsumexp(masked, axis=-1)
        target_logit = jnp.take_along_axis(masked, t[..., None], axis=-1)[..., 0]
        probs = jnp.exp(masked - log_norm[..., None])
        return target_logit - log_norm, log_norm - jnp.sum(probs * logits, axis=-1)

    logprobs, entropy = lax.map(chunk_stats, inputs)
    unchunk = lambda x: x.swapaxes(0, 1).reshape(batch, num_chunks * chunk)[:, :length]
    return TokenStats(unchunk(logprobs), unchunk(entropy))
