"""HAE against the plain-loop reference in tests/hae_reference.py."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hiper_jax.hae import HAEConfig, HAEOutput, assign_token_advantages, compute_hae
from tests.hae_reference import hae_ref

FIELDS = ("adv_low", "ret_low", "adv_high", "ret_high", "adv_term", "ret_term")


def random_batch(rng, batch, turns, switch_mode="random", done_mode="random", lengths=None):
    """A padded batch with ragged lengths; padding filled with NaN / garbage flags."""
    if lengths is None:
        lengths = rng.integers(1, turns + 1, size=batch)
    mask = np.arange(turns)[None, :] < lengths[:, None]
    arr = lambda: rng.normal(size=(batch, turns)).astype(np.float32)
    rewards, v_low, v_high, v_term = arr(), arr(), arr(), arr()
    if switch_mode == "all":
        switch = np.ones((batch, turns), bool)
    elif switch_mode == "none":
        switch = np.zeros((batch, turns), bool)
    else:
        switch = rng.random((batch, turns)) < 0.35
    terminated = {"random": rng.random(batch) < 0.5, "done": np.ones(batch, bool),
                  "truncated": np.zeros(batch, bool)}[done_mode]
    dones = np.zeros((batch, turns), bool)
    dones[np.arange(batch), lengths - 1] = terminated
    invalid = rng.random((batch, turns)) < 0.2
    keep_changed = rng.random((batch, turns)) < 0.3
    for a in (rewards, v_low, v_high, v_term):
        a[~mask] = np.nan
    for a in (switch, invalid, keep_changed):
        a[~mask] = rng.random(int((~mask).sum())) < 0.5
    dones[~mask] = True
    return dict(rewards=rewards, values_low=v_low, values_high=v_high, values_term=v_term,
                switch=switch, dones=dones, mask=mask, invalid=invalid,
                keep_changed=keep_changed)


def run_both(batch, cfg, use_term=True, use_flags=True):
    kwargs = dict(batch)
    if not use_term:
        kwargs["values_term"] = None
    if not use_flags:
        kwargs["invalid"] = None
        kwargs["keep_changed"] = None
    out = compute_hae(cfg=cfg, **kwargs)
    ref = hae_ref(cfg=cfg, **kwargs)
    return out, ref


def assert_matches(out, ref, mask, atol=1e-5):
    for name in FIELDS:
        got = np.asarray(getattr(out, name))
        want = np.asarray(ref[name], np.float64)
        assert np.all(np.isfinite(got)), name
        np.testing.assert_allclose(got, want, atol=atol, rtol=1e-5, err_msg=name)
        assert np.all(got[~mask] == 0), name
    np.testing.assert_array_equal(np.asarray(out.boundary), np.asarray(ref["boundary"]))


CONFIGS = [
    HAEConfig(),
    HAEConfig(gamma=1.0, lam_turn=1.0, lam_seg=0.95, bootstrap_truncated=True,
              keep_penalty=-0.3, keep_penalty_mode="normalized", invalid_action_penalty=0.1,
              keep_consistency_penalty=-0.3, normalize=True),
    HAEConfig(gamma=0.9, lam_turn=0.7, lam_seg=0.5, keep_penalty=-0.05, keep_penalty_mode="fixed",
              invalid_action_penalty=0.5),
    HAEConfig(gamma=0.99, lam_turn=0.0, lam_seg=1.0, bootstrap_truncated=True, normalize=True),
    HAEConfig(gamma=0.0, lam_turn=1.0, lam_seg=0.0, keep_consistency_penalty=-1.0),
]


@pytest.mark.parametrize("cfg_index", range(len(CONFIGS)))
@pytest.mark.parametrize("switch_mode", ["random", "all", "none"])
@pytest.mark.parametrize("done_mode", ["random", "done", "truncated"])
def test_matches_reference(cfg_index, switch_mode, done_mode):
    rng = np.random.default_rng(1000 * cfg_index + hash((switch_mode, done_mode)) % 997)
    batch = random_batch(rng, batch=9, turns=13, switch_mode=switch_mode, done_mode=done_mode)
    out, ref = run_both(batch, CONFIGS[cfg_index])
    assert_matches(out, ref, batch["mask"])


@pytest.mark.parametrize("use_term,use_flags", list(itertools.product([True, False], repeat=2)))
def test_optional_inputs(use_term, use_flags):
    rng = np.random.default_rng(7)
    batch = random_batch(rng, batch=6, turns=10)
    out, ref = run_both(batch, CONFIGS[1], use_term=use_term, use_flags=use_flags)
    assert_matches(out, ref, batch["mask"])
    if not use_term:
        assert np.all(np.asarray(out.adv_term) == 0)


def test_single_turn_trajectories():
    rng = np.random.default_rng(3)
    for cfg in CONFIGS:
        batch = random_batch(rng, batch=5, turns=1)
        out, ref = run_both(batch, cfg)
        assert_matches(out, ref, batch["mask"])


def test_known_values_by_hand():
    # One trajectory, 3 turns, segments {0, 1} and {2}, done at 2, gamma 0.5, lambdas 1.
    cfg = HAEConfig(gamma=0.5, lam_turn=1.0, lam_seg=1.0)
    f = lambda *x: np.array([x], np.float32)
    out = compute_hae(rewards=f(1.0, 2.0, 4.0), values_low=f(0.5, 1.0, 2.0),
                      values_high=f(0.25, 9.0, 3.0), values_term=f(0.0, 0.0, 1.0),
                      switch=f(1, 0, 1), dones=f(0, 0, 1), mask=f(1, 1, 1), cfg=cfg)
    # low: turn 1 ends segment 0 and bootstraps from V_high[2] = 3:
    # delta1 = 2 + 0.5*3 - 1 = 2.5; delta0 = 1 + 0.5*1 - 0.5 = 1; A0 = 1 + 0.5*2.5 = 2.25
    # turn 2 is done: A2 = 4 - 2 = 2.
    np.testing.assert_allclose(out.adv_low[0], [2.25, 2.5, 2.0], atol=1e-6)
    # term: R1 = 2 + 0.5*3 = 3.5, R0 = 1 + 0.5*3.5 = 2.75, R2 = 4.
    np.testing.assert_allclose(out.ret_term[0], [2.75, 3.5, 4.0], atol=1e-6)
    np.testing.assert_allclose(out.adv_term[0], [2.75, 3.5, 3.0], atol=1e-6)
    # high: delta_seg1 = 4 - 3 = 1; delta_seg0 = 2.75 - 0.25 = 2.5; A_seg0 = 2.5 + 0.25*1 = 2.75.
    np.testing.assert_allclose(out.adv_high[0], [2.75, 0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(out.ret_high[0], [3.0, 0.0, 4.0], atol=1e-6)
    np.testing.assert_array_equal(out.boundary[0], [True, False, True])


def test_nan_padding_does_not_leak():
    rng = np.random.default_rng(11)
    batch = random_batch(rng, batch=8, turns=12)
    out = compute_hae(cfg=CONFIGS[1], **batch)
    clean = {k: np.where(batch["mask"], v, 0).astype(v.dtype) for k, v in batch.items()}
    out_clean = compute_hae(cfg=CONFIGS[1], **clean)
    for name in FIELDS:
        np.testing.assert_array_equal(np.asarray(getattr(out, name)),
                                      np.asarray(getattr(out_clean, name)), err_msg=name)


def test_padding_length_does_not_change_results():
    rng = np.random.default_rng(5)
    batch = random_batch(rng, batch=4, turns=6, lengths=np.array([6, 3, 1, 5]))
    wide = {k: np.concatenate([v, v[:, :4]], axis=1) for k, v in batch.items()}
    wide["mask"][:, 6:] = False
    out, out_wide = compute_hae(cfg=CONFIGS[2], **batch), compute_hae(cfg=CONFIGS[2], **wide)
    for name in FIELDS:
        np.testing.assert_allclose(np.asarray(getattr(out_wide, name))[:, :6],
                                   np.asarray(getattr(out, name)), atol=1e-6)


def test_low_precision_inputs_computed_in_float32():
    rng = np.random.default_rng(2)
    batch = random_batch(rng, batch=6, turns=9)
    for key in ("rewards", "values_low", "values_high", "values_term"):
        batch[key] = np.where(batch["mask"], batch[key], 0).astype(jnp.bfloat16)
    out = compute_hae(cfg=CONFIGS[0], **batch)
    assert all(getattr(out, name).dtype == jnp.float32 for name in FIELDS)
    as64 = {k: (np.asarray(v, np.float64) if v.dtype == jnp.bfloat16 else v) for k, v in batch.items()}
    ref = hae_ref(cfg=CONFIGS[0], **as64)
    assert_matches(out, ref, batch["mask"])


def test_jit_and_vmap():
    rng = np.random.default_rng(9)
    batches = [random_batch(rng, batch=4, turns=7, lengths=np.full(4, 7)) for _ in range(3)]
    stacked = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
    cfg = CONFIGS[2]  # no normalisation: trajectories are independent
    fn = lambda kw: compute_hae(cfg=cfg, **kw)
    vmapped = jax.jit(jax.vmap(fn))(stacked)
    for i, b in enumerate(batches):
        single = compute_hae(cfg=cfg, **b)
        for name in FIELDS:
            np.testing.assert_allclose(np.asarray(getattr(vmapped, name))[i],
                                       np.asarray(getattr(single, name)), atol=1e-6)


def test_no_quadratic_intermediates():
    batch_size, turns = 3, 64
    rng = np.random.default_rng(0)
    batch = random_batch(rng, batch=batch_size, turns=turns)
    jaxpr = jax.make_jaxpr(lambda kw: compute_hae(cfg=CONFIGS[1], **kw))(batch)

    def sizes(jp):
        for eqn in jp.eqns:
            for var in eqn.outvars:
                yield int(np.prod(var.aval.shape)) if hasattr(var.aval, "shape") else 1
            for param in eqn.params.values():
                inner = getattr(param, "jaxpr", None)
                if inner is not None:
                    yield from sizes(getattr(inner, "jaxpr", inner))

    assert max(sizes(jaxpr.jaxpr)) <= 2 * batch_size * turns


def test_sharded_matches_unsharded():
    devices = np.array(jax.devices()[:8])
    assert devices.size == 8, "tests/conftest.py should give 8 CPU devices"
    mesh = Mesh(devices, ("data",))
    rng = np.random.default_rng(21)
    batch = random_batch(rng, batch=32, turns=11)
    batch["values_term"] = np.where(batch["mask"], batch["values_term"], 0.0)
    for cfg in (CONFIGS[1], CONFIGS[3], CONFIGS[0]):
        want = compute_hae(cfg=cfg, **batch)
        sharded_fn = jax.shard_map(
            lambda kw: compute_hae(cfg=cfg, axis_name="data", **kw),
            mesh=mesh, in_specs=(P("data"),), out_specs=P("data"),
        )
        placed = jax.device_put(batch, NamedSharding(mesh, P("data")))
        got = jax.jit(sharded_fn)(placed)
        assert len(got.adv_low.sharding.device_set) == 8
        for name in FIELDS:
            np.testing.assert_allclose(np.asarray(getattr(got, name)),
                                       np.asarray(getattr(want, name)), atol=1e-6, err_msg=name)


def test_config_validation():
    with pytest.raises(ValueError, match="gamma"):
        HAEConfig(gamma=1.5)
    with pytest.raises(ValueError, match="lam_seg"):
        HAEConfig(lam_seg=-0.1)
    with pytest.raises(ValueError, match="keep_penalty_mode"):
        HAEConfig(keep_penalty_mode="per_turn")
    with pytest.raises(ValueError, match="keep_penalty"):
        HAEConfig(keep_penalty=float("nan"))
    with pytest.raises(ValueError, match="normalize"):
        HAEConfig(normalize="yes")


def test_shape_errors_name_the_argument():
    rng = np.random.default_rng(1)
    batch = random_batch(rng, batch=4, turns=5)
    bad = dict(batch, values_high=batch["values_high"][:, :4])
    with pytest.raises(ValueError, match="values_high"):
        compute_hae(cfg=CONFIGS[0], **bad)
    bad = dict(batch, keep_changed=batch["keep_changed"][:3])
    with pytest.raises(ValueError, match="keep_changed"):
        compute_hae(cfg=CONFIGS[0], **bad)
    bad = dict(batch, rewards=batch["rewards"][0])
    with pytest.raises(ValueError, match="rewards"):
        compute_hae(cfg=CONFIGS[0], **bad)
    with pytest.raises(TypeError, match="HAEConfig"):
        compute_hae(cfg=dataclasses.asdict(CONFIGS[0]), **batch)


def test_assign_token_advantages():
    hae = HAEOutput(
        adv_low=jnp.array([[1.0, 2.0], [3.0, 0.0]]),
        ret_low=jnp.zeros((2, 2)),
        adv_high=jnp.array([[10.0, 0.0], [30.0, 0.0]]),
        ret_high=jnp.zeros((2, 2)),
        adv_term=jnp.array([[100.0, 200.0], [300.0, 0.0]]),
        ret_term=jnp.zeros((2, 2)),
        boundary=jnp.array([[True, False], [True, False]]),
    )
    # rows: (0,0), (0,1), (1,0), padding row pointing at (1,1) with no tokens
    traj = jnp.array([0, 0, 1, 1])
    turn = jnp.array([0, 1, 0, 1])
    switch = jnp.array([[1, 0, 0, 0, 0]] * 3 + [[0] * 5], bool)
    subgoal = jnp.array([[0, 1, 0, 0, 0]] * 3 + [[0] * 5], bool)
    action = jnp.array([[0, 0, 1, 1, 0]] * 3 + [[0] * 5], bool)
    got = assign_token_advantages(hae, traj, turn, action, subgoal, switch)
    want = np.array([
        [100, 10, 1, 1, 0],
        [200, 0, 2, 2, 0],   # not a boundary turn: subgoal tokens get nothing
        [300, 30, 3, 3, 0],
        [0, 0, 0, 0, 0],
    ], np.float32)
    np.testing.assert_array_equal(np.asarray(got), want)
    with pytest.raises(ValueError, match="subgoal_mask"):
        assign_token_advantages(hae, traj, turn, action, subgoal[:2], switch)


def test_dtype_and_token_index_errors_name_the_argument():
    batch = random_batch(np.random.default_rng(3), batch=3, turns=4)
    with pytest.raises(ValueError, match="values_low must have a float dtype"):
        compute_hae(cfg=CONFIGS[0], **dict(batch, values_low=np.ones((3, 4), np.int32)))
    with pytest.raises(ValueError, match=r"mask must have shape \[B, T\]"):
        compute_hae(cfg=CONFIGS[0], **dict(batch, mask=batch["mask"][None]))
    out = HAEOutput(*(np.zeros((3, 4), np.float32),) * 6, boundary=np.ones((3, 4), bool))
    rows = jnp.array([0, 1, 2])
    masks = [jnp.ones((3, 6), bool)] * 3
    with pytest.raises(ValueError, match="traj_index must have an int dtype"):
        assign_token_advantages(out, rows.astype(jnp.float32), rows, *masks)
    with pytest.raises(ValueError, match=r"turn_index must have shape \[N\]"):
        assign_token_advantages(out, rows, rows[:, None], *masks)
    with pytest.raises(ValueError, match=r"switch_mask has shape \(3, 5\), but action_mask"):
        assign_token_advantages(out, rows, rows, masks[0], masks[1], jnp.ones((3, 5), bool))
    with pytest.raises(ValueError, match=r"hae.adv_high must have shape \[B, T\]"):
        assign_token_advantages(out._replace(adv_high=out.adv_high[0]), rows, rows, *masks)
