"""Flat estimators and the registry against the plain-loop references."""

import numpy as np
import pytest

from hiper_jax.advantages import (
    ESTIMATORS,
    TurnBatch,
    get_estimator,
    grpo_advantages,
    rloo_advantages,
    turn_gae,
)
from hiper_jax.hae import HAEConfig, compute_hae
from tests.hae_reference import (
    episode_returns_ref,
    grpo_ref,
    rloo_ref,
    shaped_rewards_ref,
    turn_gae_ref,
)
from tests.test_hae import random_batch


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
    assert set(ESTIMATORS) == {"hae", "turn_gae", "grpo", "rloo"}
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
