"""The PPO step on device meshes: same loss and parameters as on one device, parameters
really sharded (8 simulated CPU devices, see tests/conftest.py)."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from hiper_jax import distributed
from hiper_jax.models import qwen2
from hiper_jax.models.value_heads import CriticConfig, critic_param_shardings, init_critic
from hiper_jax.train.ppo import PPOConfig, init_train_state, ppo_step
from tests.train.test_ppo import CONFIG, SGD, make_batch

PPO = PPOConfig(micro_batch_rows=8, mini_batch_rows=16)
MESHES = [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2)]


@pytest.fixture(scope="module")
def reference_inputs():
    actor = qwen2.init_params(jax.random.key(0), CONFIG)
    critic = init_critic(jax.random.key(1), CONFIG, actor, CriticConfig())
    batch = make_batch(actor, critic, num_rows=16, length=16, seed=3)
    to_host = lambda tree: jax.tree.map(np.asarray, tree)
    return to_host(actor), to_host(critic), to_host(batch)


def run_on_mesh(shape, actor, critic, batch):
    devices = jax.devices()[: int(np.prod(shape))]
    mesh = distributed.make_mesh(*shape, devices=devices)
    actor = jax.device_put(actor, qwen2.param_shardings(CONFIG, mesh))
    critic = jax.device_put(critic, critic_param_shardings(CONFIG, CriticConfig(), mesh))
    batch = jax.device_put(batch, distributed.batch_sharding(mesh))
    # Plain SGD: Adam's first step is lr * sign(g), which turns rounding noise in near-zero
    # gradients into lr-sized differences.
    state = init_train_state(actor, critic, SGD, SGD)
    with jax.set_mesh(mesh):
        state, metrics = ppo_step(state, batch, config=CONFIG, ppo=PPO, actor_tx=SGD, critic_tx=SGD)
    return mesh, state, {k: float(v) for k, v in metrics.items()}


def test_update_is_the_same_on_every_mesh(reference_inputs):
    actor, critic, batch = reference_inputs
    results = {shape: run_on_mesh(shape, actor, critic, batch) for shape in MESHES}
    _, reference, reference_metrics = results[(1, 1, 1)]
    for shape, (mesh, state, metrics) in results.items():
        assert metrics["loss"] == pytest.approx(reference_metrics["loss"], rel=1e-4, abs=1e-6), shape
        diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                             (state.actor, state.critic), (reference.actor, reference.critic))
        assert max(jax.tree.leaves(diffs)) < 1e-5, shape
        embedding = state.actor["embed_tokens"]["embedding"]
        mlp = state.actor["layers"]["mlp"]["up_proj"]["kernel"]
        assert isinstance(mlp.sharding, NamedSharding)
        spec = tuple(mlp.sharding.spec) + (None,) * (mlp.ndim - len(mlp.sharding.spec))
        if mesh.shape["fsdp"] > 1:
            assert "fsdp" in spec, (shape, spec)
        if mesh.shape["tensor"] > 1:
            assert "tensor" in spec, (shape, spec)
            assert embedding.sharding.spec != P(), shape
        if mesh.size > 1 and mesh.shape["data"] == mesh.size:
            assert mlp.sharding.is_fully_replicated


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2)])
def test_update_splits_rows_over_the_batch_axes_and_applies_hints(reference_inputs, monkeypatch, shape):
    """ppo_update on a mesh: the step receives its mini-batch with rows split over data x fsdp,
    and the model's activations inside the step carry the shardings the rules give."""
    from hiper_jax.train import ppo as ppo_lib
    from tests.sharding_probes import activation_shardings, rules_sharding

    actor, critic, _ = reference_inputs
    # A width no other test uses, so the step traces (and its hints are recorded) here.
    batch = jax.tree.map(np.asarray, make_batch(actor, critic, num_rows=16, length=19, seed=4))
    mesh = distributed.make_mesh(*shape)
    actor = jax.device_put(actor, qwen2.param_shardings(CONFIG, mesh))
    critic = jax.device_put(critic, critic_param_shardings(CONFIG, CriticConfig(), mesh))
    state = init_train_state(actor, critic, SGD, SGD)
    received = []
    real_step = ppo_lib.ppo_step

    def recording_step(state, mini, *args, **kwargs):
        received.append(mini)
        return real_step(state, mini, *args, **kwargs)

    monkeypatch.setattr(ppo_lib, "ppo_step", recording_step)
    with activation_shardings(monkeypatch) as hints:
        ppo_lib.ppo_update(state, batch, np.random.default_rng(0), config=CONFIG, ppo=PPO,
                           actor_tx=SGD, critic_tx=SGD, mesh=mesh)
    assert len(received) == 1
    shards = distributed.num_batch_shards(mesh)
    for name in ("tokens", "advantages", "value_targets"):
        x = getattr(received[0], name)
        assert x.sharding.is_equivalent_to(distributed.batch_sharding(mesh), x.ndim), (name, x.sharding)
        assert {s.data.shape[0] for s in x.addressable_shards} == {16 // shards}
    assert {axes for axes, _, _ in hints} >= {("batch", "length", "embed"), ("batch", "length", "mlp")}
    for axes, hint_shape, placed in hints:
        assert placed.is_equivalent_to(rules_sharding(mesh, axes, hint_shape), len(hint_shape)), (axes, placed)
    if mesh.shape["tensor"] > 1:  # the MLP activation is split over tensor, not replicated
        mlp = [placed for axes, _, placed in hints if axes[-1] == "mlp"]
        assert all(not p.is_fully_replicated for p in mlp)
