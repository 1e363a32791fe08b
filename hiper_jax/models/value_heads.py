"""Critic value heads for HiPER: three scalar heads (low, high, term) on final hidden states.

The critic is either a separate Qwen2 backbone initialised from the same checkpoint as the
policy (what the published HiPER code does; ``CriticConfig(shared_backbone=False)``, the default)
or just the heads on the policy's own hidden states (``shared_backbone=True``, half the memory).

Both are Flax NNX modules (:class:`ValueHeads`, :class:`Critic`); the pure functions take the
critic's parameter state as a plain tree, ``{"heads": {"kernel": [E, 3], "bias": [3]}}`` plus,
for a separate critic, ``"backbone"``: a policy parameter tree without ``lm_head`` (the state of
a :class:`~hiper_jax.models.qwen2.Qwen2Model`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from hiper_jax.models import sharding
from hiper_jax.models.qwen2 import lora
from hiper_jax.models.qwen2.config import Qwen2Config
from hiper_jax.vocab import VALUE_HEADS
from hiper_jax.models.qwen2.model import (ParamSpec, Params, Qwen2Model, _param, abstract_specs,
                                          module_params, tree_config)

Array = jax.Array

VALUE_HEAD_NAMES = VALUE_HEADS


@dataclasses.dataclass(frozen=True)
class CriticConfig:
    """How the critic is built.

    Attributes:
        shared_backbone: heads on the policy's hidden states (True) or on a separate backbone
            initialised from the policy's weights (False, as in HiPER).
    """

    shared_backbone: bool = False


class ValueHeads(nnx.Module):
    """The three heads as one projection: ``kernel [E, 3]`` ~ normal(0, initializer_range) and a
    zero ``bias [3]``, so initial values are near zero."""

    def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs):
        n = len(VALUE_HEAD_NAMES)
        self.kernel = _param(rngs, config, (config.hidden_size, n), ("embed", "value_heads"),
                             "normal")
        self.bias = _param(rngs, config, (n,), ("value_heads",), "zeros")

    def __call__(self, hidden: Array) -> Array:
        """``hidden [..., E]`` -> values ``[..., 3]`` float32, ordered as :data:`VALUE_HEAD_NAMES`."""
        return _values(self.kernel[...], self.bias[...], hidden)


class Critic(nnx.Module):
    """Value heads, on a backbone of their own (``backbone``, a :class:`Qwen2Model`) or on the
    policy's hidden states (``shared_backbone``: no backbone here)."""

    def __init__(self, config: Qwen2Config, critic_config: CriticConfig = CriticConfig(), *,
                 rngs: nnx.Rngs, stacked: bool = True):
        self.heads = ValueHeads(config, rngs=rngs)
        self.backbone = (None if critic_config.shared_backbone
                         else Qwen2Model(config, rngs=rngs, stacked=stacked))

    def __call__(self, tokens: Array, *, segment_ids: Optional[Array] = None,
                 positions: Optional[Array] = None, policy_hidden: Optional[Array] = None,
                 remat: bool = False) -> Array:
        """Values ``[B, L, 3]`` of ``tokens [B, L]``; see :func:`critic_values`."""
        if self.backbone is not None:
            hidden, _ = self.backbone(tokens, segment_ids=segment_ids, positions=positions,
                                      remat=remat)
        elif policy_hidden is None:
            raise ValueError("a critic sharing the policy backbone needs policy_hidden")
        else:
            hidden = policy_hidden
        return sharding.constrain(self.heads(hidden), ("batch", "length", "value_heads"))


def _critic_config(critic_params: Params) -> CriticConfig:
    return CriticConfig(shared_backbone="backbone" not in critic_params)


@functools.lru_cache(maxsize=None)
def _abstract_critic(config: Qwen2Config, critic_config: CriticConfig) -> tuple[nnx.GraphDef, Params]:
    """Graph definition of a :class:`Critic` and its parameter tree of :class:`ParamSpec`."""
    return abstract_specs(lambda: Critic(config, critic_config, rngs=nnx.Rngs(0)))


def init_value_heads(key: Array, config: Qwen2Config) -> Params:
    """Fresh :class:`ValueHeads` parameters ``{"kernel": [E, 3], "bias": [3]}``."""
    return module_params(ValueHeads(config, rngs=nnx.Rngs(key)))


def value_heads(head_params: Params, hidden: Array) -> Array:
    """``hidden [..., E]`` -> values ``[..., 3]`` float32: :class:`ValueHeads` over ``head_params``."""
    return _values(head_params["kernel"], head_params["bias"], hidden)


def _values(kernel: Array, bias: Array, hidden: Array) -> Array:
    return hidden.astype(jnp.float32) @ kernel.astype(jnp.float32) + bias.astype(jnp.float32)


def init_critic(key: Array, config: Qwen2Config, policy_params: Params,
                critic_config: CriticConfig = CriticConfig()) -> Params:
    """Critic parameters: fresh heads, plus a copy of the policy backbone unless shared."""
    critic: Params = {"heads": init_value_heads(key, config)}
    if not critic_config.shared_backbone:
        backbone = {name: tree for name, tree in policy_params.items() if name != "lm_head"}
        critic["backbone"] = jax.tree.map(jnp.copy, backbone)
    return critic


def init_lora_critic(key: Array, config: Qwen2Config, critic_config: CriticConfig = CriticConfig(),
                     mesh: Optional[Mesh] = None) -> Params:
    """The trainable part of a critic under LoRA (``config.lora_rank > 0``): fresh heads and, for
    a separate critic, fresh adapters of its own (``{"heads": ..., "backbone": adapters}``).
    Its backbone's base weights are the policy's frozen ones (:func:`lora_critic_base`): a
    separate LoRA critic keeps no copy of the backbone."""
    head_key, adapter_key = jax.random.split(key)
    critic: Params = {"heads": init_value_heads(head_key, config)}
    if mesh is not None:
        critic["heads"] = jax.device_put(
            critic["heads"], critic_param_shardings(config, critic_config, mesh)["heads"])
    if not critic_config.shared_backbone:
        critic["backbone"] = lora.init_adapters(adapter_key, config, mesh)
    return critic


def lora_critic_base(policy_base: Params, critic_config: CriticConfig = CriticConfig()) -> Params:
    """The frozen part of a LoRA critic: the policy's base weights (no ``lm_head``) as its
    backbone, the same arrays (``{}`` for heads on the policy's hidden states)."""
    if critic_config.shared_backbone:
        return {}
    return {"backbone": {name: tree for name, tree in policy_base.items() if name != "lm_head"}}


def critic_param_shardings(config: Qwen2Config, critic_config: CriticConfig, mesh: Mesh,
                           rules: sharding.AxisRules = sharding.DEFAULT_RULES) -> Params:
    """NamedShardings for the critic parameter tree (same structure as :func:`init_critic`),
    from the logical axes on the :class:`Critic` module's parameters."""
    specs = _abstract_critic(config, critic_config)[1]
    is_spec = lambda x: isinstance(x, ParamSpec)
    return sharding.named_shardings(jax.tree.map(lambda s: s.axes, specs, is_leaf=is_spec),
                                    jax.tree.map(lambda s: s.shape, specs, is_leaf=is_spec),
                                    mesh, rules)


@functools.partial(jax.jit, static_argnames=("config", "remat"))
def critic_values(critic_params: Params, config: Qwen2Config, tokens: Array, *,
                  segment_ids: Optional[Array] = None, positions: Optional[Array] = None,
                  policy_hidden: Optional[Array] = None, remat: bool = False) -> Array:
    """Values ``[B, L, 3]`` (low, high, term) for every token of ``tokens [B, L]``.

    With a separate backbone the critic runs its own forward pass; with a shared one pass the
    policy's final hidden states ``policy_hidden [B, L, E]`` (from ``qwen2.forward``).
    """
    if "backbone" in critic_params:  # a backbone without adapters runs as the base model
        config = tree_config(critic_params["backbone"], config)
    graphdef, specs = _abstract_critic(config, _critic_config(critic_params))
    critic = nnx.merge(graphdef, {name: critic_params[name] for name in specs})
    return critic(tokens, segment_ids=segment_ids, positions=positions,
                  policy_hidden=policy_hidden, remat=remat)
