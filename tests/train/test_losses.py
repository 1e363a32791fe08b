"""Losses checked against hand calculations, one clip branch at a time."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hiper_jax.train.losses import (
    clipped_value_loss,
    entropy_bonus,
    kl_penalty,
    ppo_dual_clip_loss,
    token_mean,
)


def one(logp_ratio, adv, eps=0.2, c=3.0):
    logp = jnp.array([[math.log(logp_ratio)]])
    return ppo_dual_clip_loss(logp, jnp.zeros((1, 1)), jnp.array([[adv]]), jnp.ones((1, 1), bool),
                              clip_ratio=eps, dual_clip=c)


@pytest.mark.parametrize("ratio,adv,want,clipped,dual", [
    (1.1, 2.0, -2.2, 0, 0),    # A > 0, inside the trust region: -A r
    (1.5, 2.0, -2.4, 1, 0),    # A > 0, r > 1 + eps: -A (1 + eps)
    (0.5, 2.0, -1.0, 0, 0),    # A > 0, r < 1 - eps: unclipped -A r is the max
    (1.5, -2.0, 3.0, 0, 0),    # A < 0, 1 + eps < r < c: -A r is the max
    (0.5, -2.0, 1.6, 1, 0),    # A < 0, r < 1 - eps: -A (1 - eps)
    (5.0, -2.0, 6.0, 0, 1),    # A < 0, r > c: dual clip caps at -A c
    (5.0, 2.0, -2.4, 1, 0),    # A > 0, huge ratio: plain clip, no dual clip
])
def test_ppo_branches(ratio, adv, want, clipped, dual):
    out = one(ratio, adv)
    assert float(out.loss) == pytest.approx(want, rel=1e-5)
    assert float(out.clip_fraction) == clipped
    assert float(out.dual_clip_fraction) == dual
    assert float(out.approx_kl) == pytest.approx(-math.log(ratio), rel=1e-5)


def test_ppo_token_mean_over_mask():
    logp = jnp.log(jnp.array([[1.0, 1.5, 9.0], [0.5, 1.0, 1.0]]))
    adv = jnp.array([[1.0, 1.0, 100.0], [-1.0, 3.0, 7.0]])
    mask = jnp.array([[1, 1, 0], [1, 1, 0]], bool)
    # per token: -1, -1.2, (masked), 0.8, -3 -> mean over 4 tokens
    out = ppo_dual_clip_loss(logp, jnp.zeros_like(logp), adv, mask)
    assert float(out.loss) == pytest.approx((-1 - 1.2 + 0.8 - 3) / 4, rel=1e-5)


def test_ppo_gradient_is_zero_when_clipped():
    adv = jnp.array([[2.0]])
    mask = jnp.ones((1, 1), bool)
    grad = jax.grad(lambda lp: ppo_dual_clip_loss(lp, jnp.zeros((1, 1)), adv, mask).loss)
    assert float(grad(jnp.log(jnp.array([[1.5]])))[0, 0]) == 0.0
    assert float(grad(jnp.log(jnp.array([[1.1]])))[0, 0]) == pytest.approx(-2.2, rel=1e-5)
    dual = jax.grad(lambda lp: ppo_dual_clip_loss(lp, jnp.zeros((1, 1)), -adv, mask).loss)
    assert float(dual(jnp.log(jnp.array([[5.0]])))[0, 0]) == 0.0


def test_ppo_rejects_bad_dual_clip():
    with pytest.raises(ValueError, match="dual_clip"):
        one(1.0, 1.0, c=1.0)


def test_kl_estimators_by_hand():
    logp, ref = jnp.array([[-1.0]]), jnp.array([[-1.5]])
    assert float(kl_penalty(logp, ref, "kl")[0, 0]) == pytest.approx(0.5)
    assert float(kl_penalty(logp, ref, "mse")[0, 0]) == pytest.approx(0.125)
    assert float(kl_penalty(logp, ref, "low_var_kl")[0, 0]) == pytest.approx(math.exp(-0.5) + 0.5 - 1)
    assert float(kl_penalty(jnp.array([[-20.0]]), jnp.array([[0.0]]), "low_var_kl")[0, 0]) == 10.0
    for name in ("kl", "mse", "low_var_kl"):
        assert float(kl_penalty(logp, logp, name)[0, 0]) == 0.0
    with pytest.raises(ValueError, match="known"):
        kl_penalty(logp, ref, "k4")


def test_clipped_value_loss_by_hand():
    old = jnp.array([[1.0, 1.0, 1.0]])
    ret = jnp.array([[3.0, 0.0, 1.2]])
    new = jnp.array([[2.0, 2.0, 1.1]])
    mask = jnp.ones((1, 3), bool)
    # token 0: unclipped (2-3)^2=1, clipped v=1.5 -> 2.25 -> max 2.25
    # token 1: unclipped (2-0)^2=4, clipped 1.5 -> 2.25 -> max 4
    # token 2: inside the clip: (1.1-1.2)^2 = 0.01
    want = 0.5 * (2.25 + 4 + 0.01) / 3
    assert float(clipped_value_loss(new, old, ret, mask, clip=0.5)) == pytest.approx(want, rel=1e-5)
    partial = jnp.array([[1, 0, 0]], bool)
    assert float(clipped_value_loss(new, old, ret, partial, clip=0.5)) == pytest.approx(0.5 * 2.25)


def test_token_mean_and_entropy():
    x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    assert float(token_mean(x, jnp.array([[1, 0], [1, 1]], bool))) == pytest.approx(8 / 3)
    assert float(token_mean(x, jnp.zeros((2, 2), bool))) == 0.0
    assert float(entropy_bonus(x, jnp.ones((2, 2), bool))) == pytest.approx(2.5)
    assert float(token_mean(jnp.array([[np.nan, 2.0]]), jnp.array([[0, 1]], bool))) == 2.0
