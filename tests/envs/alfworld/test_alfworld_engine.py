"""Regression tests for the engine problems we fix or work around (see engine.py)."""

import importlib
import importlib.metadata
import inspect
import json
import os
import random
import subprocess
import sys

import pytest
from hiper_envs.alfworld import engine

_TRANSCRIPT_SCRIPT = """
import json, random, sys
from hiper_envs.alfworld import engine
engine.apply_engine_fixes(speedups=sys.argv[1] == "fixed")
rng = random.Random(0)
transcript = []
for gamefile in json.loads(sys.argv[2]):
    env = engine.make_textworld_env(request_facts=True)
    env.load(gamefile)
    for episode in range(2):  # the second reset of a game hits the memoised translation
        state = env.reset()
        transcript.append([state["feedback"], state["admissible_commands"], sorted(map(str, state["facts"]))])
        for _ in range(25):
            state, score, done = env.step(rng.choice(state["admissible_commands"] + ["bogus"]))
            transcript.append([state["feedback"], state["admissible_commands"], state["won"], score, done])
speedups = sorted(engine.engine_speedups_applied())
print(json.dumps({"transcript": transcript, "parse_cache": engine.parse_cache_sizes(), "speedups": speedups}))
"""


def _play_in_subprocess(mode, games):
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    out = subprocess.run(
        [sys.executable, "-c", _TRANSCRIPT_SCRIPT, mode, json.dumps(games)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def test_speedups_leave_the_engine_output_byte_identical(train_games):
    games = train_games[::2]  # one game per task type
    stock = _play_in_subprocess("stock", games)
    fixed = _play_in_subprocess("fixed", games)
    assert stock["speedups"] == [] and fixed["speedups"] == sorted(engine.SPEEDUPS)
    assert stock["parse_cache"] == {} and all(n > 0 for n in fixed["parse_cache"].values())
    assert len(fixed["transcript"]) == 2 * len(games) * 26
    assert fixed["transcript"] == stock["transcript"]


def test_parses_are_memoised_per_template(train_games):
    env = engine.make_textworld_env()
    env.load(train_games[0])
    state = env.reset()
    rng = random.Random(1)
    for _ in range(5):
        state, _, _ = env.step(rng.choice(state["admissible_commands"]))
    sizes = engine.parse_cache_sizes()
    assert set(sizes) == {"textworld.envs.pddl.textgen", "textworld.logic"}
    for _ in range(20):  # same game, same templates: nothing new to parse
        state, _, _ = env.step(rng.choice([c for c in state["admissible_commands"] if c.startswith("go to")]))
    assert engine.parse_cache_sizes() == sizes


def test_loading_a_game_keeps_sys_argv(train_games, monkeypatch):
    import fast_downward

    monkeypatch.setattr(sys, "argv", ["my_program", "--flag"])
    argv = sys.argv
    env = engine.make_textworld_env()
    env.load(train_games[1])
    env.reset()
    with open(train_games[1]) as f:
        game = json.load(f)
    # A problem text not seen before, so the translation really runs (no memoised result).
    problem = game["pddl_problem"].replace("(define (problem ", "(define (problem argv_check_", 1)
    fast_downward.pddl2sas(game["pddl_domain"], problem)
    assert sys.argv is argv and sys.argv == ["my_program", "--flag"]
    # The stock translation does clobber it: the check above can fail.
    inspect.unwrap(fast_downward.pddl2sas)(game["pddl_domain"], problem)
    assert sys.argv != ["my_program", "--flag"]


def test_fixes_cannot_be_mixed_in_one_process():
    engine.apply_engine_fixes()
    assert engine.engine_speedups_applied() == set(engine.SPEEDUPS)
    with pytest.raises(RuntimeError, match="already applied"):
        engine.apply_engine_fixes(speedups=False)
    with pytest.raises(ValueError, match="unknown speed-ups"):
        engine.apply_engine_fixes(speedups=["turbo"])


def test_envs_in_one_process_share_no_wrapper(train_games):
    """alfworld's synchronous batch hands one wrapper instance to every slot; ours must not:
    interleaved play of two games in one process matches playing each alone."""
    a, b = engine.make_textworld_env(), engine.make_textworld_env()
    assert a is not b and a._wrapped_env is not b._wrapped_env
    games = (train_games[0], train_games[11])
    a.load(games[0])
    b.load(games[1])
    interleaved = {0: [a.reset()["admissible_commands"]], 1: [b.reset()["admissible_commands"]]}
    plans = {}
    for i, gamefile in enumerate(games):
        with open(gamefile) as f:
            plans[i] = json.load(f)["walkthrough"]
    for t in range(max(map(len, plans.values()))):
        for i, env in ((0, a), (1, b)):
            if t < len(plans[i]):
                state, _, _ = env.step(plans[i][t])
                interleaved[i].append(state["admissible_commands"])
    for i, gamefile in enumerate(games):
        alone = engine.make_textworld_env()
        alone.load(gamefile)
        commands = [alone.reset()["admissible_commands"]]
        for action in plans[i]:
            commands.append(alone.step(action)[0]["admissible_commands"])
        assert commands == interleaved[i]


def test_tatsu_is_the_version_textworld_needs():
    assert importlib.metadata.version("tatsu") == "5.8.3"
    assert importlib.metadata.version("textworld") == "1.7.0"


def test_missing_engine_gives_an_install_hint(monkeypatch):
    real_import_module = importlib.import_module

    def no_textworld(name, *args, **kwargs):
        if name.split(".")[0] == "textworld":
            raise ImportError("No module named 'textworld'")
        return real_import_module(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", no_textworld)
    with pytest.raises(ImportError, match=r"hiper_jax\[alfworld\]"):
        engine.require_engine()
