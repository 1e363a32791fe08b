"""hiper/ALFWorld-v0: reset/step contract, rewards, truncation, bad actions, official data layout."""

import json
import os
import shutil

import gymnasium
import pytest
from hiper_envs.alfworld import ENV_ID, AlfWorldEnv
from hiper_envs.alfworld.engine import make_textworld_env
from hiper_envs.alfworld.env import NOTHING_HAPPENS
from hiper_envs.alfworld.games import official_games, read_game_info
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

INFO_KEYS = {"admissible_actions", "won", "task_type", "task", "gamefile", "invalid"}


def _walkthrough(gamefile):
    with open(gamefile) as f:
        return json.load(f)["walkthrough"]


def test_registered_env_plays_a_game_to_a_win(train_games):
    env = gymnasium.make(ENV_ID, games=train_games)
    obs, info = env.reset(seed=0, options={"game": 0})
    gamefile = train_games[0]
    assert set(info) == INFO_KEYS and info["gamefile"] == gamefile
    assert (
        obs.startswith("-= Welcome to TextWorld, ALFRED! =-") and f"Your task is to: {info['task']}." in obs
    )
    assert info["task_type"] == read_game_info(gamefile).task_type
    assert info["admissible_actions"] == sorted(info["admissible_actions"]) and not info["won"]
    plan = _walkthrough(gamefile)
    for t, action in enumerate(plan):
        assert action in info["admissible_actions"]
        obs, reward, terminated, truncated, info = env.step(action)
        last = t == len(plan) - 1
        assert (reward, terminated, info["won"]) == ((10.0, True, True) if last else (0.0, False, False))
        assert not truncated and not info["invalid"]
    env.close()


def test_success_reward_and_max_steps_are_configurable(train_games):
    env = AlfWorldEnv(train_games, max_steps=3, success_reward=1.5)
    _, info = env.reset(options={"game": 1})
    for t in range(3):
        obs, reward, terminated, truncated, info = env.step("look")
        assert reward == 0.0 and not terminated and truncated == (t == 2)
    with pytest.raises(RuntimeError, match="reset"):
        env.step("look")
    env.reset(options={"game": 1})
    for action in _walkthrough(train_games[1]):
        _, reward, terminated, _, _ = env.step(action)
    assert reward == 1.5 and terminated
    with pytest.raises(ValueError, match="max_steps"):
        AlfWorldEnv(train_games, max_steps=0)


def test_game_choice_is_seeded_or_explicit(train_games):
    env = AlfWorldEnv(train_games)
    picks = [env.reset(seed=s)[1]["gamefile"] for s in range(8)]
    assert picks == [env.reset(seed=s)[1]["gamefile"] for s in range(8)]
    assert len(set(picks)) > 1
    assert env.reset(options={"game": 3})[1]["gamefile"] == train_games[3]
    assert env.reset(options={"gamefile": train_games[5]})[1]["gamefile"] == train_games[5]


def test_task_type_filter(games_root):
    env = AlfWorldEnv(str(games_root / "train"), task_types=["pick_two_obj_and_place"])
    assert len(env.gamefiles) == 2
    assert {read_game_info(g).task_type for g in env.gamefiles} == {"pick_two_obj_and_place"}


@pytest.fixture(scope="module")
def started_env(train_games):
    env = AlfWorldEnv(train_games, max_steps=10_000)
    env.reset(seed=1, options={"game": 2})
    return env


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    action=st.one_of(
        st.text(max_size=80), st.none(), st.integers(), st.binary(max_size=20), st.lists(st.text(max_size=5))
    )
)
def test_malformed_actions_never_raise(started_env, action):
    before = started_env._state["admissible_commands"]
    obs, reward, terminated, truncated, info = started_env.step(action)
    if isinstance(action, str) and action.strip() in before:
        return
    assert obs == NOTHING_HAPPENS and info["invalid"] is True
    assert (reward, terminated, truncated) == (0.0, False, False)
    assert info["admissible_actions"] == before


def test_invalid_reply_is_the_engines_own(train_games):
    engine = make_textworld_env()
    engine.load(train_games[0])
    state = engine.reset()
    for command in ("open the pod bay doors", "take", "go to nowhere 7", "  "):
        assert command.strip() not in state["admissible_commands"]
        after, _, _ = engine.step(command)
        assert after["feedback"] == NOTHING_HAPPENS
        assert after["admissible_commands"] == state["admissible_commands"]


def test_padded_admissible_action_is_accepted(train_games):
    env = AlfWorldEnv(train_games)
    _, info = env.reset(options={"game": 0})
    action = info["admissible_actions"][0]
    obs, _, _, _, info = env.step(f"  {action}\n")
    assert not info["invalid"] and obs != NOTHING_HAPPENS


def _make_official_fixture(root, train_games):
    """A tiny copy of the official layout: json_2.1.1/<split>/<task dir>/<trial>/ with the
    official files' fields, plus entries alfworld's loader skips (unsolvable, movable, sliced)."""
    base = root / "json_2.1.1"
    layout = {"train": train_games[0:2], "valid_seen": train_games[2:3], "valid_unseen": train_games[3:5]}
    for split, games in layout.items():
        for gamefile in games:
            trial = os.path.dirname(gamefile)
            target = base / split / os.path.basename(os.path.dirname(trial)) / "trial_T20190907_000000_000000"
            target.mkdir(parents=True)
            with open(gamefile) as f:
                game = json.load(f)
            del game["walkthrough"]  # official game files carry no walkthrough
            (target / "game.tw-pddl").write_text(json.dumps(game))
            with open(os.path.join(trial, "traj_data.json")) as f:
                traj = json.load(f)
            traj.update(
                images=[], plan={"high_pddl": [], "low_actions": []}, task_id="trial_T20190907_000000_000000"
            )
            (target / "traj_data.json").write_text(json.dumps(traj))
            (target / "initial_state.pddl").write_text(game["pddl_problem"])
    unsolvable = base / "valid_seen" / "pick_and_place_simple-Apple-None-Fridge-1" / "trial_T1"
    shutil.copytree(os.path.dirname(train_games[5]), unsolvable)
    game = json.loads((unsolvable / "game.tw-pddl").read_text())
    (unsolvable / "game.tw-pddl").write_text(json.dumps({**game, "solvable": False}))
    shutil.copytree(
        os.path.dirname(train_games[6]),
        base / "valid_seen" / "pick_and_place_with_movable_recep-X-Cup-Y-2" / "trial_T2",
    )
    shutil.copytree(
        os.path.dirname(train_games[7]),
        base / "valid_seen" / "pick_heat_then_place_in_recep-AppleSliced-None-Y-3" / "trial_T3",
    )
    return layout


def test_official_data_layout(tmp_path, monkeypatch, train_games):
    layout = _make_official_fixture(tmp_path, train_games)
    monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path))
    for split, games in layout.items():
        found = official_games(split)
        assert len(found) == len(games) and all(
            f.startswith(str(tmp_path / "json_2.1.1" / split)) for f in found
        )
    env = gymnasium.make(ENV_ID, games="official:valid_unseen")
    for index in range(2):
        _, info = env.reset(options={"game": index})
        source = next(
            g
            for g in layout["valid_unseen"]
            if os.path.basename(os.path.dirname(os.path.dirname(g))) in info["gamefile"]
        )
        for action in _walkthrough(source):
            _, reward, terminated, _, info = env.step(action)
        assert terminated and reward == 10.0 and info["won"]
    assert official_games("valid_seen", data_dir=str(tmp_path)) == official_games("valid_seen")
    with pytest.raises(ValueError, match="valid_seen"):
        official_games("test")
    monkeypatch.delenv("ALFWORLD_DATA")
    with pytest.raises(ValueError, match="ALFWORLD_DATA"):
        official_games("train")


def test_bad_game_sources_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no game file or directory"):
        AlfWorldEnv(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no playable ALFWorld games"):
        AlfWorldEnv(str(tmp_path))
