"""Config validation names the field of the first problem."""

import ml_collections
import pytest

from hiper_jax.train.config import base_config, validate


def valid_config(tmp_path):
    config = base_config()
    config.model.checkpoint = str(tmp_path)
    return config


def test_base_config_is_valid(tmp_path):
    validate(valid_config(tmp_path), num_devices=8)


@pytest.mark.parametrize("edit,field", [
    (lambda c: c.ppo.__setattr__("learning_rate", 1.0), "ppo.learning_rate"),
    (lambda c: c.env.__setattr__("num_envs", 0), "env.num_envs"),
    (lambda c: c.advantage.__setattr__("gamma", 1.5), "advantage.gamma"),
    (lambda c: c.advantage.__setattr__("estimator", "ppo"), "advantage.estimator"),
    (lambda c: c.advantage.__setattr__("estimator", "grpo"), "advantage.rollouts_per_task"),
    (lambda c: c.advantage.__setattr__("estimator", "gigpo"), "advantage.rollouts_per_task"),
    (lambda c: c.advantage.__setattr__("gigpo_mode", "std_norm"), "advantage.gigpo_mode"),
    (lambda c: c.advantage.__setattr__("gigpo_similarity", 0.0), "advantage.gigpo_similarity"),
    (lambda c: c.advantage.__setattr__("keep_penalty_mode", "scaled"), "advantage.keep_penalty_mode"),
    (lambda c: c.model.__setattr__("checkpoint", "/no/such/dir"), "model.checkpoint"),
    (lambda c: c.model.__setattr__("critic", "none"), "model.critic"),
    (lambda c: c.sampling.__setattr__("top_p", 0.0), "sampling.top_p"),
    (lambda c: c.ppo.__setattr__("dual_clip", 1.0), "ppo.dual_clip"),
    (lambda c: c.mesh.__setattr__("tensor", 3), "mesh"),
    (lambda c: c.train.__setattr__("iterations", True), "train.iterations"),
])
def test_bad_fields_are_named(tmp_path, edit, field):
    config = valid_config(tmp_path)
    with config.unlocked():
        edit(config)
    with pytest.raises(ValueError, match=f"config field {field}"):
        validate(config, num_devices=8)


def test_group_estimators_need_groups_that_divide_envs(tmp_path):
    config = valid_config(tmp_path)
    config.advantage.estimator = "rloo"
    config.advantage.rollouts_per_task = 3
    with pytest.raises(ValueError, match="config field env.num_envs"):
        validate(config)
    config.advantage.rollouts_per_task = 4
    validate(config)


def test_unknown_section(tmp_path):
    config = valid_config(tmp_path)
    with config.unlocked():
        config.optimizer = ml_collections.ConfigDict({"lr": 1.0})
    with pytest.raises(ValueError, match="config field optimizer: unknown key"):
        validate(config)


def test_gigpo_options_reach_the_estimator(tmp_path):
    from hiper_jax.advantages import GiGPOConfig, get_estimator
    from hiper_jax.train.config import estimator_options

    config = valid_config(tmp_path)
    config.advantage.estimator = "gigpo"
    config.advantage.rollouts_per_task = 4
    config.advantage.gigpo_step_weight = 0.25
    config.advantage.gigpo_mode = "mean_std_norm"
    validate(config)
    spec = get_estimator("gigpo", **estimator_options(config.advantage))
    assert spec.fn.keywords["options"] == GiGPOConfig(step_weight=0.25, mode="mean_std_norm")
    config.advantage.estimator = "hae"
    assert estimator_options(config.advantage) == {}
