"""Expert demonstrations: JSONL schema, SWITCH/KEEP flags, subgoal sequences, CLI."""

import itertools
import json

import pytest
from hiper_envs.alfworld import demos, read_game_info

from hiper_jax.agent.demos import read_demos

SURFACES = {
    "armchair",
    "bed",
    "cart",
    "coffeetable",
    "countertop",
    "desk",
    "diningtable",
    "dresser",
    "ottoman",
    "shelf",
    "sidetable",
    "sofa",
    "stoveburner",
    "toilet",
    "tvstand",
}
TURN_KEYS = {"observation", "admissible_actions", "switch", "subgoal", "action", "reward", "done"}
EXPECTED_SUBGOALS = {
    "pick_and_place_simple": ["find and take the {o}", "put the {o} {p} the {r}"],
    "look_at_obj_in_light": ["find and take the {o}", "look at the {o} under the {t}"],
    "pick_clean_then_place_in_recep": [
        "find and take the {o}",
        "clean the {o} with the sinkbasin",
        "put the {o} {p} the {r}",
    ],
    "pick_heat_then_place_in_recep": [
        "find and take the {o}",
        "heat the {o} with the microwave",
        "put the {o} {p} the {r}",
    ],
    "pick_cool_then_place_in_recep": [
        "find and take the {o}",
        "cool the {o} with the fridge",
        "put the {o} {p} the {r}",
    ],
    "pick_two_obj_and_place": [
        "find and take a {o}",
        "put the {o} {p} the {r}",
        "find and take another {o}",
        "put the second {o} {p} the {r}",
    ],
}


@pytest.fixture(scope="module")
def demo_records(train_games, tmp_path_factory):
    out = tmp_path_factory.mktemp("demos") / "demos.jsonl"
    summary = demos.write_demos(train_games, str(out), seed=3, progress=False)
    assert summary == {
        "games": len(train_games),
        "written": len(train_games),
        "won": len(train_games),
        "failed": [],
    }
    with open(out) as f:
        return [json.loads(line) for line in f]


def test_records_follow_the_schema(demo_records, train_games):
    assert [r["game"] for r in demo_records] == train_games
    for record in demo_records:
        assert set(record) == {"env", "game", "task_type", "task", "admissible_subgoals", "won", "num_turns",
                               "turns"}
        assert record["env"] == "alfworld" and record["won"] is True
        assert record["task_type"] == read_game_info(record["game"]).task_type
        assert record["num_turns"] == len(record["turns"]) > 0
        turns = record["turns"]
        assert (
            turns[0]["observation"].startswith("-= Welcome")
            and f"Your task is to: {record['task']}." in turns[0]["observation"]
        )
        for turn in turns:
            assert set(turn) == TURN_KEYS and turn["action"] in turn["admissible_actions"]
        assert [t["done"] for t in turns] == [False] * (len(turns) - 1) + [True]
        assert [t["reward"] for t in turns] == [0.0] * (len(turns) - 1) + [10.0]


def test_switch_marks_exactly_the_subgoal_changes(demo_records):
    for record in demo_records:
        turns = record["turns"]
        assert turns[0]["switch"] == "SWITCH"
        # Every subgoal the expert pursues is one the env names, in the task's order.
        named = record["admissible_subgoals"]
        pursued = list(dict.fromkeys(t["subgoal"] for t in turns))
        assert set(pursued) <= set(named) and pursued == [s for s in named if s in pursued]
        for previous, turn in zip(turns, turns[1:]):
            assert turn["switch"] == ("SWITCH" if turn["subgoal"] != previous["subgoal"] else "KEEP")


def test_subgoals_walk_through_the_task(demo_records):
    for record in demo_records:
        params = read_game_info(record["game"]).pddl_params
        recep = params["parent_target"].lower()
        fills = dict(o=params["object_target"].lower(), r=recep, t=params["toggle_target"].lower())
        fills["p"] = "on" if recep in SURFACES else "in"
        expected = [s.format(**fills) for s in EXPECTED_SUBGOALS[record["task_type"]]]
        segments = [subgoal for subgoal, _ in itertools.groupby(t["subgoal"] for t in record["turns"])]
        assert segments == expected, record["game"]
        assert sum(t["switch"] == "SWITCH" for t in record["turns"]) == len(expected)


def test_cli(train_games, games_root, tmp_path, capsys):
    out = tmp_path / "cli.jsonl"
    demos.main(["--games", str(games_root / "eval"), "--out", str(out), "--seed", "1"])
    lines = out.read_text().splitlines()
    assert len(lines) == 6 and all(json.loads(line)["won"] for line in lines)
    assert "6/6 won" in capsys.readouterr().err
    assert len(read_demos(str(out))) == 6  # the reader of the warm-start code accepts them
