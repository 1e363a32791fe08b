"""Notebooks are executed so that they cannot rot (their set-up cells run too: a no-op here,
where hiper_jax is installed)."""

import json
import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

from hiper_jax.colab import SETUP_TAG

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
# Notebooks that train or evaluate for minutes run with the slow tests; explore_agent needs a
# run directory and runs in its own test below.
SLOW = {"train_tiny.ipynb"}
GENERIC = [p for p in NOTEBOOKS if p.name != "explore_agent.ipynb"]


def execute(notebook, cwd) -> list[dict]:
    """Runs ``notebook`` in a kernel (working directory ``cwd``); returns the error outputs."""
    NotebookClient(notebook, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(cwd)}}).execute()
    return [o for cell in notebook.cells if cell.cell_type == "code"
            for o in cell.get("outputs", []) if o.get("output_type") == "error"]


def setup_output(notebook) -> str:
    (cell,) = [c for c in notebook.cells if SETUP_TAG in c.metadata.get("tags", [])]
    return "".join(o.get("text", "") for o in cell.outputs)


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if p.name in SLOW else p
                                  for p in GENERIC], ids=[p.name for p in GENERIC])
def test_notebook_executes(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    assert not execute(notebook, tmp_path)
    assert "JAX " in setup_output(notebook) and "backend cpu" in setup_output(notebook)
    assert "pip install" not in setup_output(notebook)


def with_parameters(notebook, **values):
    """A copy of ``notebook`` with a cell setting ``values`` after its ``parameters`` cell
    (papermill's convention)."""
    notebook = nbformat.reads(nbformat.writes(notebook), as_version=4)
    (index,) = [i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", [])]
    names = {line.split("=")[0].strip() for line in notebook.cells[index].source.splitlines() if "=" in line}
    assert set(values) <= names, f"not parameters of the notebook: {set(values) - names}"
    source = "\n".join(f"{k} = {v!r}" for k, v in values.items())
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(source))
    return notebook


@pytest.fixture
def tiny_run(games_root, tmp_path):
    """A run directory of a real one-iteration training run: the shipped tiny config, shrunk
    to 2 envs x 3 turns on the session's generated games (metrics, plots, a checkpoint)."""
    from hiper_jax import configs
    from hiper_jax.train.trainer import Trainer

    c = configs.get("alfworld_tiny")
    c.env.games_dir = str(games_root)
    c.env.num_envs, c.env.max_turns, c.env.envs_per_worker = 2, 3, 1
    c.advantage.update(estimator="hae", rollouts_per_task=1)
    c.sampling.prompt_length_multiple = 512
    c.ppo.mini_batch_rows, c.ppo.micro_batch_rows, c.ppo.length_multiple = 16, 16, 512
    c.train.iterations, c.train.eval_every, c.train.checkpoint_every = 1, 1, 1
    c.train.out_dir = str(tmp_path / "run")
    c.train.tensorboard = False
    Trainer(c, progress=False).run()
    return c.train.out_dir


@pytest.mark.slow
def test_explore_agent_executes(tiny_run, tmp_path):
    """The explore notebook on a real run directory, 2 held-out games (a one-iteration training
    run first, then the notebook's evaluation: about 3 CPU-minutes)."""
    path = pathlib.Path(__file__).parent.parent / "notebooks" / "explore_agent.ipynb"
    notebook = with_parameters(nbformat.read(path, as_version=4), RUN_DIR=tiny_run, EPISODES=2,
                               TRANSCRIPT_TURNS=3)
    assert not execute(notebook, tmp_path)
    assert "backend cpu" in setup_output(notebook)
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs)
    assert "training a short stand-in run" not in text  # the given run was used
    assert "Wilson" in text and "A_low" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    # three run plots (curves, task types, planning), the task-type bars, >= 1 transcript
    assert len(images) >= 5
    records = [json.loads(line) for line in open(os.path.join(tiny_run, "explore", "eval", "episodes.jsonl"))]
    assert len(records) == 2 and all("tokens" in t and "adv" in t["tokens"] for r in records for t in r["turns"])


def test_explore_agent_parameters():
    path = pathlib.Path(__file__).parent.parent / "notebooks" / "explore_agent.ipynb"
    notebook = with_parameters(nbformat.read(path, as_version=4), RUN_DIR="/x", EPISODES=1)
    assert "RUN_DIR = '/x'\nEPISODES = 1" in [c.source for c in notebook.cells]
    with pytest.raises(AssertionError, match="not parameters"):
        with_parameters(notebook, EPISODE=1)
