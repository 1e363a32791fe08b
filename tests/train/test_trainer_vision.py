"""The trainer with the shipped tiny Qwen2.5-VL on MedVista (configs/medvista_tiny.py): one
iteration of Plan-Execute PPO with HAE on rollouts with images, held-out evaluation, a
checkpoint that restores, the tower frozen; and what a vision policy does not support yet is
refused naming the field."""

import jax
import numpy as np
import pytest

from hiper_jax import configs


def small_config(out_dir):
    config = configs.get("medvista_tiny")
    config.env.num_envs = 4
    config.env.envs_per_worker = 4
    config.train.iterations = 1
    config.train.eval_every = 1
    config.train.eval_episodes = 4
    config.train.checkpoint_every = 1
    config.train.tensorboard = False
    config.train.out_dir = str(out_dir)
    return config


def test_vision_policy_trains_evaluates_and_checkpoints(tmp_path):
    from hiper_jax.models import qwen2_5_vl
    from hiper_jax.train.trainer import Trainer

    config = small_config(tmp_path)
    trainer = Trainer(config, progress=False)
    assert trainer.is_vision
    _, start = qwen2_5_vl.load_hf_checkpoint(config.model.checkpoint, progress=False)
    history = trainer.run()
    train = [r for r in history if "train/success" in r]
    evals = [r for r in history if "eval/success" in r]
    assert len(train) == 1 and len(evals) == 2  # before the iteration and after the run
    record = train[0]
    assert 0 <= record["batch/logp_mismatch_max"] < 1e-3, record  # the update scores what was sampled
    assert record["train/invalid_rate"] == 0 and record["train/format_error_rate"] == 0
    assert record["batch/batch_images"] >= config.env.num_envs  # every turn sees the full image at least
    assert record["throughput/update_tokens_per_s"] > 0
    assert all(0 <= r["eval/success"] <= 1 for r in evals)
    changed = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                           trainer.state.actor, start)
    assert max(jax.tree.leaves(changed["visual"])) == 0.0  # model.train_vision=False
    assert max(jax.tree.leaves(changed["language_model"])) > 0
    trained = trainer.state.actor
    trainer.state = trainer.state._replace(actor=start)
    trainer.config.unlock()
    trainer.config.train.resume = True
    assert trainer.restore() == 1
    jax.tree.map(np.testing.assert_array_equal, trainer.state.actor, trained)


@pytest.mark.parametrize("field, value", [("model.lora_rank", 4), ("model.critic", "separate"),
                                          ("model.train_vision", True), ("ppo.pack_rows", True)])
def test_unsupported_vision_settings_are_refused_naming_the_field(tmp_path, field, value):
    from hiper_jax.train.trainer import Trainer

    config = small_config(tmp_path)
    section, name = field.split(".")
    setattr(config[section], name, value)
    with pytest.raises(ValueError, match=f"config field {field}: .*Qwen2.5-VL"):
        Trainer(config, progress=False)
