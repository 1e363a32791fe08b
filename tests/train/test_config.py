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
    (lambda c: c.model.__setattr__("lora_rank", -1), "model.lora_rank"),
    (lambda c: c.model.__setattr__("lora_alpha", 0.0), "model.lora_alpha"),
    (lambda c: c.model.__setattr__("scan_unroll", 0), "model.scan_unroll"),
    (lambda c: c.model.__setattr__("lora_targets", ("q_proj", "qkv_proj")), "model.lora_targets"),
    (lambda c: (c.model.__setattr__("lora_rank", 8), c.model.__setattr__("lora_targets", ())),
     "model.lora_targets"),
    (lambda c: c.sampling.__setattr__("top_p", 0.0), "sampling.top_p"),
    (lambda c: c.ppo.__setattr__("dual_clip", 1.0), "ppo.dual_clip"),
    (lambda c: c.ppo.__setattr__("old_logp", "cached"), "ppo.old_logp"),
    (lambda c: c.mesh.__setattr__("tensor", 3), "mesh"),
    (lambda c: c.sampling.mesh.__setattr__("data", 0), "sampling.mesh.data"),
    (lambda c: c.sampling.mesh.__setattr__("tensor", -2), "sampling.mesh.tensor"),
    (lambda c: c.sampling.mesh.update(data=2, fsdp=4), "sampling.mesh.tensor"),  # auto needs a -1
    (lambda c: c.sampling.mesh.update(data=-1, fsdp=-1, tensor=1), "sampling.mesh"),
    (lambda c: c.sampling.mesh.__setattr__("host_mesh", True), "sampling.mesh.host_mesh"),
    (lambda c: (c.sampling.__setattr__("host_mesh", True), c.sampling.mesh.update(data=1, tensor=3)),
     "sampling.mesh"),  # 3 does not use this host's 8 devices
    (lambda c: c.train.__setattr__("iterations", True), "train.iterations"),
    (lambda c: c.env.__setattr__("turn_budget", -1), "env.turn_budget"),
    (lambda c: (c.env.__setattr__("turn_budget", 100), c.env.__setattr__("num_envs", 8),
                c.advantage.__setattr__("rollouts_per_task", 2)), "advantage.rollouts_per_task"),
])
def test_bad_fields_are_named(tmp_path, edit, field):
    config = valid_config(tmp_path)
    with config.unlocked():
        edit(config)
    with pytest.raises(ValueError, match=f"config field {field}"):
        validate(config, num_devices=8)


def test_sampling_mesh_is_resolved_over_one_hosts_devices(tmp_path):
    config = valid_config(tmp_path)
    config.sampling.host_mesh = True
    config.sampling.mesh.update(data=1, fsdp=1, tensor=4)
    validate(config, num_devices=8, num_processes=2)  # 4 devices per host
    with pytest.raises(ValueError, match=r"config field sampling.mesh: sampling.mesh data=1 x fsdp=1 x "
                                         r"tensor=4 uses 4 devices but 8 .*one host's 8 devices"):
        validate(config, num_devices=8, num_processes=1)
    config.sampling.mesh.update(data=-1, tensor=0)  # auto: any host size
    validate(config, num_devices=8, num_processes=1)
    validate(config, num_devices=2, num_processes=2)


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


@pytest.mark.parametrize("field,closest", [
    ("train.seeds", "train.seed"),
    ("sampling.temprature", "sampling.temperature"),
    ("env.max_replay", "env.max_replays"),
    ("trian", "train"),
])
def test_unknown_keys_name_the_closest_valid_key(tmp_path, field, closest):
    from hiper_jax.train.config import ConfigError, check_override_paths, closest_key

    assert closest_key(field) == closest
    message = f"config field {field}: unknown key; the closest valid key is {closest}"
    with pytest.raises(ConfigError) as caught:
        check_override_paths(["--config=configs/x.py", f"--config.{field}.x=1" if "." not in field
                              else f"--config.{field}=1"])
    assert str(caught.value) == message
    if "." in field:
        config = valid_config(tmp_path)
        section, key = field.split(".")
        with config.unlocked():
            config[section][key] = 1
        with pytest.raises(ConfigError) as caught:
            validate(config)
        assert str(caught.value) == message


def test_override_paths_that_exist_pass():
    from hiper_jax.train.config import check_override_paths

    check_override_paths(["--config=configs/alfworld_tiny.py", "--config.train.seed=3", "--config.ppo.epochs", "2",
                          "--config.env.env_kwargs.num_tasks=4", "--other=1"])


def test_an_unknown_command_line_key_is_one_line():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "hiper_jax.train", "--config=configs/alfworld_tiny.py",
                             "--config.train.seeds=1"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: config field train.seeds: unknown key; the closest valid key is train.seed"


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


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "gigpo"])
def test_critic_warmup_needs_an_estimator_with_a_critic(tmp_path, estimator):
    config = valid_config(tmp_path)
    config.advantage.estimator = estimator
    config.advantage.rollouts_per_task = 2
    validate(config)
    config.ppo.critic_warmup_iterations = 2
    with pytest.raises(ValueError, match=f"ppo.critic_warmup_iterations: the estimator '{estimator}' has no critic"):
        validate(config)
    config.advantage.estimator = "turn_gae"  # one value head is a critic to warm up
    config.advantage.rollouts_per_task = 1
    validate(config)


def test_several_processes_need_mini_batches_that_split_over_the_batch_shards(tmp_path):
    config = valid_config(tmp_path)
    config.ppo.mini_batch_rows = 24
    config.ppo.micro_batch_rows = 8
    config.mesh.data, config.mesh.fsdp = -1, 1
    validate(config, num_devices=8, num_processes=1)  # one process: any row count
    validate(config, num_devices=8)
    with pytest.raises(ValueError, match="ppo.mini_batch_rows: must be a multiple of the mesh's 16 batch shards"):
        validate(config, num_devices=16, num_processes=2)
    config.mesh.data, config.mesh.tensor = -1, 2  # 8 data shards x 2 tensor: 24 % 8 == 0
    validate(config, num_devices=16, num_processes=2)


def test_batch_settings_carry_the_config_entries(tmp_path):
    from hiper_jax.train.config import batch_settings

    config = valid_config(tmp_path)
    config.advantage.estimator = "gigpo"
    config.advantage.rollouts_per_task = 2
    config.advantage.gigpo_step_weight = 0.5
    config.ppo.kl_coef = 0.0
    config.sampling.temperature = 0.0
    settings = batch_settings(config)
    assert settings.estimator == "gigpo" and dict(settings.estimator_options) == {"step_weight": 0.5,
                                                                                  "mode": "mean_norm"}
    assert (settings.max_turns, settings.rows, settings.length_multiple) == (
        config.env.max_turns, config.ppo.mini_batch_rows, config.ppo.length_multiple)
    assert settings.temperature == 1.0 and not settings.reference_pass  # greedy sampling: logits at 1
    assert settings.estimator_spec().needs_states


def test_lora_target_names_are_the_ports():
    from hiper_jax.models.qwen2 import LORA_TARGETS
    from hiper_jax.train.config import LORA_TARGETS as CONFIG_TARGETS, base_config

    assert CONFIG_TARGETS == LORA_TARGETS and tuple(base_config().model.lora_targets) == LORA_TARGETS
    assert base_config().model.lora_rank == 0  # off by default
