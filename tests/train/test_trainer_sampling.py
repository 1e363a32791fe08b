"""The trainer's sampling copy with ``sampling.host_mesh`` (8 simulated CPU devices): it lives on
a mesh over this host's devices, laid out by the model's rules, is freed before the update, and
greedy rollouts on it play the episodes of the default placement."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hiper_jax.models import qwen2
from tests.word_task import word_config


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory, tiny_tokenizer):
    """A random 1-layer model (4 heads, 2 KV heads) with the tiny tokenizer: no training."""
    from hiper_jax.experiments.tiny import tiny_model_config

    out = tmp_path_factory.mktemp("random_ckpt")
    config = tiny_model_config(len(tiny_tokenizer), hidden_size=32, num_layers=1, intermediate_size=64)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda shape: (0.2 * rng.standard_normal(shape)).astype(np.float32),
                          qwen2.param_shapes(config), is_leaf=lambda x: isinstance(x, tuple))
    qwen2.save_hf_checkpoint(jax.device_put(params), config, str(out), progress=False)
    tiny_tokenizer.save_pretrained(str(out))
    return str(out)


def make_trainer(checkpoint, out_dir, host_mesh: bool, constraint: str = "none", **mesh):
    from hiper_jax.train.trainer import Trainer

    config = word_config(checkpoint, str(out_dir), iterations=1)
    config.env.num_envs = 8
    config.env.env_kwargs = {"num_tasks": 8}
    config.sampling.max_new_tokens = 8 if constraint == "none" else 32  # a whole constrained answer
    config.ppo.mini_batch_rows = config.ppo.micro_batch_rows = 8
    config.mesh.update(data=1, fsdp=-1)  # training weights split over fsdp = 8
    config.sampling.host_mesh = host_mesh
    config.sampling.constraint = constraint
    config.sampling.mesh.update(mesh)
    return Trainer(config, progress=False)


@pytest.mark.slow  # ~6 s: the trainer's set-up
def test_the_sampling_copy_lives_on_the_host_mesh(random_checkpoint, tmp_path):
    trainer = make_trainer(random_checkpoint, tmp_path, host_mesh=True)
    mesh = trainer.sampling_mesh
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}  # tensor=0: the 2 KV heads
    assert {d.id for d in mesh.devices.flat} == {d.id for d in jax.local_devices()}
    policy = trainer._policy(1.0)
    assert policy.mesh is mesh
    params = policy.params
    want = qwen2.param_shardings(trainer.model_config, mesh, stacked=False)
    for leaf, sharding in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
        assert leaf.sharding.mesh == mesh and leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
    up = params["layers"][0]["mlp"]["up_proj"]["kernel"]
    assert {s.data.shape for s in up.addressable_shards} == {(32, 32)}  # MLP width 64 over tensor 2
    np.testing.assert_array_equal(np.asarray(up),
                                  np.asarray(trainer.state.actor["layers"]["mlp"]["up_proj"]["kernel"][0]))
    # A second policy drops the first one's copy: one sampling copy at a time.
    other = trainer._policy(0.5)
    assert policy.params is None and other.params is not None
    trainer.release_sampling_copies()
    assert other.params is None


@pytest.mark.slow
@pytest.mark.parametrize("constraint", ["none", "grammar"])
def test_greedy_rollouts_on_the_host_mesh_match_the_default_and_train(random_checkpoint, tmp_path,
                                                                      constraint):
    key = jax.random.key(3)
    played = {}
    for name, host_mesh, mesh in (("default", False, {}), ("tensor", True, {}),
                                  ("tensor8", True, dict(data=1, tensor=-1))):
        trainer = make_trainer(random_checkpoint, tmp_path / name, host_mesh, constraint, **mesh)
        assert (trainer.sampling_mesh is None) == (not host_mesh)
        trajectories = trainer.collect(8, key, temperature=0.0)
        played[name] = [[t.response_ids.tolist() for t in traj.turns] for traj in trajectories]
        if name == "tensor":
            with trainer._collector("train") as collector:
                record = trainer.train_iteration(0, collector)
            assert record["train/episodes"] == 8 and np.isfinite(record["update/loss"])
            assert all(p.params is None for p in trainer._policies.values())  # freed for the update
    assert played["tensor"] == played["default"]
    assert played["tensor8"] == played["default"]
    assert sum(len(turns) for turns in played["default"]) >= 8
