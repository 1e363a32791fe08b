"""Scripted policies on generated eval goals, and the demonstrations file."""

import json

import gymnasium
import pytest

import hiper_envs  # noqa: F401
from hiper_envs.webshop import demos


@pytest.fixture(scope="module")
def env():
    return gymnasium.make("hiper/WebShop-v0", num_products=1000, split="eval").unwrapped


@pytest.fixture(scope="module")
def results(env):
    goals = range(len(env.goals))
    return {
        name: demos.summarize(demos.run_policy(env, policy(), goals))
        for name, policy in demos.POLICIES.items()
    }


def test_oracle_solves_every_eval_goal(results, env):
    assert results["oracle"]["episodes"] == len(env.goals) > 150
    assert results["oracle"]["success_rate"] == 1.0
    assert results["oracle"]["mean_score"] == 100.0
    assert results["oracle"]["mean_turns"] <= 8


def test_random_policy_is_near_zero(results):
    assert results["random"]["success_rate"] <= 0.02


def test_buying_the_first_search_result_is_clearly_worse(results):
    first = results["search_buy_first"]
    assert first["success_rate"] <= 0.1
    assert first["mean_score"] <= results["oracle"]["mean_score"] - 30
    # Even with the right options, the first search result is often not a product that wins.
    assert results["search_first_with_options"]["success_rate"] <= 0.8


def check_episode(record):
    assert set(record) >= {"env", "game", "task_type", "task", "won", "num_turns", "turns"}
    assert record["env"] == "webshop" and record["num_turns"] == len(record["turns"])
    turns = record["turns"]
    assert turns[0]["switch"] == "SWITCH"
    for previous, turn in zip(turns, turns[1:], strict=False):
        assert turn["switch"] == ("SWITCH" if turn["subgoal"] != previous["subgoal"] else "KEEP")
    assert [t["done"] for t in turns] == [False] * (len(turns) - 1) + [True]
    for turn in turns:
        assert set(turn) == {
            "observation",
            "admissible_actions",
            "switch",
            "subgoal",
            "action",
            "reward",
            "done",
        }
        assert turn["action"] in turn["admissible_actions"] or turn["action"].startswith("search[")


def test_demonstrations_jsonl(env, tmp_path):
    path = tmp_path / "demos.jsonl"
    stats = demos.write_demonstrations(env, str(path), episodes=30, progress=False)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 30 and stats["success_rate"] == 1.0
    for record in records:
        check_episode(record)
        assert record["won"] and record["turns"][-1]["reward"] == 10.0
        assert record["turns"][0]["action"] == f"search[{record['task']}]"
        assert record["turns"][0]["subgoal"] == demos.SUBGOAL_SEARCH
        assert record["turns"][-1]["subgoal"] == demos.SUBGOAL_BUY
        assert record["task"] in record["turns"][0]["observation"]
    subgoals = {t["subgoal"] for r in records for t in r["turns"]}
    assert demos.SUBGOAL_OPEN in subgoals and any(s.startswith("select ") for s in subgoals)


def test_demonstrations_cli(tmp_path, capsys):
    path = tmp_path / "train.jsonl"
    demos.main(["--out", str(path), "--split", "train", "--num-products", "300", "--episodes", "5"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["episodes"] == 5
    assert len(path.read_text().splitlines()) == 5


def test_oracle_falls_back_to_a_title_search(env):
    policy = demos.OraclePolicy()
    env.reset(options={"goal_index": 0})
    policy.reset(env)
    env.step("search[zzzz unrelated words]")  # a first search that cannot find the product
    policy.searches = 1
    record_actions = []
    done = False
    observation, info = env.render(), {}
    while not done:
        action, subgoal = policy.act(env, observation, info)
        record_actions.append((action, subgoal))
        observation, _, terminated, truncated, info = env.step(action)
        done = terminated or truncated
    assert (f"search[{env.goal.name}]", demos.SUBGOAL_SEARCH_TITLE) in record_actions
    assert info["won"]
