"""Batch building (hiper_jax.train.batch): the estimator on the mesh equals the unsharded one,
GiGPO's anchor states come from the observations the prompts showed, and the values of the
token rows land on their turns."""

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
