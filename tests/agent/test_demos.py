"""Demonstration files: schema errors name file, line and field; turns become prompt/response pairs."""

import json

import pytest

from hiper_jax.agent.demos import DemoFormatError, demo_turns, read_demos
from hiper_jax.agent.parsing import parse_response
from hiper_jax.agent.prompts import PromptConfig

EPISODE = {
    "env": "alfworld", "game": "g1", "task_type": "pick_and_place_simple",
    "task": "put some apple on diningtable", "won": True, "num_turns": 3,
    "turns": [
        {"observation": "You are in a room.", "admissible_actions": ["go to countertop 1", "look"],
         "switch": "SWITCH", "subgoal": "find and take the apple", "action": "go to countertop 1",
         "reward": 0.0, "done": False},
        {"observation": "You see a apple 1.", "admissible_actions": ["take apple 1 from countertop 1"],
         "switch": "KEEP", "subgoal": "find and take the apple",
         "action": "take apple 1 from countertop 1", "reward": 0.0, "done": False},
        {"observation": "You pick up the apple 1.", "admissible_actions": ["go to diningtable 1"],
         "switch": "SWITCH", "subgoal": "put the apple on the diningtable",
         "action": "go to diningtable 1", "reward": 0.0, "done": False},
    ],
}


def write(tmp_path, lines):
    path = tmp_path / "demos.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_turns_become_examples(tmp_path):
    lost = dict(EPISODE, won=False)
    path = write(tmp_path, [json.dumps(EPISODE), json.dumps(lost)])
    turns = list(demo_turns(read_demos(path), PromptConfig()))
    assert len(turns) == 3
    first, second, third = turns
    assert first.view.subgoal is None and first.view.history == []
    assert second.view.subgoal == "find and take the apple"
    assert second.view.history == [("You are in a room.", "go to countertop 1")]
    parsed = parse_response(second.response)
    assert parsed.valid and not parsed.is_switch and parsed.action == "take apple 1 from countertop 1"
    assert parse_response(third.response).is_switch
    flat = list(demo_turns(read_demos(path), PromptConfig(style="flat"), only_won=False))
    assert len(flat) == 6 and flat[0].response == "<action>go to countertop 1</action>"


@pytest.mark.parametrize("line,message", [
    ("{not json", "demos.jsonl:1: not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    (json.dumps({"turns": []}), "missing field 'task'"),
    (json.dumps(dict(EPISODE, turns=[dict(EPISODE["turns"][0], switch="MAYBE")])), r"turns\[0\].switch"),
    (json.dumps(dict(EPISODE, turns=[dict(EPISODE["turns"][0], admissible_actions="look")])),
     "'admissible_actions' must be list"),
])
def test_malformed_files_name_the_problem(tmp_path, line, message):
    with pytest.raises(DemoFormatError, match=message):
        read_demos(write(tmp_path, [line]))


def test_empty_file(tmp_path):
    with pytest.raises(DemoFormatError, match="no demonstrations"):
        read_demos(write(tmp_path, [""]))
