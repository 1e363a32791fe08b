"""The tiny-checkpoint build: its resume bookkeeping (a full build is too long for the suite)."""

import json
import os

import numpy as np

from hiper_jax.experiments.tiny import Recipe, _finished_rounds, _load_examples, _save_examples
from hiper_jax.train.sft import SFTExample


def test_examples_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    examples = [SFTExample(rng.integers(0, 900, n).astype(np.int32), rng.integers(0, 900, m).astype(np.int32))
                for n, m in [(5, 3), (1, 1), (40, 12)]]
    path = str(tmp_path / "x.npz")
    _save_examples(path, examples)
    back = _load_examples(path)
    assert len(back) == 3
    for a, b in zip(examples, back):
        np.testing.assert_array_equal(a.prompt_ids, b.prompt_ids)
        np.testing.assert_array_equal(a.response_ids, b.response_ids)
    _save_examples(path, [])
    assert _load_examples(path) == []


def test_only_complete_rounds_resume(tmp_path):
    rows = [{"round": 0, "sft_nll": 0.1}, {"round": 1, "sft_nll": 0.09}]
    with open(tmp_path / "rounds.jsonl", "w") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in rows))
    for index, names in [(0, ("config.json", "model.safetensors", "dagger_examples.npz")),
                         (1, ("config.json", "dagger_examples.npz"))]:  # round 1 lost its weights
        os.makedirs(tmp_path / "rounds" / str(index))
        for name in names:
            (tmp_path / "rounds" / str(index) / name).write_text("x")
    assert _finished_rounds(str(tmp_path)) == {0: rows[0]}
    assert _finished_rounds(str(tmp_path / "missing")) == {}


def test_recipe_command_names_every_field():
    command = Recipe(rounds=1, task_types=("pick_and_place_simple",)).command("out")
    assert command.startswith("python -m hiper_jax.experiments.tiny --out out ")
    assert "--rounds 1" in command and "--task-types pick_and_place_simple" in command
    assert "--dagger-games 200" in command
