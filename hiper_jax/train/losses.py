"""PPO losses as pure functions over token arrays ``[N, L]`` (N responses, L response tokens).

Aggregation is "token-mean": a sum over every selected token of the batch divided by the number
of selected tokens, so long and short responses weigh by their token counts.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
from hiper_jax.vocab import KL_ESTIMATORS


def token_mean(values: Array, mask: Array) -> Array:
    """Mean of ``values`` over the tokens where ``mask`` is set (0 when none is); values
    outside ``mask`` (NaN included) do not leak in."""
    mask = mask.astype(bool)
    total = jnp.sum(jnp.where(mask, values, 0.0))
    return total / jnp.maximum(jnp.sum(mask).astype(jnp.float32), 1.0)


class PolicyLossOutput(NamedTuple):
    """Scalar policy loss and diagnostics (fractions are over the masked tokens)."""

    loss: Array
    clip_fraction: Array        # tokens where the ratio clip was active
    dual_clip_fraction: Array   # negative-advantage tokens where the dual clip was active
    approx_kl: Array            # token-mean of old_logp - logp


def ppo_dual_clip_loss(
    logp: Array,
    old_logp: Array,
    advantages: Array,
    mask: Array,
    clip_ratio: float = 0.2,
    dual_clip: float = 3.0,
) -> PolicyLossOutput:
    """Token-level PPO with dual clip (Ye et al. 2020), token-mean over ``mask``.

    ``r = exp(logp - old_logp)``; ``l = max(-A r, -A clip(r, 1-eps, 1+eps))``; for ``A < 0`` the
    loss is further capped at ``-A c`` (``c = dual_clip > 1``) so that a huge ratio on a bad
    token cannot dominate.

    Args:
      logp, old_logp, advantages, mask: ``[N, L]``.
    """
    if dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    log_ratio = logp - old_logp
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio)
    ppo = jnp.maximum(unclipped, clipped)
    capped = jnp.minimum(ppo, -advantages * dual_clip)
    per_token = jnp.where(advantages < 0, capped, ppo)
    return PolicyLossOutput(
        loss=token_mean(per_token, mask),
        clip_fraction=token_mean((clipped > unclipped).astype(jnp.float32), mask),
        dual_clip_fraction=token_mean(((advantages < 0) & (ppo > capped)).astype(jnp.float32), mask),
        approx_kl=token_mean(-log_ratio, mask),
    )


def kl_penalty(logp: Array, ref_logp: Array, estimator: str = "low_var_kl") -> Array:
    """Per-token KL estimate of the policy against the reference, ``[N, L]``.

    * ``kl`` (k1): ``logp - ref_logp``
    * ``mse`` (k2): ``0.5 (logp - ref_logp)^2``
    * ``low_var_kl`` (k3): ``exp(ref - logp) - (ref - logp) - 1``, clipped to [-10, 10]
    """
    diff = logp - ref_logp
    if estimator == "kl":
        return diff
    if estimator == "mse":
        return 0.5 * jnp.square(diff)
    if estimator == "low_var_kl":
        log_ratio = -diff
        return jnp.clip(jnp.exp(log_ratio) - log_ratio - 1.0, -10.0, 10.0)
    raise ValueError(f"unknown KL estimator {estimator!r}; known: {KL_ESTIMATORS}")


def clipped_value_loss(values: Array, old_values: Array, returns: Array, mask: Array,
                       clip: float = 0.5) -> Array:
    """PPO value loss: ``0.5 * token-mean(max((v - R)^2, (clip(v, v_old +- clip) - R)^2))``."""
    clipped = old_values + jnp.clip(values - old_values, -clip, clip)
    per_token = jnp.maximum(jnp.square(values - returns), jnp.square(clipped - returns))
    return 0.5 * token_mean(per_token, mask)


def entropy_bonus(entropy: Array, mask: Array) -> Array:
    """Token-mean entropy (subtracted from the loss times its coefficient)."""
    return token_mean(entropy, mask)
