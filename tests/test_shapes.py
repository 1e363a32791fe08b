"""The chex-based boundary checks: each failure names its argument; none costs anything in jit."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hiper_jax.hae import HAEConfig, compute_hae
from hiper_jax.shapes import check_flags, check_rank, check_same_shape, check_shape, check_type


def test_each_check_names_the_argument_and_skips_none():
    x = np.zeros((2, 3), np.float32)
    check_rank(2, "[B, T]", good=x, missing=None)
    with pytest.raises(ValueError, match=r"rank 1 .*\[rewards must have shape \[B, T\]\]"):
        check_rank(2, "[B, T]", good=x, rewards=np.zeros(3))
    check_shape((2, None), "[B, T]", good=x)
    with pytest.raises(ValueError, match=r"group_ids must have shape \[B\] = \(2,\)"):
        check_shape((2,), "[B]", group_ids=np.zeros(3, int))
    assert check_same_shape(a=x, b=None, c=x) == (2, 3)
    assert check_same_shape(a=None) is None
    with pytest.raises(ValueError, match=r"mask has shape \(2, 4\), but a has shape \(2, 3\)"):
        check_same_shape(a=x, mask=np.zeros((2, 4)))
    check_type(float, a=x, b=np.zeros(2, np.float64))
    with pytest.raises(ValueError, match="values must have a float dtype"):
        check_type(float, values=np.zeros(2, np.int32))
    check_flags(a=np.zeros(2, bool), b=np.zeros(2, np.int8))
    with pytest.raises(ValueError, match="valid must have a bool or integer dtype"):
        check_flags(valid=np.zeros(2, np.float32))
    # A list is one input, not one input per element.
    with pytest.raises(ValueError, match="returns must have shape"):
        check_rank(2, "[B, T]", returns=[1.0, 2.0])


def test_checks_run_while_tracing_and_add_nothing_to_the_program():
    rng = np.random.default_rng(0)
    batch = dict(rewards=rng.normal(size=(3, 4)).astype(np.float32),
                 values_low=np.zeros((3, 4), np.float32), values_high=np.zeros((3, 4), np.float32),
                 values_term=None, switch=np.zeros((3, 4), bool), dones=np.zeros((3, 4), bool),
                 mask=np.ones((3, 4), bool))
    fn = lambda kw: compute_hae(cfg=HAEConfig(), **kw)
    checked = str(jax.make_jaxpr(fn)(batch))
    chex.disable_asserts()
    try:
        unchecked = str(jax.make_jaxpr(fn)(batch))
    finally:
        chex.enable_asserts()
    assert checked == unchecked
    # Under jit the wrong shape fails at trace time, with the argument named.
    bad = dict(batch, dones=np.zeros((3, 5), bool))
    with pytest.raises(ValueError, match="dones has shape"):
        jax.jit(fn)(bad)
    # vmap: the check sees the per-example shape, so a stacked batch still passes.
    stacked = jax.tree.map(lambda x: jnp.stack([x, x]), batch)
    assert jax.eval_shape(jax.vmap(fn), stacked).adv_low.shape == (2, 3, 4)
