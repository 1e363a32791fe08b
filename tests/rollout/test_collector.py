"""The collector: scripted expert replays reach the expert's success on ALFWorld and WebShop,
and a tiny random LLM runs end to end."""

import os

import jax
import numpy as np
import pytest

from hiper_jax.agent.parsing import format_response
from hiper_jax.agent.prompts import PromptConfig
from hiper_jax.agent.spans import TokenBytes
from hiper_jax.hae import HAEConfig, compute_hae
from hiper_jax.rollout.collector import Collector, EnvSpec, _busy_time
from hiper_jax.rollout.packing import pack_tokens, pack_turns
from hiper_jax.rollout.policies import LLMPolicy, ScriptedPolicy


def replay_policy(demos, tokenizer):
    """Answers each turn with the demonstration's response, keyed by the episode's first
    observation and the step."""
    script = {}
    for demo in demos:
        first = demo["turns"][0]["observation"]
        for t, turn in enumerate(demo["turns"]):
            script[(first, t)] = format_response(turn["switch"] == "SWITCH", turn["subgoal"], turn["action"])

    def respond(view):
        first = view.history[0][0] if view.history else view.observation
        return script.get((first, view.step), "I do not know")

    return ScriptedPolicy(respond, tokenizer)


def check_against_demos(trajectories, demos, tokenizer):
    assert [t.won for t in trajectories] == [d["won"] for d in demos]
    for traj, demo in zip(trajectories, demos):
        assert traj.num_turns == demo["num_turns"]
        assert [turn.action for turn in traj.turns] == [t["action"] for t in demo["turns"]]
        assert [turn.view.observation for turn in traj.turns] == [t["observation"] for t in demo["turns"]]
        assert [turn.switch for turn in traj.turns] == [t["switch"] == "SWITCH" for t in demo["turns"]]
        assert all(turn.format_valid and not turn.invalid for turn in traj.turns)
        assert traj.turns[-1].done and not any(turn.done for turn in traj.turns[:-1])
        for turn in traj.turns:
            prompt_text = tokenizer.decode(turn.prompt_ids)
            assert traj.task in prompt_text and prompt_text.endswith("<|im_start|>assistant\n")
            assert turn.spans.action.any() and turn.spans.switch.any()
    turns = pack_turns(trajectories, max_turns=max(t.num_turns for t in trajectories))
    tokens = pack_tokens(trajectories, pad_id=tokenizer.pad_token_id, row_multiple=4)
    values = np.zeros(turns.mask.shape, np.float32)
    out = compute_hae(turns.rewards, values, values, values, turns.switch, turns.dones, turns.mask,
                      HAEConfig(gamma=1.0, lam_turn=1.0, lam_seg=1.0), invalid=turns.invalid)
    won = np.asarray(turns.won)
    # gamma = lambda = 1 and zero values: each segment start's high advantage is the return to go.
    assert np.allclose(np.asarray(out.adv_high)[won, 0], 10.0)
    assert tokens.row_valid.sum() == turns.mask.sum()


def test_alfworld_expert_replay(games_root, qwen_tokenizer, tmp_path):
    from hiper_envs.alfworld.demos import iter_demos
    from hiper_envs.alfworld.games import find_games

    games = find_games(str(games_root / "eval"))
    demos = list(iter_demos(games))
    spec = EnvSpec("hiper_envs:hiper/ALFWorld-v0", {"games": str(games_root / "eval")}, "game")
    prompt_cfg = PromptConfig(env="alfworld", max_steps=30, max_prompt_tokens=4096)
    with Collector(spec, len(games), prompt_cfg, qwen_tokenizer, TokenBytes(qwen_tokenizer),
                   max_turns=30, groups=2, envs_per_worker=3) as collector:
        trajectories, stats = collector.run(replay_policy(demos, qwen_tokenizer),
                                            list(range(len(games))), jax.random.key(0))
    assert all(d["won"] for d in demos)
    assert sorted(t.task_type for t in trajectories) == sorted(d["task_type"] for d in demos)
    check_against_demos(trajectories, demos, qwen_tokenizer)
    assert stats.turns == sum(d["num_turns"] for d in demos) and stats.wall_s > 0


def test_webshop_oracle_replay(tiny_tokenizer, tmp_path):
    import json

    from hiper_envs.webshop.demos import write_demonstrations
    from hiper_envs.webshop.env import WebShopEnv

    kwargs = {"num_products": 300, "split": "eval"}
    path = tmp_path / "demos.jsonl"
    write_demonstrations(WebShopEnv(**kwargs), str(path), episodes=6, progress=False)
    demos = [json.loads(line) for line in path.read_text().splitlines()]
    spec = EnvSpec("hiper_envs:hiper/WebShop-v0", kwargs, "goal_index")
    prompt_cfg = PromptConfig(env="webshop", max_steps=15, max_prompt_tokens=100_000)
    with Collector(spec, 6, prompt_cfg, tiny_tokenizer, TokenBytes(tiny_tokenizer),
                   max_turns=15, groups=1, envs_per_worker=6) as collector:
        trajectories, _ = collector.run(replay_policy(demos, tiny_tokenizer), list(range(6)),
                                        jax.random.key(0), group_ids=[0, 0, 1, 1, 2, 2])
    assert all(d["won"] for d in demos)
    check_against_demos(trajectories, demos, tiny_tokenizer)
    assert [t.group_id for t in trajectories] == [0, 0, 1, 1, 2, 2]


def test_tiny_random_llm_rollout(tiny_tokenizer):
    from hiper_jax.models import qwen2
    from hiper_jax.sampling import SamplingConfig

    config = qwen2.Qwen2Config(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=4096, tie_word_embeddings=True)
    params = qwen2.init_params(jax.random.key(0), config)
    sampling = SamplingConfig(max_new_tokens=12, temperature=1.0,
                              stop_token_ids=(tiny_tokenizer.eos_token_id,),
                              pad_token_id=tiny_tokenizer.pad_token_id)
    policy = LLMPolicy(params, config, sampling, tiny_tokenizer.pad_token_id, length_multiple=1024, rows=4)
    spec = EnvSpec("hiper_envs:hiper/WebShop-v0", {"num_products": 300}, "goal_index")
    prompt_cfg = PromptConfig(env="webshop", max_steps=3, max_prompt_tokens=1024)  # one shape
    with Collector(spec, 8, prompt_cfg, tiny_tokenizer, TokenBytes(tiny_tokenizer), max_turns=3,
                   groups=2, envs_per_worker=4) as collector:
        trajectories, stats = collector.run(policy, list(range(8)), jax.random.key(1))
    assert len(trajectories) == 8 and all(t.num_turns == 3 for t in trajectories)
    assert all(t.turns[-1].truncated for t in trajectories if not t.turns[-1].done)
    for traj in trajectories:
        for turn in traj.turns:
            assert 1 <= len(turn.response_ids) <= 12 and len(turn.response_logp) == len(turn.response_ids)
            assert np.all(turn.response_logp <= 0)
    assert 0 < stats.device_busy_fraction <= 1
    tokens = pack_tokens(trajectories, pad_id=tiny_tokenizer.pad_token_id, row_multiple=8)
    assert tokens.row_valid.sum() == 24


def test_busy_time_is_the_union_of_intervals():
    assert _busy_time([(0, 2), (1, 3), (5, 6)]) == pytest.approx(4)
    assert _busy_time([]) == 0


# --- env worker faults ------------------------------------------------------------------------

FAULT_ENVS = 4


@pytest.fixture(scope="module")
def faulty(tiny_tokenizer, tmp_path_factory):
    """A collector over FaultyChooseWord (one env per worker) and its fault-plan folder; the
    scripted policy says beta, then alpha, so every fault-free episode wins in 2 turns."""
    from tests.rollout.faulty_envs import ENV_ID

    plan_dir = tmp_path_factory.mktemp("faults")
    spec = EnvSpec(f"tests.rollout.faulty_envs:{ENV_ID}", {"plan_dir": str(plan_dir), "num_tasks": 8}, "task")
    prompt_cfg = PromptConfig(env="choose_word", max_steps=3, max_prompt_tokens=1024)
    policy = ScriptedPolicy(lambda view: format_response(view.step == 0, "open the door",
                                                         "say beta" if view.step == 0 else "say alpha"),
                            tiny_tokenizer)
    collector = Collector(spec, FAULT_ENVS, prompt_cfg, tiny_tokenizer, TokenBytes(tiny_tokenizer),
                          max_turns=3, groups=2, envs_per_worker=1, step_timeout_s=5.0, max_replays=1)
    yield collector, policy, plan_dir
    collector.close()


def _play(collector, policy):
    return collector.run(policy, list(range(FAULT_ENVS)), jax.random.key(0), group_ids=[0, 0, 1, 1])


def _complete(trajectory):
    """Won in the two scripted turns, and no turn cut short."""
    return (trajectory.won and not trajectory.lost and [t.action for t in trajectory.turns] == ["say beta", "say alpha"]
            and trajectory.turns[-1].done and not any(t.truncated for t in trajectory.turns))


@pytest.mark.parametrize("kind", ["die", "hang", "raise"])
def test_an_episode_cut_by_a_worker_fault_is_replayed_not_truncated(faulty, kind):
    from tests.rollout.faulty_envs import plan_fault

    collector, policy, plan_dir = faulty
    plan_fault(plan_dir, task=1, step=2, kind=kind)
    before = collector.faults.lost_episodes
    trajectories, stats = _play(collector, policy)
    assert all(_complete(t) for t in trajectories), [(t.won, t.num_turns) for t in trajectories]
    restarts = 0 if kind == "raise" else 1  # an exception is caught in the worker
    assert (stats.faults.worker_restarts, stats.faults.lost_episodes, stats.faults.replayed_episodes,
            stats.faults.dropped_episodes) == (restarts, 1, 1, 0)
    assert stats.turns == 2 * FAULT_ENVS and collector.faults.lost_episodes == before + 1
    assert stats.faults.last_error


def test_an_episode_that_keeps_failing_is_dropped_with_no_turns(faulty):
    from hiper_jax.rollout.metrics import rollout_metrics
    from tests.rollout.faulty_envs import plan_fault

    collector, policy, plan_dir = faulty
    plan_fault(plan_dir, task=2, step=1, kind="die", always=True)
    try:
        trajectories, stats = _play(collector, policy)
    finally:
        os.remove(plan_dir / "2-1-die-always")
    assert trajectories[2].lost and trajectories[2].num_turns == 0 and not trajectories[2].won
    assert all(_complete(t) for i, t in enumerate(trajectories) if i != 2)
    assert (stats.faults.worker_restarts, stats.faults.lost_episodes, stats.faults.replayed_episodes,
            stats.faults.dropped_episodes) == (2, 2, 0, 1)  # cut twice: once, then in its replay
    metrics = rollout_metrics(trajectories)
    assert metrics["episodes"] == FAULT_ENVS - 1 and metrics["success"] == 1.0 and metrics["mean_turns"] == 2
    turns = pack_turns(trajectories, max_turns=3)
    assert not turns.mask[2].any() and turns.mask[[0, 1, 3]].sum() == 6
    tokens = pack_tokens(trajectories, pad_id=0)
    assert 2 not in set(tokens.traj_index[tokens.row_valid])


def test_too_many_lost_episodes_stop_the_rollout(faulty):
    from hiper_jax.rollout.collector import RolloutFaultError
    from tests.rollout.faulty_envs import plan_fault

    collector, policy, plan_dir = faulty
    for task in (0, 3):
        plan_fault(plan_dir, task=task, step=1, kind="raise")
    collector.max_lost_fraction = 0.25
    try:
        with pytest.raises(RolloutFaultError, match=r"2 of 4 episodes were cut .*max_lost_fraction=0.25"
                                                    r".*injected fault in task"):
            _play(collector, policy)
    finally:
        collector.max_lost_fraction = 1.0
    assert all(_complete(t) for t in _play(collector, policy)[0])  # the envs play on afterwards


def test_should_stop_abandons_the_rollout_between_env_steps(faulty):
    from hiper_jax.rollout.collector import RolloutInterrupted

    collector, policy, _ = faulty
    calls = []
    collector.should_stop = lambda: calls.append(1) or True
    try:
        with pytest.raises(RolloutInterrupted):
            _play(collector, policy)
    finally:
        collector.should_stop = None
    assert len(calls) == 1
    assert all(_complete(t) for t in _play(collector, policy)[0])


# --- continuous episodes (turn budget) --------------------------------------------------------

def test_continuous_episodes_play_the_turn_budget_and_pack(tiny_tokenizer):
    """Four envs in two pipelined groups, episodes of 2 scripted turns (beta, then alpha wins),
    13 turns: each env plays its first episode (8 turns) and starts a second; env 0's second
    gets its 2 turns (the last decode batch has 1 of 2 rows), the other three are cut after 1
    turn, truncated."""
    from hiper_jax.rollout.metrics import rollout_metrics

    spec = EnvSpec("hiper_envs:hiper/ChooseWord-v0", {"num_tasks": 8}, "task")
    prompt_cfg = PromptConfig(env="choose_word", max_steps=3, max_prompt_tokens=1024)
    policy = ScriptedPolicy(lambda view: format_response(view.step == 0, "open the door",
                                                         "say beta" if view.step == 0 else "say alpha"),
                            tiny_tokenizer)
    with Collector(spec, 4, prompt_cfg, tiny_tokenizer, TokenBytes(tiny_tokenizer), max_turns=3,
                   groups=2, envs_per_worker=2, turn_budget=13) as collector:
        trajectories, stats = collector.run(policy, [5, 6, 7], jax.random.key(0))
    assert stats.turns == 13 == sum(t.num_turns for t in trajectories)
    whole = [t for t in trajectories if t.turns[-1].done]
    cut = [t for t in trajectories if not t.turns[-1].done]
    assert len(whole) == 5 and all(t.won and t.num_turns == 2 for t in whole)
    assert len(cut) == 3 and all(t.num_turns == 1 and t.turns[-1].truncated and not t.won for t in cut)
    assert not any(turn.truncated for t in whole for turn in t.turns)
    assert [t.group_id for t in trajectories] == [0, 4, 1, 5, 2, 6, 3, 7]  # by env, then start
    # Tasks in turn from the list, wrapping around: episode n plays task [5, 6, 7][n % 3].
    by_number = {t.group_id: t for t in trajectories}
    assert [by_number[n].game for n in range(8)] == ['5', '6', '7', '5', '6', '7', '5', '6']
    assert stats.active_fraction == pytest.approx((6 * 1.0 + 0.5) / 7)
    assert rollout_metrics(trajectories)["episodes"] == 8

    turns = pack_turns(trajectories, max_turns=3)
    tokens = pack_tokens(trajectories, pad_id=tiny_tokenizer.pad_token_id, row_multiple=4)
    assert turns.mask.sum() == 13 == tokens.row_valid.sum()
    values = np.ones(turns.mask.shape, np.float32)
    out = compute_hae(turns.rewards, values, values, values, turns.switch, turns.dones, turns.mask,
                      HAEConfig(gamma=1.0, lam_turn=1.0, lam_seg=1.0, bootstrap_truncated=True))
    row = [i for i, t in enumerate(trajectories) if t is cut[0]][0]
    # The cut episode bootstraps from its value (1) instead of ending: return = reward + 1.
    assert np.asarray(out.ret_term)[row, 0] == pytest.approx(trajectories[row].turns[0].reward + 1.0)


def test_default_collector_records_the_decode_active_fraction(tiny_tokenizer):
    """One episode per env (the default): the first call of each pair of first turns wins at
    once, the other takes 2 turns, so each group's second decode batch has 1 of its 2 envs."""
    spec = EnvSpec("hiper_envs:hiper/ChooseWord-v0", {"num_tasks": 8}, "task")
    prompt_cfg = PromptConfig(env="choose_word", max_steps=3, max_prompt_tokens=1024)
    first_turns = []

    def respond(view):
        if view.step == 0:
            first_turns.append(view)
            return format_response(True, "open the door", "say alpha" if len(first_turns) % 2 else "say beta")
        return format_response(False, "open the door", "say alpha")

    with Collector(spec, 4, prompt_cfg, tiny_tokenizer, TokenBytes(tiny_tokenizer), max_turns=3,
                   groups=2, envs_per_worker=2) as collector:
        trajectories, stats = collector.run(ScriptedPolicy(respond, tiny_tokenizer), [0, 1, 2, 3],
                                            jax.random.key(0))
    assert [t.num_turns for t in trajectories] == [1, 2, 1, 2] and stats.turns == 6
    assert stats.active_fraction == pytest.approx((1 + 1 + 0.5 + 0.5) / 4)
