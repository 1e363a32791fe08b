"""Batch building (hiper_jax.train.batch): the estimator on the mesh equals the unsharded one,
GiGPO's anchor states come from the observations the prompts showed, and the values of the
token rows land on their turns."""

import dataclasses

import numpy as np
import pytest

@pytest.mark.parametrize("estimator", ["hae", "turn_gae", "grpo", "gigpo", "hae_flat_subgoal"])
def test_estimator_on_the_mesh_matches_unsharded(estimator):
    """The trainer splits trajectories over the mesh's 8 batch shards for hae/turn_gae (global
    normalisation statistics); grpo and gigpo need whole groups and run unsharded: all equal."""
    from hiper_jax import distributed
    from hiper_jax.advantages import get_estimator
    from hiper_jax.train.batch import run_estimator
    from tests.distributed_worker import HAE_CONFIG, turn_batch

    batch = turn_batch(seed=3)
    batch = batch._replace(group_ids=np.arange(16) // 4,
                           state_ids=np.random.default_rng(3).integers(0, 3, batch.mask.shape))
    spec = get_estimator(estimator)
    want = spec.fn(batch, HAE_CONFIG)
    got = run_estimator(spec, batch, HAE_CONFIG, distributed.make_mesh(data=2, fsdp=4))
    for field in want._fields:
        assert isinstance(getattr(got, field), np.ndarray)
        np.testing.assert_allclose(getattr(got, field), np.asarray(getattr(want, field)), rtol=1e-5, atol=1e-5,
                                   err_msg=field)


def test_gigpo_anchor_states_are_the_observations_each_prompt_showed():
    """The trainer's anchor states: equal observations within a group share an id, a turn
    without a recorded view counts as the empty observation."""
    from hiper_jax.advantages import anchor_state_ids
    from hiper_jax.agent.prompts import AgentView
    from hiper_jax.rollout.types import Trajectory, TurnRecord
    from hiper_jax.train.batch import turn_observations

    def turn(observation):
        view = None if observation is None else AgentView(task="t", step=0, observation=observation,
                                                          admissible_actions=())
        return TurnRecord(prompt_ids=np.zeros(1, np.int32), response_ids=np.zeros(1, np.int32),
                          response_logp=np.zeros(1, np.float32), spans=None, switch=False,
                          keep_changed=False, subgoal="g", action="a", reward=0.0, done=False,
                          truncated=False, invalid=False, format_valid=True, view=view)

    trajectories = [Trajectory([turn("room"), turn("fridge open")], group_id=0),
                    Trajectory([turn("room"), turn(None), turn("fridge open")], group_id=0),
                    Trajectory([turn("room")], group_id=1)]
    observations = turn_observations(trajectories)
    assert observations == [["room", "fridge open"], ["room", "", "fridge open"], ["room"]]
    ids = anchor_state_ids(observations, [t.group_id for t in trajectories], 3)
    assert ids[0, 0] == ids[1, 0] and ids[0, 1] == ids[1, 2] != ids[1, 1]
    assert ids[2, 0] not in (ids[0, 0], ids[0, 1], ids[1, 1]) and ids[0, 2] == -1


def test_row_values_land_on_their_turns_and_targets_come_back_per_row():
    """[N, 3] per-row values go to their (trajectory, turn) cell of the [B, T] grid (padding rows
    and cells stay 0), and assemble reads each row's returns and boundary back from the grid."""
    from hiper_jax.hae import HAEOutput
    from hiper_jax.rollout.packing import TokenArrays, TurnArrays
    from hiper_jax.train.batch import Passes, assemble, turn_batch

    b, t, n, length = 2, 3, 4, 5
    turns = TurnArrays(rewards=np.zeros((b, t), np.float32), switch=np.zeros((b, t), bool),
                       dones=np.zeros((b, t), bool), mask=np.array([[1, 1, 0], [1, 0, 0]], bool),
                       invalid=np.zeros((b, t), bool), keep_changed=np.zeros((b, t), bool),
                       group_ids=np.arange(b), won=np.zeros(b, bool))
    flags = np.zeros((n, length), bool)
    response = flags.copy()
    response[:3, 2:] = True
    tokens = TokenArrays(tokens=np.ones((n, length), np.int32), valid=response | True, response_mask=response,
                         action_mask=response, subgoal_mask=flags, switch_mask=flags,
                         old_logp=np.zeros((n, length), np.float32),
                         traj_index=np.array([0, 0, 1, 0], np.int32), turn_index=np.array([0, 1, 0, 0], np.int32),
                         row_valid=np.array([True, True, True, False]), v_low_read=np.full(n, 1, np.int32),
                         v_high_read=np.full(n, 2, np.int32), v_term_read=np.full(n, 3, np.int32))
    values = np.arange(12, dtype=np.float32).reshape(n, 3) + 1
    inputs = turn_batch(turns, tokens, values)
    np.testing.assert_array_equal(inputs.values_low, [[1, 4, 0], [7, 0, 0]])
    np.testing.assert_array_equal(inputs.values_high, [[2, 5, 0], [8, 0, 0]])
    np.testing.assert_array_equal(inputs.values_term, [[3, 6, 0], [9, 0, 0]])

    grid = np.arange(b * t, dtype=np.float32).reshape(b, t)
    zeros = np.zeros((b, t), np.float32)
    out = HAEOutput(adv_low=zeros, ret_low=grid, adv_high=zeros, ret_high=grid + 10, adv_term=zeros,
                    ret_term=grid + 20, boundary=np.array([[True, False, False], [True, False, False]]))
    passes = Passes(np.zeros((n, length), np.float32), np.zeros((n, length), np.float32), values)
    batch, stats = assemble(tokens, passes, out, np.zeros((n, length), np.float32), ("low", "high"))
    np.testing.assert_array_equal(batch.value_targets[:3], [[0, 10, 20], [1, 11, 21], [3, 13, 23]])
    np.testing.assert_array_equal(batch.value_mask[:, 0], [True, True, True, False])
    np.testing.assert_array_equal(batch.value_mask[:, 1], [True, False, True, False])  # segment starts
    assert not batch.value_mask[:, 2].any()  # no term head
    np.testing.assert_array_equal(batch.value_read, [[1, 2, 3]] * n)
    assert stats["batch_rows"] == 3 and stats["value_mean"] == pytest.approx((1 + 4 + 7) / 3)


def test_passes_split_rows_over_the_mesh_and_apply_hints(monkeypatch):
    """The log-prob pass of a chunk runs with the chunk's rows split over the mesh's batch axes
    (8 devices, one process) and its activations placed as the rules say; the log-probs equal
    those of the same pass without a mesh."""
    import jax

    from hiper_jax import distributed
    from hiper_jax.models import qwen2
    from hiper_jax.train.batch import chunked
    from hiper_jax.train.ppo import logprob_pass
    from tests.sharding_probes import activation_shardings, rules_sharding
    from tests.train.test_ppo import CONFIG

    mesh = distributed.make_mesh(data=8)
    params = qwen2.init_params(jax.random.key(0), CONFIG)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CONFIG.vocab_size, (20, 23)).astype(np.int32)  # 20 rows: 3 chunks of 8
    valid = np.arange(23)[None, :] < rng.integers(3, 24, (20, 1))
    want = chunked(lambda t, v: (logprob_pass(params, CONFIG, t, v),), (tokens, valid), (), rows=8)[0]
    placed_params = jax.device_put(params, qwen2.param_shardings(CONFIG, mesh))
    inputs = []

    def logp(t, v):
        inputs.append(t)
        return (logprob_pass(placed_params, CONFIG, t, v),)

    with activation_shardings(monkeypatch) as hints:
        got = chunked(logp, (tokens, valid), (), rows=8, mesh=mesh)[0]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert len(inputs) == 3
    for t in inputs:
        assert t.sharding.is_equivalent_to(distributed.batch_sharding(mesh), 2)
        assert {s.data.shape[0] for s in t.addressable_shards} == {1}
    assert ("batch", "length", "embed") in {axes for axes, _, _ in hints}
    for axes, shape, placed in hints:
        assert placed.is_equivalent_to(rules_sharding(mesh, axes, shape), len(shape)), (axes, placed)


@pytest.mark.parametrize("uses_critic", [False, True])
def test_sampler_old_logprobs_skip_the_actor_pass_unless_values_are_needed(monkeypatch, uses_critic):
    """With ``old_logp="sampler"`` the old log-probs are the sampler's; the actor's pass runs
    only for the critic's values, which equal those of the recomputing path."""
    from types import SimpleNamespace

    import jax

    from hiper_jax.models import qwen2
    from hiper_jax.models.value_heads import CriticConfig, init_critic
    from hiper_jax.rollout.packing import TokenArrays
    from hiper_jax.train import batch as batch_lib
    from tests.train.test_ppo import CONFIG

    actor = qwen2.init_params(jax.random.key(0), CONFIG)
    state = SimpleNamespace(actor=actor, critic=init_critic(jax.random.key(1), CONFIG, actor,
                                                            CriticConfig(shared_backbone=True)))
    rng = np.random.default_rng(0)
    n, length = 4, 12
    valid = np.ones((n, length), bool)
    response = valid & (np.arange(length)[None] >= 6)
    tokens = TokenArrays(tokens=rng.integers(3, CONFIG.vocab_size, (n, length)).astype(np.int32), valid=valid,
                         response_mask=response, action_mask=response, subgoal_mask=~valid, switch_mask=~valid,
                         old_logp=np.where(response, -rng.random((n, length)), 0).astype(np.float32),
                         traj_index=np.arange(n, dtype=np.int32), turn_index=np.zeros(n, np.int32),
                         row_valid=np.ones(n, bool), v_low_read=np.full(n, 5, np.int32),
                         v_high_read=np.full(n, 5, np.int32), v_term_read=np.full(n, 6, np.int32))
    passes_run = []
    real_chunked = batch_lib.chunked
    monkeypatch.setattr(batch_lib, "chunked", lambda *a, **k: passes_run.append(1) or real_chunked(*a, **k))
    settings = batch_lib.BatchSettings(estimator="gigpo", max_turns=1, rows=4, length_multiple=0,
                                       reference_pass=False)
    recomputed = batch_lib.model_passes(tokens, state, None, CONFIG, settings, uses_critic)
    passes_run.clear()
    sampler = batch_lib.model_passes(tokens, state, None, CONFIG,
                                     dataclasses.replace(settings, old_logp="sampler"), uses_critic)
    assert len(passes_run) == int(uses_critic)
    np.testing.assert_array_equal(sampler.old_logp, tokens.old_logp)
    assert np.abs(recomputed.old_logp - tokens.old_logp)[response].min() > 0  # really the sampler's
    np.testing.assert_allclose(sampler.values, recomputed.values, atol=1e-6)
    assert np.any(sampler.values != 0) == uses_critic
