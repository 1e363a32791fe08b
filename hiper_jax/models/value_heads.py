"""Critic value heads for HiPER: three scalar heads (low, high, term) on final hidden states.

The critic is either a separate Qwen2 backbone initialised from the same checkpoint as the
policy (what the published HiPER code does; ``CriticConfig(shared_backbone=False)``, the default)
or just the heads on the policy's own hidden states (``shared_backbone=True``, half the memory).

Critic parameters are a dict ``{"heads": {"kernel": [E, 3], "bias": [3]}}`` plus, for a separate
critic, ``"backbone"``: a policy parameter tree without ``lm_head``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from hiper_jax.models import sharding
from hiper_jax.models.qwen2.config import Qwen2Config
from hiper_jax.models.qwen2.model import ParamSpec, Params, forward, param_shardings

Array = jax.Array

VALUE_HEAD_NAMES = ("low", "high", "term")


@dataclasses.dataclass(frozen=True)
class CriticConfig:
    """How the critic is built.

    Attributes:
        shared_backbone: heads on the policy's hidden states (True) or on a separate backbone
            initialised from the policy's weights (False, as in HiPER).
    """

    shared_backbone: bool = False


def value_head_specs(config: Qwen2Config) -> dict[str, ParamSpec]:
    """Shapes and logical axes of the head parameters."""
    n = len(VALUE_HEAD_NAMES)
    return {"kernel": ParamSpec((config.hidden_size, n), ("embed", "value_heads"), "normal"),
            "bias": ParamSpec((n,), ("value_heads",), "zeros")}


def init_value_heads(key: Array, config: Qwen2Config) -> Params:
    """Head parameters in ``config.param_dtype``: kernel ~ normal(0, initializer_range), zero bias,
    so initial values are near zero."""
    specs = value_head_specs(config)
    dtype = jnp.dtype(config.param_dtype)
    kernel = config.initializer_range * jax.random.normal(key, specs["kernel"].shape, jnp.float32)
    return {"kernel": kernel.astype(dtype), "bias": jnp.zeros(specs["bias"].shape, dtype)}


def value_heads(head_params: Params, hidden: Array) -> Array:
    """``hidden [..., E]`` -> values ``[..., 3]`` float32, ordered as :data:`VALUE_HEAD_NAMES`."""
    kernel = head_params["kernel"].astype(jnp.float32)
    return hidden.astype(jnp.float32) @ kernel + head_params["bias"].astype(jnp.float32)


def init_critic(key: Array, config: Qwen2Config, policy_params: Params,
                critic_config: CriticConfig = CriticConfig()) -> Params:
    """Critic parameters: fresh heads, plus a copy of the policy backbone unless shared."""
    critic: Params = {"heads": init_value_heads(key, config)}
    if not critic_config.shared_backbone:
        backbone = {name: tree for name, tree in policy_params.items() if name != "lm_head"}
        critic["backbone"] = jax.tree.map(jnp.copy, backbone)
    return critic


def critic_param_shardings(config: Qwen2Config, critic_config: CriticConfig, mesh: Mesh,
                           rules: sharding.AxisRules = sharding.DEFAULT_RULES) -> Params:
    """NamedShardings for the critic parameter tree (same structure as :func:`init_critic`)."""
    specs = value_head_specs(config)
    out: Params = {"heads": sharding.named_shardings(
        {k: s.axes for k, s in specs.items()}, {k: s.shape for k, s in specs.items()}, mesh, rules)}
    if not critic_config.shared_backbone:
        backbone = param_shardings(config, mesh, rules)
        backbone.pop("lm_head", None)
        out["backbone"] = backbone
    return out


@functools.partial(jax.jit, static_argnames=("config", "remat"))
def critic_values(critic_params: Params, config: Qwen2Config, tokens: Array, *,
                  segment_ids: Optional[Array] = None, positions: Optional[Array] = None,
                  policy_hidden: Optional[Array] = None, remat: bool = False) -> Array:
    """Values ``[B, L, 3]`` (low, high, term) for every token of ``tokens [B, L]``.

    With a separate backbone the critic runs its own forward pass; with a shared one pass the
    policy's final hidden states ``policy_hidden [B, L, E]`` (from ``qwen2.forward``).
    """
    if "backbone" in critic_params:
        hidden, _ = forward(critic_params["backbone"], config, tokens, segment_ids=segment_ids,
                            positions=positions, remat=remat)
    elif policy_hidden is None:
        raise ValueError("a critic sharing the policy backbone needs policy_hidden")
    else:
        hidden = policy_hidden
    values = value_heads(critic_params["heads"], hidden)
    return sharding.constrain(values, ("batch", "length", "value_heads"))
