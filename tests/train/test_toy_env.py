"""An env registered from outside the package (tests/train/toy_env.py, its adapter here)
trains through the trainer with no change to hiper_jax."""

import pytest

from hiper_jax.rollout import adapters
from tests.word_task import word_config

TOY = adapters.register_adapter(adapters.EnvAdapter(
    "toy", "tests.train.toy_env:hiper_test/Toy-v0", "puzzle", "You are an agent in a text game.",
    adapters.same_for_both_splits(lambda kwargs: kwargs.get("num_puzzles", 4)),
    admissible_key="choices", task_type_key="kind", reward_key="win_reward", max_steps_key="limit"))


# Slow: two whole training iterations (their XLA compilation alone takes most of a minute).
@pytest.mark.slow
def test_an_env_registered_from_outside_trains_through_the_trainer(word_checkpoint, tmp_path, monkeypatch):
    from hiper_jax.train import trainer as trainer_lib

    config = word_config(word_checkpoint, tmp_path / "run", iterations=2)
    config.env.name = "toy"
    config.env.num_envs = 8
    config.env.envs_per_worker = 4
    config.env.env_kwargs = {"num_puzzles": 4}
    config.train.eval_episodes = 4
    monkeypatch.setattr(trainer_lib, "plot_run", lambda *args, **kwargs: None)
    trainer = trainer_lib.Trainer(config, progress=False)
    assert trainer.data["num_train_tasks"] == 4 and trainer.data["train"].task_option == "puzzle"
    history = trainer.run()
    iterations = [r for r in history if "train/success" in r]
    assert [r["iteration"] for r in iterations] == [0, 1]
    assert all(r["train/episodes"] == 8 and r["env_turns"] >= 8 for r in iterations)
    assert history[-1]["final"] == 1.0 and "eval/success" in history[-1]
    # win_reward reached the env: a won episode returns the config's success reward, others 0.
    assert all(r["train/mean_return"] == pytest.approx(r["train/success"] * config.env.success_reward)
               for r in iterations)
    assert any(r["train/success"] > 0 for r in iterations)
