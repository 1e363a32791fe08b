"""Flat estimators, GiGPO and the registry against the plain-loop references."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hiper_jax.advantages import (
    ESTIMATORS,
    GiGPOConfig,
    TurnBatch,
    anchor_state_ids,
    discounted_returns,
    get_estimator,
    gigpo_advantages,
    grpo_advantages,
    rloo_advantages,
    turn_gae,
)
from hiper_jax.hae import HAEConfig, compute_hae
from tests.hae_reference import (
    episode_returns_ref,
    hae_ref,
    gigpo_ref,
    grpo_ref,
    rloo_ref,
    shaped_rewards_ref,
    turn_gae_ref,
)
from tests.test_hae import FIELDS, random_batch


def padded(rows, turns):
    out = np.zeros((len(rows), turns))
    for b, row in enumerate(rows):
        out[b, : len(row)] = row
    return out


@pytest.mark.parametrize("bootstrap", [False, True])
@pytest.mark.parametrize("gamma,lam", [(0.95, 0.95), (1.0, 1.0), (0.9, 0.0)])
def test_turn_gae_matches_reference(bootstrap, gamma, lam):
    rng = np.random.default_rng(4)
    batch = random_batch(rng, batch=10, turns=12)
    adv, ret = turn_gae(batch["rewards"], batch["values_low"], batch["dones"], batch["mask"],
                        gamma, lam, bootstrap)
    clean = {k: np.where(batch["mask"], v, 0) for k, v in batch.items()}
    ref_adv, ref_ret = turn_gae_ref(clean["rewards"], clean["values_low"], batch["dones"],
                                    batch["mask"], gamma, lam, bootstrap)
    np.testing.assert_allclose(np.asarray(adv), ref_adv, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ret), ref_ret, atol=1e-5)


def test_turn_gae_equals_hae_low_level_without_switches():
    rng = np.random.default_rng(8)
    batch = random_batch(rng, batch=6, turns=9, switch_mode="none")
    cfg = HAEConfig(gamma=0.9, lam_turn=0.8, bootstrap_truncated=True)
    hae = compute_hae(cfg=cfg, **{**batch, "invalid": None, "keep_changed": None})
    adv, _ = turn_gae(batch["rewards"], batch["values_low"], batch["dones"], batch["mask"],
                      0.9, 0.8, True)
    np.testing.assert_allclose(np.asarray(adv), np.asarray(hae.adv_low), atol=1e-6)


def test_grpo_and_rloo_match_reference():
    rng = np.random.default_rng(12)
    returns = rng.normal(size=12).astype(np.float32)
    groups = np.array([0, 0, 0, 0, 5, 5, 5, 2, 2, 9, 7, 7])
    np.testing.assert_allclose(np.asarray(grpo_advantages(returns, groups)),
                               grpo_ref(returns.tolist(), groups.tolist()), atol=1e-5)
    np.testing.assert_allclose(np.asarray(rloo_advantages(returns, groups)),
                               rloo_ref(returns.tolist(), groups.tolist()), atol=1e-5)
    # a lone rollout (group 9) has no baseline to compare with
    assert float(rloo_advantages(returns, groups)[9]) == 0.0
    assert float(grpo_advantages(returns, groups)[9]) == 0.0


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_episode_estimators_use_shaped_returns(name):
    rng = np.random.default_rng(13)
    batch = random_batch(rng, batch=8, turns=7)
    group_ids = np.repeat(np.arange(4), 2)
    cfg = HAEConfig(keep_penalty=-0.5, invalid_action_penalty=0.2, keep_consistency_penalty=-0.1)
    spec = get_estimator(name)
    out = spec.fn(TurnBatch(**batch, group_ids=group_ids), cfg)
    shaped = shaped_rewards_ref(batch["rewards"], batch["switch"], batch["mask"], cfg,
                                batch["invalid"], batch["keep_changed"])
    returns = episode_returns_ref(padded(shaped, 7), batch["mask"])
    ref_fn = grpo_ref if name == "grpo" else rloo_ref
    per_episode = np.array(ref_fn(returns, group_ids.tolist()))
    want = np.where(batch["mask"], per_episode[:, None], 0.0)
    for field in ("adv_low", "adv_high", "adv_term"):
        np.testing.assert_allclose(np.asarray(getattr(out, field)), want, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out.boundary), batch["mask"])
    assert spec.needs_groups and spec.value_heads == ()


def test_turn_gae_estimator_shapes_and_normalises():
    rng = np.random.default_rng(14)
    batch = random_batch(rng, batch=8, turns=10)
    cfg = HAEConfig(gamma=0.9, lam_turn=0.9, keep_penalty=-0.3, keep_penalty_mode="normalized",
                    invalid_action_penalty=0.1, normalize=True)
    out = get_estimator("turn_gae").fn(TurnBatch(**batch), cfg)
    mask = batch["mask"]
    adv = np.asarray(out.adv_low)
    assert abs(adv[mask].mean()) < 1e-5 and abs(adv[mask].std() - 1) < 1e-4
    shaped = padded(shaped_rewards_ref(batch["rewards"], batch["switch"], mask, cfg,
                                       batch["invalid"], batch["keep_changed"]), 10)
    _, ref_ret = turn_gae_ref(shaped, np.where(mask, batch["values_low"], 0), batch["dones"],
                              mask, 0.9, 0.9, False)
    np.testing.assert_allclose(np.asarray(out.ret_low), ref_ret, atol=1e-5)
    np.testing.assert_array_equal(adv, np.asarray(out.adv_high))


def test_registry():
    assert set(ESTIMATORS) == {"hae", "turn_gae", "grpo", "rloo", "gigpo", "hae_no_term",
                               "hae_no_keep_penalty", "hae_flat_subgoal"}
    from hiper_jax.train.config import ESTIMATOR_NAMES, GROUP_ESTIMATORS

    assert set(ESTIMATOR_NAMES) == set(ESTIMATORS)  # the config's names, kept free of JAX
    assert set(GROUP_ESTIMATORS) == {name for name, spec in ESTIMATORS.items() if spec.needs_groups}
    with pytest.raises(ValueError, match="known"):
        get_estimator("gigpo_v9")
    rng = np.random.default_rng(1)
    batch = TurnBatch(**random_batch(rng, batch=4, turns=5))
    with pytest.raises(ValueError, match="group_ids"):
        get_estimator("grpo").fn(batch, HAEConfig())
    with pytest.raises(ValueError, match="group_ids"):
        get_estimator("rloo").fn(batch._replace(group_ids=np.zeros(3, int)), HAEConfig())
    hae = get_estimator("hae").fn(batch, HAEConfig())
    direct = compute_hae(batch.rewards, batch.values_low, batch.values_high, batch.values_term,
                         batch.switch, batch.dones, batch.mask, HAEConfig(),
                         invalid=batch.invalid, keep_changed=batch.keep_changed)
    np.testing.assert_array_equal(np.asarray(hae.adv_high), np.asarray(direct.adv_high))


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_a_row_without_turns_joins_no_group(name):
    """An episode lost to an env fault arrives with no turns: its group's other rollouts get the
    advantages they would get without it, and it gets none."""
    rng = np.random.default_rng(15)
    batch = random_batch(rng, batch=8, turns=6)
    batch["mask"][:, 0] = True
    group_ids = np.repeat(np.arange(2), 4)
    cfg = HAEConfig()
    spec = get_estimator(name)
    lost = {k: v.copy() for k, v in batch.items()}
    lost["mask"][2] = False
    with_lost = spec.fn(TurnBatch(**lost, group_ids=group_ids), cfg)
    kept = [b for b in range(8) if b != 2]
    without = spec.fn(TurnBatch(**{k: v[kept] for k, v in batch.items()}, group_ids=group_ids[kept]), cfg)
    np.testing.assert_allclose(np.asarray(with_lost.adv_low)[kept], np.asarray(without.adv_low), atol=1e-5)
    assert not np.asarray(with_lost.adv_low)[2].any()


# --- GiGPO ----------------------------------------------------------------------------------

# Jitted once per shape and mode: run op by op, its segment sums and sort would compile every
# primitive separately and take most of this file's time.
gigpo_jit = jax.jit(gigpo_advantages, static_argnames="mode")


def gigpo_batch(rng, batch=12, turns=9, num_states=3, group_size=3):
    """Random ragged batch in groups of ``group_size`` with states drawn from ``num_states``
    values (so anchors repeat within and across trajectories); padding holds NaN / garbage."""
    data = random_batch(rng, batch=batch, turns=turns)
    group_ids = np.repeat(np.arange(batch // group_size), group_size)
    rng.shuffle(group_ids)
    states = rng.integers(0, num_states, size=(batch, turns)).astype(np.int32)
    states[~data["mask"]] = rng.integers(0, num_states, size=int((~data["mask"]).sum()))
    # Sparse, success-like rewards make anchors with equal returns (the exact-zero case) likely.
    rewards = np.where(rng.random((batch, turns)) < 0.3, 10.0, 0.0).astype(np.float32)
    rewards[~data["mask"]] = np.nan
    return data["mask"], rewards, group_ids, states


def clean(x, mask):
    return np.where(mask, x, 0.0)


@pytest.mark.parametrize("mode", ["mean_norm", "mean_std_norm"])
@pytest.mark.parametrize("gamma,step_weight", [(0.95, 1.0), (1.0, 0.5), (0.5, 2.0)])
def test_gigpo_matches_reference(mode, gamma, step_weight):
    rng = np.random.default_rng(21)
    for _ in range(3):
        mask, rewards, groups, states = gigpo_batch(rng)
        got = gigpo_jit(rewards, mask, groups, states, gamma, step_weight, mode)
        want = gigpo_ref(clean(rewards, mask), mask, groups, states, gamma, step_weight, mode)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)
        assert np.all(np.asarray(got)[~mask] == 0)


@pytest.mark.parametrize("mode", ["mean_norm", "mean_std_norm"])
def test_gigpo_without_repeated_states_is_the_episode_term(mode):
    rng = np.random.default_rng(22)
    mask, rewards, groups, _ = gigpo_batch(rng)
    unique = np.arange(mask.size, dtype=np.int32).reshape(mask.shape)  # no state repeats
    got = np.asarray(gigpo_jit(rewards, mask, groups, unique, 0.9, 1.0, mode))
    np.testing.assert_allclose(got, gigpo_ref(clean(rewards, mask), mask, groups, unique, 0.9, 1.0, mode),
                               rtol=1e-5, atol=1e-4)
    # Every anchor is a lone turn: the step weight changes nothing.
    np.testing.assert_array_equal(got, np.asarray(gigpo_jit(rewards, mask, groups, unique, 0.9, 7.0, mode)))
    # The episode term is constant along a trajectory and, with mean_norm, sums to 0 over a
    # group's turns.
    for b in range(len(mask)):
        assert np.allclose(got[b, mask[b]], got[b, 0])
    if mode == "mean_norm":
        for g in np.unique(groups):
            assert abs(got[groups == g][mask[groups == g]].sum()) < 1e-3


def test_gigpo_with_one_state_per_group_compares_all_turns():
    rng = np.random.default_rng(23)
    mask, rewards, groups, _ = gigpo_batch(rng)
    same = np.zeros(mask.shape, np.int32)  # every state repeats: one anchor per group
    got = np.asarray(gigpo_jit(rewards, mask, groups, same, 0.8, 1.0, "mean_norm"))
    np.testing.assert_allclose(got, gigpo_ref(clean(rewards, mask), mask, groups, same, 0.8),
                               rtol=1e-5, atol=1e-4)
    returns = np.asarray(discounted_returns(clean(rewards, mask), 0.8))
    step_only = np.asarray(gigpo_jit(rewards, mask, groups, same, 0.8, 1.0, "mean_norm")
                           - gigpo_jit(rewards, mask, groups, same, 0.8, 0.0, "mean_norm"))
    for g in np.unique(groups):
        rows = groups == g
        members = returns[rows][mask[rows]]
        np.testing.assert_allclose(step_only[rows][mask[rows]], members - members.mean(), atol=1e-4)


def test_gigpo_equal_returns_give_exact_zeros_and_lone_groups_keep_their_return():
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 0], [1, 0, 0, 0]], bool)
    rewards = np.array([[0.1, 0.1, 0.1, 0], [0.1, 0.1, 0.1, 0], [3.0, 0, 0, 0]], np.float32)
    states = np.array([[0, 1, 2, 0], [0, 1, 2, 0], [0, 0, 0, 0]], np.int32)
    groups = np.array([0, 0, 2])
    for mode in ("mean_norm", "mean_std_norm"):
        got = np.asarray(gigpo_jit(rewards, mask, groups, states, 0.9, 1.0, mode))
        np.testing.assert_array_equal(got[:2], 0.0)  # identical rollouts: nothing to prefer
        assert got[2, 0] == pytest.approx(3.0, rel=1e-5)  # one turn in its group: mean 0, std 1


def test_gigpo_jit_and_vmap():
    rng = np.random.default_rng(24)
    batches = [gigpo_batch(rng) for _ in range(4)]
    stacked = [np.stack(x) for x in zip(*batches)]
    fn = jax.jit(jax.vmap(lambda r, m, g, s: gigpo_advantages(r, m, g, s, 0.95, 1.0, "mean_std_norm")))
    got = np.asarray(fn(stacked[1], stacked[0], stacked[2], stacked[3]))
    for k, (mask, rewards, groups, states) in enumerate(batches):
        want = gigpo_ref(clean(rewards, mask), mask, groups, states, 0.95, 1.0, "mean_std_norm")
        np.testing.assert_allclose(got[k], want, rtol=1e-5, atol=1e-4)


def test_gigpo_estimator_uses_shaped_rewards_and_options():
    rng = np.random.default_rng(25)
    mask, rewards, groups, states = gigpo_batch(rng)
    data = random_batch(np.random.default_rng(26), batch=12, turns=9, lengths=mask.sum(axis=1))
    data["rewards"] = rewards
    cfg = HAEConfig(gamma=0.9, keep_penalty=-0.3, keep_penalty_mode="normalized",
                    invalid_action_penalty=0.5, keep_consistency_penalty=-0.2, normalize=True)
    spec = get_estimator("gigpo", step_weight=0.5, mode="mean_std_norm")
    out = spec.fn(TurnBatch(**data, group_ids=groups, state_ids=states), cfg)
    shaped = padded(shaped_rewards_ref(data["rewards"], data["switch"], mask, cfg, data["invalid"],
                                       data["keep_changed"]), 9)
    want = np.array(gigpo_ref(shaped, mask, groups, states, 0.9, 0.5, "mean_std_norm"))
    for field in ("adv_low", "adv_high", "adv_term"):
        np.testing.assert_allclose(np.asarray(getattr(out, field)), want, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(out.boundary), mask)
    assert spec.needs_groups and spec.needs_states and spec.value_heads == ()
    default = get_estimator("gigpo").fn(TurnBatch(**data, group_ids=groups, state_ids=states), cfg)
    np.testing.assert_allclose(np.asarray(default.adv_low),
                               gigpo_ref(shaped, mask, groups, states, 0.9), rtol=1e-5, atol=1e-4)


def test_gigpo_bad_inputs_fail_clearly():
    batch = TurnBatch(**random_batch(np.random.default_rng(2), batch=4, turns=5), group_ids=np.zeros(4, int))
    with pytest.raises(ValueError, match="state_ids"):
        get_estimator("gigpo").fn(batch, HAEConfig())
    with pytest.raises(ValueError, match="state_ids has shape"):
        get_estimator("gigpo").fn(batch._replace(state_ids=np.zeros((4, 3), int)), HAEConfig())
    with pytest.raises(ValueError, match="unknown option"):
        get_estimator("gigpo", step_weigth=1.0)
    with pytest.raises(ValueError, match="takes no options"):
        get_estimator("grpo", mode="mean_norm")
    with pytest.raises(ValueError, match="mode"):
        GiGPOConfig(mode="std_norm")
    with pytest.raises(ValueError, match="similarity"):
        anchor_state_ids([["a"]], [0], 2, similarity=0.0)


def test_anchor_state_ids_exact_and_similar():
    observations = [["You see a fridge 1.", "Nothing happens.", "You see a fridge 1."],
                    ["You see a fridge 1.", "You see a fridge 2."],
                    ["Nothing happens."]]
    exact = anchor_state_ids(observations, [0, 0, 1], 4)
    assert exact.shape == (3, 4) and exact.dtype == np.int32
    assert exact[0, 0] == exact[0, 2] == exact[1, 0]
    assert len({exact[0, 0], exact[0, 1], exact[1, 1], exact[2, 0]}) == 4  # other group: own id
    assert np.all(exact[1, 2:] == -1) and np.all(exact[2, 1:] == -1)
    # "fridge 2" is one character away from "fridge 1": the same anchor at 0.9, not at 0.99.
    similar = anchor_state_ids(observations, [0, 0, 1], 4, similarity=0.9)
    assert similar[1, 1] == similar[0, 0] != similar[0, 1]
    assert anchor_state_ids(observations, [0, 0, 1], 4, similarity=0.99)[1, 1] != similar[0, 0]
    # Greedy against each cluster's first member, in trajectory-major order.
    chain = anchor_state_ids([["aaaa", "aaab", "aabb"]], [0], 3, similarity=0.7)
    assert chain[0, 0] == chain[0, 1] != chain[0, 2]
    with pytest.raises(ValueError, match="num_turns"):
        anchor_state_ids(observations, [0, 0, 1], 2)


# --- HAE ablations -----------------------------------------------------------------------------

ABLATION_CFG = HAEConfig(gamma=0.9, lam_turn=0.8, lam_seg=0.7, bootstrap_truncated=True, keep_penalty=-0.3,
                         keep_penalty_mode="normalized", invalid_action_penalty=0.5,
                         keep_consistency_penalty=-0.4)


def hand_batch():
    """Two trajectories by hand: 4 turns (SWITCH at 2, done), 3 turns (no switch, truncated),
    with invalid and keep-changed flags on KEEP turns so every shaping term is active."""
    f = lambda *rows: np.array(rows, np.float32)
    return dict(rewards=f([0.0, 1.0, 0.0, 10.0], [0.0, 0.5, 0.0, 0.0]),
                values_low=f([1.0, 2.0, 0.5, 3.0], [0.2, 0.4, 0.6, 0.0]),
                values_high=f([1.5, 0.0, 2.5, 0.0], [0.3, 0.0, 0.0, 0.0]),
                values_term=f([0.5, 1.0, 1.5, 2.0], [0.1, 0.2, 0.3, 0.0]),
                switch=f([1, 0, 1, 0], [0, 0, 0, 0]), dones=f([0, 0, 0, 1], [0, 0, 0, 0]),
                mask=f([1, 1, 1, 1], [1, 1, 1, 0]), invalid=f([0, 1, 0, 0], [0, 0, 1, 0]),
                keep_changed=f([0, 1, 0, 1], [0, 1, 1, 0]))


@pytest.mark.parametrize("normalize", [False, True])
def test_hae_no_term_is_hae_without_the_termination_advantage(normalize):
    cfg = dataclasses.replace(ABLATION_CFG, normalize=normalize)
    data = hand_batch()
    out = get_estimator("hae_no_term").fn(TurnBatch(**data), cfg)
    ref = hae_ref(cfg=cfg, **data)
    assert np.abs(np.asarray(ref["adv_term"])).max() > 0.1  # there was termination credit to remove
    for field in FIELDS:
        want = np.zeros((2, 4)) if field == "adv_term" else np.asarray(ref[field])
        np.testing.assert_allclose(np.asarray(getattr(out, field)), want, atol=1e-5, err_msg=field)
    np.testing.assert_array_equal(np.asarray(out.boundary), ref["boundary"])
    assert ESTIMATORS["hae_no_term"].value_heads == ("low", "high")


@pytest.mark.parametrize("normalize", [False, True])
def test_hae_no_keep_penalty_ignores_both_keep_penalties(normalize):
    cfg = dataclasses.replace(ABLATION_CFG, normalize=normalize)
    data = hand_batch()
    out = get_estimator("hae_no_keep_penalty").fn(TurnBatch(**data), cfg)
    # By hand: the same config with the two keep terms removed (the invalid penalty stays).
    ref = hae_ref(cfg=dataclasses.replace(cfg, keep_penalty=0.0, keep_consistency_penalty=0.0), **data)
    with_penalty = hae_ref(cfg=cfg, **data)
    for field in FIELDS:
        np.testing.assert_allclose(np.asarray(getattr(out, field)), np.asarray(ref[field]), atol=1e-5,
                                   err_msg=field)
    assert not np.allclose(np.asarray(ref["ret_low"]), np.asarray(with_penalty["ret_low"]), atol=1e-3)
    assert not np.allclose(np.asarray(out.ret_low), np.asarray(hae_ref(
        cfg=dataclasses.replace(cfg, keep_consistency_penalty=0.0), **data)["ret_low"]), atol=1e-3)
    assert ESTIMATORS["hae_no_keep_penalty"].value_heads == ("low", "high", "term")


def test_hae_flat_subgoal_by_hand():
    # test_hae.test_known_values_by_hand's trajectory: segments {0, 1} and {2}, done at 2,
    # gamma 0.5, lambdas 1. Flat GAE with V_low = (0.5, 1, 2): delta = (1, 2, 2), A = (2.5, 3, 2);
    # HAE's segment-level advantages there are (2.75, 0, 1).
    cfg = HAEConfig(gamma=0.5, lam_turn=1.0, lam_seg=1.0)
    f = lambda *x: np.array([x], np.float32)
    batch = TurnBatch(rewards=f(1.0, 2.0, 4.0), values_low=f(0.5, 1.0, 2.0), values_high=f(0.25, 9.0, 3.0),
                      switch=f(1, 0, 1), dones=f(0, 0, 1), mask=f(1, 1, 1), values_term=f(0.0, 0.0, 1.0))
    out = get_estimator("hae_flat_subgoal").fn(batch, cfg)
    np.testing.assert_allclose(out.adv_high[0], [2.5, 0.0, 2.0], atol=1e-6)
    np.testing.assert_allclose(out.ret_high[0], [3.0, 0.0, 4.0], atol=1e-6)  # HAE's targets
    np.testing.assert_allclose(out.adv_low[0], [2.25, 2.5, 2.0], atol=1e-6)


@pytest.mark.parametrize("normalize", [False, True])
def test_hae_flat_subgoal_matches_references(normalize):
    cfg = dataclasses.replace(ABLATION_CFG, normalize=normalize)
    rng = np.random.default_rng(21)
    data = random_batch(rng, batch=7, turns=8)
    mask = data["mask"]
    out = get_estimator("hae_flat_subgoal").fn(TurnBatch(**data), cfg)
    ref = hae_ref(cfg=cfg, **data)
    shaped = padded(shaped_rewards_ref(data["rewards"], data["switch"], mask, cfg, data["invalid"],
                                       data["keep_changed"]), 8)
    flat, _ = turn_gae_ref(shaped, np.where(mask, data["values_low"], 0), data["dones"], mask, cfg.gamma,
                           cfg.lam_turn, cfg.bootstrap_truncated)
    boundary = np.asarray(ref["boundary"])
    flat = np.where(boundary, np.asarray(flat), 0.0)
    if normalize:
        chosen = flat[boundary]
        flat = np.where(boundary, (flat - chosen.mean()) / (chosen.std() + 1e-8), 0.0)
    np.testing.assert_allclose(np.asarray(out.adv_high), flat, atol=1e-5)
    assert not np.allclose(flat, np.asarray(ref["adv_high"]), atol=1e-3)
    for field in FIELDS:
        if field != "adv_high":
            np.testing.assert_allclose(np.where(mask, np.asarray(getattr(out, field)), 0),
                                       np.where(mask, np.asarray(ref[field]), 0), atol=1e-5, err_msg=field)
    np.testing.assert_array_equal(np.asarray(out.boundary), boundary)


@pytest.mark.parametrize("name", ["hae_no_term", "hae_no_keep_penalty", "hae_flat_subgoal"])
def test_hae_ablations_jit_and_shape_errors(name):
    fn = get_estimator(name).fn
    batch = TurnBatch(**random_batch(np.random.default_rng(2), batch=3, turns=4))
    eager = fn(batch, ABLATION_CFG)
    jitted = jax.jit(fn, static_argnames="cfg")(batch, cfg=ABLATION_CFG)
    for field in FIELDS:
        np.testing.assert_allclose(np.asarray(getattr(jitted, field)), np.asarray(getattr(eager, field)), atol=1e-6)
    with pytest.raises(ValueError, match="values_high"):
        fn(batch._replace(values_high=np.zeros((3, 5))), ABLATION_CFG)


def test_estimator_inputs_are_checked_at_the_boundary():
    rng = np.random.default_rng(4)
    data = random_batch(rng, batch=4, turns=5)
    with pytest.raises(ValueError, match=r"values has shape \(4, 4\), but rewards"):
        turn_gae(data["rewards"], data["values_low"][:, :4], data["dones"], data["mask"], 0.9, 0.9)
    with pytest.raises(ValueError, match="rewards must have a float dtype"):
        turn_gae(np.zeros((4, 5), np.int32), data["values_low"], data["dones"], data["mask"], 0.9, 0.9)
    returns, groups = np.zeros(4, np.float32), np.array([0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"returns must have shape \[B\]"):
        grpo_advantages(returns[:, None], groups)
    with pytest.raises(ValueError, match="group_ids must have an int dtype"):
        rloo_advantages(returns, groups.astype(np.float32))
    with pytest.raises(ValueError, match=r"present must have shape \[B\] = \(4,\)"):
        rloo_advantages(returns, groups, present=np.ones(3, bool))
    states = np.zeros((4, 5), np.int32)
    with pytest.raises(ValueError, match=r"group_ids must have shape \[B\] = \(4,\)"):
        gigpo_advantages(data["rewards"], data["mask"], groups[:3], states, 0.9)
    with pytest.raises(ValueError, match="state_ids must have an int dtype"):
        gigpo_advantages(data["rewards"], data["mask"], groups, states.astype(np.float32), 0.9)
    batch = TurnBatch(**data, group_ids=groups)
    with pytest.raises(ValueError, match="group_ids must have an int dtype"):
        get_estimator("grpo").fn(batch._replace(group_ids=groups.astype(np.float32)), HAEConfig())
    with pytest.raises(ValueError, match="values_high must have a float dtype"):
        get_estimator("turn_gae").fn(batch._replace(values_high=np.zeros((4, 5), int)), HAEConfig())
