"""Packing trajectories into [B, T] and [N, L] arrays that feed HAE and the update directly."""

import numpy as np
import pytest

from hiper_jax.agent.spans import ResponseSpans
from hiper_jax.hae import HAEConfig, assign_token_advantages, compute_hae
from hiper_jax.rollout.packing import bucket_size, pack_tokens, pack_turns
from hiper_jax.rollout.types import TurnRecord, Trajectory


def make_turn(rng, switch, reward=0.0, done=False):
    prompt = rng.integers(5, 100, size=rng.integers(3, 9))
    length = int(rng.integers(6, 12))
    response = rng.integers(5, 100, size=length)
    marks = np.zeros((3, length), bool)
    marks[0, :2] = True       # switch block
    marks[1, 2:4] = True      # subgoal block
    marks[2, 4:length - 1] = True  # action block; last token is the stop token
    spans = ResponseSpans(switch=marks[0], subgoal=marks[1], action=marks[2],
                          v_high_pos=0, v_low_pos=4, v_term_pos=0)
    return TurnRecord(prompt_ids=prompt, response_ids=response,
                      response_logp=-rng.random(length).astype(np.float32), spans=spans,
                      switch=switch, keep_changed=False, subgoal="s", action="a", reward=reward,
                      done=done, truncated=False, invalid=not switch and reward < 0,
                      format_valid=True)


def make_trajectories(seed=0):
    rng = np.random.default_rng(seed)
    trajs = []
    for b, n in enumerate([3, 1, 5]):
        turns = [make_turn(rng, switch=(t % 2 == 0), reward=float(t == n - 1) * 10, done=(t == n - 1 and b != 2))
                 for t in range(n)]
        trajs.append(Trajectory(turns=turns, task="task", task_type="pick", won=b != 2, group_id=b // 2))
    return trajs


def test_bucket_size():
    assert [bucket_size(n) for n in (1, 2, 3, 4, 5, 6, 7, 9, 13, 100)] == [1, 2, 3, 4, 6, 6, 8, 12, 16, 128]
    assert bucket_size(100, 64) == 128 and bucket_size(129, 64) == 192 and bucket_size(0, 8) == 8
    sizes = {bucket_size(n, 8) for n in range(1, 2000)}
    assert len(sizes) <= 2 * 8 + 1  # a handful of shapes, not one per batch


def test_pack_turns():
    trajs = make_trajectories()
    turns = pack_turns(trajs, max_turns=6, num_rows=4)
    assert turns.mask.shape == (4, 6)
    np.testing.assert_array_equal(turns.mask.sum(1), [3, 1, 5, 0])
    np.testing.assert_array_equal(turns.switch[2], [1, 0, 1, 0, 1, 0])
    assert turns.rewards[0, 2] == 10 and turns.dones[0, 2] and not turns.dones[2].any()
    np.testing.assert_array_equal(turns.group_ids, [0, 0, 1, 3])
    np.testing.assert_array_equal(turns.won, [True, True, False, False])
    with pytest.raises(ValueError, match="max_turns"):
        pack_turns(trajs, max_turns=4)
    with pytest.raises(ValueError, match="num_rows"):
        pack_turns(trajs, max_turns=6, num_rows=2)


def test_pack_tokens_rows_and_masks():
    trajs = make_trajectories()
    packed = pack_tokens(trajs, pad_id=0, row_multiple=4, length_multiple=8)
    num_turns = sum(t.num_turns for t in trajs)
    assert packed.tokens.shape[0] == bucket_size(num_turns, 4) and packed.tokens.shape[1] % 8 == 0
    assert packed.row_valid.sum() == num_turns and not packed.row_valid[num_turns:].any()
    n = 3  # first row of trajectory 1
    turn = trajs[1].turns[0]
    p, r = len(turn.prompt_ids), len(turn.response_ids)
    assert (packed.traj_index[n], packed.turn_index[n]) == (1, 0)
    np.testing.assert_array_equal(packed.tokens[n, :p], turn.prompt_ids)
    np.testing.assert_array_equal(packed.tokens[n, p:p + r], turn.response_ids)
    assert (packed.tokens[n, p + r:] == 0).all() and packed.valid[n].sum() == p + r
    np.testing.assert_array_equal(np.flatnonzero(packed.response_mask[n]), np.arange(p, p + r))
    np.testing.assert_array_equal(packed.action_mask[n, p:p + r], turn.spans.action)
    np.testing.assert_allclose(packed.old_logp[n, p:p + r], turn.response_logp)
    assert packed.v_high_read[n] == p - 1 and packed.v_low_read[n] == p + 3
    assert not (packed.action_mask & packed.subgoal_mask).any()
    assert not (packed.response_mask & ~packed.valid).any()
    with pytest.raises(ValueError, match="max_length"):
        pack_tokens(trajs, pad_id=0, max_length=10)


def test_packed_arrays_feed_hae_and_token_assignment():
    trajs = make_trajectories(seed=3)
    turns = pack_turns(trajs, max_turns=8)
    tokens = pack_tokens(trajs, pad_id=0, row_multiple=8)
    rng = np.random.default_rng(0)
    values = rng.normal(size=turns.mask.shape).astype(np.float32)
    out = compute_hae(turns.rewards, values, values, values, turns.switch, turns.dones, turns.mask,
                      HAEConfig(normalize=True), invalid=turns.invalid, keep_changed=turns.keep_changed)
    token_adv = np.asarray(assign_token_advantages(out, tokens.traj_index, tokens.turn_index,
                                                   tokens.action_mask, tokens.subgoal_mask, tokens.switch_mask))
    assert token_adv.shape == tokens.tokens.shape
    for n in np.flatnonzero(tokens.row_valid):
        b, t = tokens.traj_index[n], tokens.turn_index[n]
        np.testing.assert_allclose(token_adv[n][tokens.action_mask[n]], float(out.adv_low[b, t]))
        np.testing.assert_allclose(token_adv[n][tokens.switch_mask[n]], float(out.adv_term[b, t]))
    assert (token_adv[~tokens.row_valid] == 0).all()
    assert (token_adv[~(tokens.action_mask | tokens.subgoal_mask | tokens.switch_mask)] == 0).all()
