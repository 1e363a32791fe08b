"""LoRA adapters on the Qwen2 port: the parameter-tree side (split, combine, merge, create).

With ``Qwen2Config.lora_rank = r > 0`` every projection named in ``lora_targets`` (attention
q/k/v/o and MLP gate/up/down by default) is a :class:`~hiper_jax.models.qwen2.model.Dense`
with two extra ``nnx.LoRAParam`` leaves next to its kernel ``[*lead, *I, *O]``::

    lora_a  [*lead, *I, r]    uniform(+-1/sqrt(prod I))
    lora_b  [*lead, r, *O]    zeros

and computes ``x @ kernel + (lora_alpha / r) * (x @ lora_a) @ lora_b``. A fresh adapter is the
base model exactly (``lora_b`` is zero). The adapters keep the kernel's logical axes on ``I``
and ``O`` (so they shard as the kernel does) and ``lora_rank`` (replicated) on ``r``.

The trees stay plain nested dicts, as everywhere in the package: an adapter tree holds only the
``lora_a`` / ``lora_b`` leaves at their module paths, and :func:`combine` puts it over the base
tree without copying anything. Training differentiates, clips and optimizes the adapter tree
only, so neither gradients nor AdamW moments ever exist for the frozen base weights, and the
base tree alone (no adapters) is the model with adapters off: the reference policy of the KL
term (:func:`~hiper_jax.models.qwen2.model.tree_config`), with no second copy of the weights.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from hiper_jax.models import sharding
from hiper_jax.models.qwen2.config import Qwen2Config
from hiper_jax.models.qwen2.model import (LORA_LEAVES, Params, Qwen2ForCausalLM, has_adapters,
                                          module_params, param_shardings)

Array = jax.Array


def split_adapters(params: Params) -> tuple[Params, Params]:
    """``params`` -> ``(adapters, base)``: the ``lora_a``/``lora_b`` leaves at their paths, and
    everything else. No array is copied; :func:`combine` is the inverse."""
    if isinstance(params, (list, tuple)):
        parts = [split_adapters(p) for p in params]
        return [a for a, _ in parts], [b for _, b in parts]
    adapters, base = {}, {}
    for key, value in params.items():
        if key in LORA_LEAVES:
            adapters[key] = value
        elif isinstance(value, (dict, list, tuple)):
            sub_adapters, sub_base = split_adapters(value)
            if has_adapters(value):
                adapters[key] = sub_adapters
            base[key] = sub_base
        else:
            base[key] = value
    return adapters, base


def combine(trainable: Params, frozen: Optional[Params]) -> Params:
    """The tree of ``frozen`` with the leaves of ``trainable`` added (or replacing its own):
    dicts merge key by key, layer lists position by position. ``frozen=None``: ``trainable``.
    Nothing is copied."""
    if frozen is None:
        return trainable
    if isinstance(frozen, (list, tuple)):
        if len(trainable) != len(frozen):
            raise ValueError(f"cannot combine {len(trainable)} layers with {len(frozen)}")
        return [combine(t, f) for t, f in zip(trainable, frozen)]
    if not isinstance(frozen, dict) or not isinstance(trainable, dict):
        return trainable
    out = dict(frozen)
    for key, value in trainable.items():
        out[key] = combine(value, frozen[key]) if key in frozen else value
    return out


def merged_kernel(kernel: Array, lora_a: Array, lora_b: Array, scale: float,
                  dtype: Optional[jnp.dtype] = None) -> Array:
    """``kernel + scale * lora_a @ lora_b`` in float32, cast to ``dtype`` (default the kernel's).

    Shapes: ``kernel [*lead, *I, *O]``, ``lora_a [*lead, *I, r]``, ``lora_b [*lead, r, *O]``;
    the product is batched over ``lead`` (stacked layers), whose length follows from the ranks.
    """
    rank = lora_a.shape[-1]
    num_lead = lora_a.ndim + lora_b.ndim - 2 - kernel.ndim
    lead = kernel.shape[:num_lead]
    width_in = math.prod(lora_a.shape[num_lead:-1])
    width_out = math.prod(lora_b.shape[num_lead + 1:])
    delta = jnp.matmul(lora_a.astype(jnp.float32).reshape(lead + (width_in, rank)),
                       lora_b.astype(jnp.float32).reshape(lead + (rank, width_out)))
    merged = kernel.astype(jnp.float32) + scale * delta.reshape(kernel.shape)
    return merged.astype(dtype or kernel.dtype)


def merge_lora(params: Params, config: Qwen2Config, dtype: Optional[jnp.dtype] = None) -> Params:
    """The base tree with every adapter folded into its kernel (``W + alpha/r * A @ B``), as
    ``transformers`` or the sampler run it; other leaves are cast to ``dtype`` when given.
    A tree without adapters is returned as it is (cast when ``dtype`` is given)."""
    cast = (lambda x: x) if dtype is None else (lambda x: x.astype(dtype))
    if not has_adapters(params):
        return jax.tree.map(cast, params)

    def merge(tree: Any) -> Any:
        if isinstance(tree, (list, tuple)):
            return [merge(t) for t in tree]
        if not isinstance(tree, dict):
            return cast(tree)
        if "lora_a" in tree:
            rest = {k: cast(v) for k, v in tree.items() if k not in LORA_LEAVES + ("kernel",)}
            return dict(rest, kernel=merged_kernel(tree["kernel"], tree["lora_a"], tree["lora_b"],
                                                   config.lora_scale, dtype))
        return {k: merge(v) for k, v in tree.items()}
    return merge(params)


def adapter_shardings(config: Qwen2Config, mesh: Mesh,
                      rules: sharding.AxisRules = sharding.DEFAULT_RULES) -> Params:
    """NamedShardings of the adapter tree of ``config`` (stacked layers) on ``mesh``, from the
    logical axes on the adapters' ``nnx.LoRAParam`` metadata."""
    return split_adapters(param_shardings(config, mesh, rules))[0]


def init_adapters(key: Array, config: Qwen2Config, mesh: Optional[Mesh] = None,
                  rules: sharding.AxisRules = sharding.DEFAULT_RULES) -> Params:
    """Fresh adapters of ``config`` (``lora_a`` random, ``lora_b`` zero; stacked layers), made by
    one jitted function directly on their shardings when a mesh is given."""
    if not config.lora_rank:
        raise ValueError("init_adapters needs config.lora_rank > 0")
    return _adapter_initializer(config, mesh, tuple(rules))(key)


@functools.lru_cache(maxsize=None)
def _adapter_initializer(config: Qwen2Config, mesh: Optional[Mesh], rules: sharding.AxisRules):
    targets = None if mesh is None else adapter_shardings(config, mesh, rules)

    def create(key: Array) -> Params:
        # Only the adapters are outputs: XLA drops the base weights' initialisation.
        model = Qwen2ForCausalLM(config, rngs=nnx.Rngs(key))
        return split_adapters(module_params(model))[0]
    return jax.jit(create, out_shardings=targets)


def count_adapter_params(config: Qwen2Config) -> int:
    """Number of adapter parameters of ``config`` (0 without LoRA)."""
    if not config.lora_rank:
        return 0
    shapes = jax.eval_shape(lambda: init_adapters(jax.random.key(0), config))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
