"""Qwen2 / Qwen2.5 decoder in plain JAX: parameters are a nested dict of arrays.

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

Masks are *segment ids* ``[B, L]`` int: 0 marks padding, tokens attend causally to earlier
tokens of the same segment. A HF-style 0/1 ``attention_mask`` is a valid value (one segment per
row, e.g. left-padded prompts); ids 1, 2, 3, ... pack several sequences into one row.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh

from hiper_jax.models import sharding
from hiper_jax.models.qwen2.config import Qwen2Config

Array = jax.Array
Params = dict[str, Any]

_MASKED = -1e30  # finite, so fully masked (padding) rows give a uniform softmax, never NaN


class ParamSpec(NamedTuple):
    """Shape, logical axis names and initializer ("normal", "zeros" or "ones") of one parameter."""

    shape: tuple[int, ...]
    axes: sharding.LogicalAxes
    init: str


def param_specs(config: Qwen2Config) -> dict[str, Any]:
    """The parameter tree of ``config`` described as :class:`ParamSpec` leaves."""
    n, e, m, v = (config.num_hidden_layers, config.hidden_size, config.intermediate_size,
                  config.vocab_size)
    h, kv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim

    def proj(heads: int, heads_axis: str) -> dict[str, ParamSpec]:
        return {
            "kernel": ParamSpec((n, e, heads, d), ("layers", "embed", heads_axis, "head_dim"),
                                "normal"),
            "bias": ParamSpec((n, heads, d), ("layers", heads_axis, "head_dim"), "zeros"),
        }

    specs: dict[str, Any] = {
        "embed_tokens": {"embedding": ParamSpec((v, e), ("vocab", "embed"), "normal")},
        "layers": {
            "input_layernorm": {"scale": ParamSpec((n, e), ("layers", "embed"), "ones")},
            "self_attn": {
                "q_proj": proj(h, "heads"),
                "k_proj": proj(kv, "kv_heads"),
                "v_proj": proj(kv, "kv_heads"),
                "o_proj": {"kernel": ParamSpec(
                    (n, h, d, e), ("layers", "heads", "head_dim", "embed"), "normal")},
            },
            "post_attention_layernorm": {"scale": ParamSpec((n, e), ("layers", "embed"), "ones")},
            "mlp": {
                "gate_proj": {"kernel": ParamSpec((n, e, m), ("layers", "embed", "mlp"), "normal")},
                "up_proj": {"kernel": ParamSpec((n, e, m), ("layers", "embed", "mlp"), "normal")},
                "down_proj": {"kernel": ParamSpec((n, m, e), ("layers", "mlp", "embed"), "normal")},
            },
        },
        "norm": {"scale": ParamSpec((e,), ("embed",), "ones")},
    }
    if not config.tie_word_embeddings:
        specs["lm_head"] = {"kernel": ParamSpec((e, v), ("embed", "vocab"), "normal")}
    return specs


def _spec_leaves(fn, config: Qwen2Config) -> Any:
    return jax.tree.map(fn, param_specs(config), is_leaf=lambda x: isinstance(x, ParamSpec))


def param_axes(config: Qwen2Config, stacked: bool = True) -> Any:
    """The parameter tree with each leaf replaced by its logical axis names."""
    axes = _spec_leaves(lambda s: s.axes, config)
    return axes if stacked else _unstack_tree(axes, config, lambda a: a[1:])


def param_shapes(config: Qwen2Config, stacked: bool = True) -> Any:
    """The parameter tree with each leaf replaced by its shape."""
    shapes = _spec_leaves(lambda s: s.shape, config)
    return shapes if stacked else _unstack_tree(shapes, config, lambda a: a[1:])


def param_shardings(config: Qwen2Config, mesh: Mesh,
                    rules: sharding.AxisRules = sharding.DEFAULT_RULES,
                    stacked: bool = True) -> Any:
    """NamedShardings of every parameter on ``mesh`` under ``rules`` (same tree as the params)."""
    return sharding.named_shardings(param_axes(config, stacked), param_shapes(config, stacked),
                                    mesh, rules)


def _unstack_tree(tree: Any, config: Qwen2Config, per_layer) -> Any:
    """Replaces the stacked ``layers`` subtree of axes/shapes by a list of per-layer subtrees."""
    layer = jax.tree.map(per_layer, tree["layers"], is_leaf=lambda x: isinstance(x, tuple))
    return dict(tree, layers=[layer] * config.num_hidden_layers)


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
    ``config.param_dtype``; created directly on their shardings when a mesh is given.

    One parameter at a time, so peak memory is the model plus one parameter's temporaries.
    """
    specs = param_specs(config)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=lambda x: isinstance(x, ParamSpec))
    targets = ([None] * len(leaves) if mesh is None
               else jax.tree.leaves(param_shardings(config, mesh, rules)))
    keys = jax.random.split(key, len(leaves))
    arrays = [_leaf_initializer(spec, config.initializer_range, config.param_dtype, target)(k)
              for k, spec, target in zip(keys, leaves, targets)]
    return jax.tree.unflatten(treedef, arrays)


@functools.lru_cache(maxsize=None)
def _leaf_initializer(spec: ParamSpec, scale: float, dtype: str, target: Any):
    """A jitted ``key -> array`` for one parameter (cached: layers share shapes)."""
    def create(key: Array) -> Array:
        if spec.init == "normal":
            return (scale * jax.random.normal(key, spec.shape, jnp.float32)).astype(dtype)
        return jnp.full(spec.shape, 1.0 if spec.init == "ones" else 0.0, dtype)

    return jax.jit(create, out_shardings=target)


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


def _mlp(x: Array, p: Params) -> Array:
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""
    dtype = x.dtype
    gate = _dense(x, p["gate_proj"]["kernel"].astype(dtype))
    up = _dense(x, p["up_proj"]["kernel"].astype(dtype))
    hidden = sharding.constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
    return _dense(hidden, p["down_proj"]["kernel"].astype(dtype))


def _qkv(x: Array, p: Params, cos: Array, sin: Array) -> tuple[Array, Array, Array]:
    """Projections with RoPE: ``q [B, L, H, D]``, head-major ``k, v [B, KV, L, D]``."""
    def project(name: str) -> Array:
        kernel, bias = p[name]["kernel"].astype(x.dtype), p[name]["bias"].astype(x.dtype)
        return _dense(x, kernel) + bias

    q = _apply_rope(project("q_proj"), cos, sin)
    k = _apply_rope(project("k_proj"), cos, sin).swapaxes(1, 2)
    v = project("v_proj").swapaxes(1, 2)
    kv_axes = ("batch", "kv_heads", "length", "head_dim")
    return (sharding.constrain(q, ("batch", "length", "heads", "head_dim")),
            sharding.constrain(k, kv_axes), sharding.constrain(v, kv_axes))


@functools.partial(jax.jit, static_argnames=("config", "remat"))
def forward(params: Params, config: Qwen2Config, tokens: Array, *,
            segment_ids: Optional[Array] = None, positions: Optional[Array] = None,
            cache: Optional[KVCache] = None, remat: bool = False
            ) -> tuple[Array, Optional[KVCache]]:
    """Runs the decoder: ``tokens [B, L]`` -> final (normed) hidden states ``[B, L, E]``.

    Args:
        params: parameter tree, stacked or unstacked (see module docstring).
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
    batch, length = tokens.shape
    dtype = jnp.dtype(config.compute_dtype)
    if segment_ids is None:
        segment_ids = jnp.ones((batch, length), jnp.int32)
    segment_ids = segment_ids.astype(jnp.int32)
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

    x = jnp.take(params["embed_tokens"]["embedding"], tokens, axis=0).astype(dtype)
    x = sharding.constrain(x, ("batch", "length", "embed"))

    def layer(carry: tuple, layer_in: tuple) -> tuple:
        x, cache_k, cache_v = carry
        p, layer_index = layer_in
        attn_in = _rms_norm(x, p["input_layernorm"]["scale"], config.rms_norm_eps)
        q, k, v = _qkv(attn_in, p["self_attn"], cos, sin)
        if cache_k is not None:
            start = (layer_index, 0, 0, cache.index, 0)
            cache_k = lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype)[None], start)
            cache_v = lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype)[None], start)
            k = cache_k[layer_index].astype(dtype)
            v = cache_v[layer_index].astype(dtype)
        # Flattened to [B, L, H * D] first: contracting (h, d) as two axes makes XLA transpose
        # the whole o_proj kernel on every call instead of the small activation.
        attn = _attention(q, k, v, mask)
        o_kernel = p["self_attn"]["o_proj"]["kernel"].astype(dtype)
        attn = _dense(attn.reshape(attn.shape[:2] + (-1,)), o_kernel.reshape(-1, o_kernel.shape[-1]))
        x = x + attn
        mlp_in = _rms_norm(x, p["post_attention_layernorm"]["scale"], config.rms_norm_eps)
        x = sharding.constrain(x + _mlp(mlp_in, p["mlp"]), ("batch", "length", "embed"))
        return (x, cache_k, cache_v), None

    if remat:
        layer = jax.checkpoint(layer, prevent_cse=False)
    carry = (x, None, None) if cache is None else (x, cache.k, cache.v)
    if isinstance(params["layers"], (list, tuple)):
        for index, layer_params in enumerate(params["layers"]):
            carry, _ = layer(carry, (layer_params, index))
        x, cache_k, cache_v = carry
    else:
        (x, cache_k, cache_v), _ = lax.scan(
            layer, carry, (params["layers"], jnp.arange(config.num_hidden_layers)))
    hidden = _rms_norm(x, params["norm"]["scale"], config.rms_norm_eps)
    if cache is None:
        return hidden, None
    return hidden, KVCache(cache_k, cache_v, key_segments, cache.index + length)


def lm_head(params: Params, config: Qwen2Config, hidden: Array) -> Array:
    """Logits ``[..., V]`` in float32 from hidden states ``[..., E]`` (tied or untied head)."""
    hidden = hidden.astype(jnp.dtype(config.compute_dtype))
    if config.tie_word_embeddings:
        weight = params["embed_tokens"]["embedding"].astype(hidden.dtype).T
    else:
        weight = params["lm_head"]["kernel"].astype(hidden.dtype)
    return _dense(hidden, weight, preferred_element_type=jnp.float32)


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
