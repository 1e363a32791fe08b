"""Env adapters: the registered envs name their gymnasium ids and reset options, and an env
registered from outside the package goes through config validation, data preparation and the
collector with its own info keys (the trainer run on it is in tests/train/test_toy_env.py)."""

import pytest

from hiper_jax.agent.prompts import ENV_INTROS, PromptConfig
from hiper_jax.rollout import adapters
from hiper_jax.rollout.adapters import EnvAdapter, EnvSettings, get_adapter, register_adapter
from hiper_jax.train import config as config_lib

TOY = EnvAdapter("toy_door", "tests.train.toy_env:hiper_test/Toy-v0", "puzzle", "You are an agent at a toy door.",
                 adapters.same_for_both_splits(lambda kwargs: kwargs["num_puzzles"]),
                 admissible_key="choices", task_type_key="kind", reward_key="win_reward",
                 max_steps_key="limit")


def test_the_packaged_envs_are_registered_with_their_ids_and_reset_options():
    expected = {"alfworld": ("hiper_envs:hiper/ALFWorld-v0", "game"),
                "webshop": ("hiper_envs:hiper/WebShop-v0", "goal_index"),
                "choose_word": ("hiper_envs:hiper/ChooseWord-v0", "task"),
                "medvista": ("hiper_envs:hiper/MedVista-v0", "index")}
    for name, (env_id, option) in expected.items():
        adapter = get_adapter(name)
        assert (adapter.env_id, adapter.task_option) == (env_id, option)
        assert adapter.intro == ENV_INTROS.get(name, adapter.intro) and adapter.intro


def test_an_unknown_env_name_fails_naming_the_registered_ones():
    with pytest.raises(ValueError, match="choose_word"):
        get_adapter("no_such_env")
    config = config_lib.base_config()
    config.env.name = "no_such_env"
    config.model.checkpoint = "x"
    with pytest.raises(config_lib.ConfigError, match="env.name"):
        config_lib.validate(config, check_paths=False)


def test_a_name_cannot_be_taken_twice_by_another_adapter():
    register_adapter(TOY)
    register_adapter(TOY)  # the same adapter again is fine
    with pytest.raises(ValueError, match="registered already"):
        register_adapter(EnvAdapter("toy_door", "x:y-v0", "i", "intro", TOY.prepare))


def test_choose_word_data_is_one_task_set_with_the_success_reward():
    data = get_adapter("choose_word").prepare_data(EnvSettings({"num_tasks": 5}, success_reward=3.0), "/unused")
    assert data.num_train_tasks == data.num_eval_tasks == 5
    assert data.train == data.eval
    assert data.train.kwargs == {"num_tasks": 5, "success_reward": 3.0}
    assert set(data.as_dict()) == {"train", "eval", "num_train_tasks", "num_eval_tasks"}


def test_an_outside_env_is_validated_prepared_and_collected_with_its_own_keys(tiny_tokenizer):
    import jax

    from hiper_jax.agent.parsing import format_response
    from hiper_jax.agent.spans import TokenBytes
    from hiper_jax.rollout.collector import Collector
    from hiper_jax.rollout.policies import ScriptedPolicy

    register_adapter(TOY)
    config = config_lib.base_config()
    config.env.name = "toy_door"
    config.env.env_kwargs = {"num_puzzles": 3}
    config.model.checkpoint = "x"
    config_lib.validate(config, check_paths=False)
    data = TOY.prepare_data(config_lib.env_settings(config), "/unused")
    assert data.num_train_tasks == 3
    assert data.train.kwargs == {"num_puzzles": 3, "win_reward": config.env.success_reward}
    prompt_cfg = PromptConfig(env="toy_door", intro=TOY.intro, max_steps=2, max_prompt_tokens=512)
    token_bytes = TokenBytes(tiny_tokenizer)
    policy = ScriptedPolicy(lambda view: format_response(view.step == 0, "open the door",
                                                         "say beta" if view.step == 0 else "say alpha"),
                            tiny_tokenizer)
    with Collector(data.train, 2, prompt_cfg, tiny_tokenizer, token_bytes, max_turns=3, groups=1,
                   envs_per_worker=2) as collector:
        trajectories, _ = collector.run(policy, [0, 2], jax.random.key(0))
    # limit=3 reached the env as its step limit, win_reward as its reward.
    assert [(t.won, t.num_turns) for t in trajectories] == [(True, 2), (True, 2)]
    assert [t.turns[-1].reward for t in trajectories] == [config.env.success_reward] * 2
    assert [t.game for t in trajectories] == ["0", "2"]  # the reset option picked the puzzle
    assert all(t.task_type == "toy" for t in trajectories)
    assert list(trajectories[0].turns[0].view.admissible_actions) == ["say alpha", "say beta"]
