"""The notebooks' Colab cells: links built from the source variable, a set-up cell that is a
no-op where hiper_jax imports and installs the right requirement where it does not."""

import contextlib
import fnmatch
import glob
import importlib.util
import io
import json
import pathlib
import shutil
import subprocess

import pytest

from hiper_jax import colab

ROOT = pathlib.Path(__file__).parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _cells(path):
    return json.loads(pathlib.Path(path).read_text())["cells"]


def _setup_source(cells):
    (cell,) = [c for c in cells if colab.SETUP_TAG in c["metadata"].get("tags", [])]
    return "".join(cell["source"])


@pytest.mark.parametrize("source,url", [
    ("git+https://github.com/acme/hiper_jax.git@v0.2",
     "https://colab.research.google.com/github/acme/hiper_jax/blob/v0.2/notebooks/x.ipynb"),
    ("https://github.com/acme/hiper-jax", "https://colab.research.google.com/github/acme/hiper-jax/blob/main/notebooks/x.ipynb"),
    ("git+https://github.com/acme/hiper_jax@feature/colab",
     "https://colab.research.google.com/github/acme/hiper_jax/blob/feature/colab/notebooks/x.ipynb"),
    ("/content/hiper_jax-0.1.0-py3-none-any.whl", None),
    ("git+https://gitlab.com/acme/hiper_jax.git", None),
])
def test_colab_url(source, url):
    assert colab.colab_url(source, "notebooks/x.ipynb") == url


def test_every_notebook_has_the_current_top_cells():
    assert {p.name for p in NOTEBOOKS} == set(colab.NOTEBOOK_EXTRAS)
    for path in NOTEBOOKS:
        cells = _cells(path)
        assert not colab.sync_notebook(str(path), str(ROOT), check=True), (
            f"{path.name}: run python -m hiper_jax.colab notebooks/*.ipynb")
        assert colab.BADGE_TAG in cells[0]["metadata"]["tags"]
        assert colab.SETUP_TAG in cells[1]["metadata"]["tags"]
        source = colab.notebook_source(cells)
        # the link is the one built from the set-up cell's variable
        assert colab.colab_url(source, f"notebooks/{path.name}") in "".join(cells[0]["source"])
        assert f'EXTRAS = "{colab.NOTEBOOK_EXTRAS[path.name]}"' in _setup_source(cells)


class _NoSubprocess:
    def __init__(self):
        self.calls = []

    def __call__(self, args, **kwargs):
        self.calls.append(list(args))
        return subprocess.CompletedProcess(args, 0)


def _run_cell(source, monkeypatch, installed=True, which=None, devices=()):
    """Executes a set-up cell in this process with subprocess.run recorded (never run),
    ``hiper_jax`` importable or not, and the accelerator probes answering as given."""
    recorder = _NoSubprocess()
    monkeypatch.setattr(subprocess, "run", recorder)
    monkeypatch.setattr(shutil, "which", lambda name: which if name == "nvidia-smi" else None)
    monkeypatch.setattr(glob, "glob", lambda pattern: [d for d in devices if fnmatch.fnmatch(d, pattern)])
    monkeypatch.delenv("COLAB_TPU_ADDR", raising=False)
    if not installed:
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: None if name == "hiper_jax" else real(name, *a))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(source, "<setup cell>", "exec"), {"__name__": "__main__"})
    return recorder.calls, out.getvalue()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_setup_cell_is_a_noop_when_the_package_imports(path, monkeypatch):
    calls, printed = _run_cell(_setup_source(_cells(path)), monkeypatch)
    assert calls == []
    assert "backend cpu" in printed and "8 device(s)" in printed  # tests/conftest.py: 8 CPU devices


@pytest.mark.parametrize("which,devices,extras", [
    (None, (), "[alfworld]"),
    ("/usr/bin/nvidia-smi", (), "[alfworld,gpu]"),
    (None, ("/dev/accel0",), "[alfworld,tpu]"),
    (None, ("/dev/vfio/0",), "[alfworld,tpu]"),
])
def test_setup_cell_installs_for_the_runtime(which, devices, extras, monkeypatch):
    source = colab.setup_cell_source("git+https://github.com/acme/hiper_jax.git@main", "alfworld")
    calls, printed = _run_cell(source, monkeypatch, installed=False, which=which, devices=devices)
    requirement = f"hiper_jax{extras} @ git+https://github.com/acme/hiper_jax.git@main"
    assert calls == [[calls[0][0], "-m", "pip", "install", "-q", requirement]]
    assert "backend cpu" in printed


def test_setup_cell_installs_a_wheel_and_refuses_the_placeholder(monkeypatch):
    wheel = "/content/hiper_jax-0.1.0-py3-none-any.whl"
    calls, _ = _run_cell(colab.setup_cell_source(wheel, ""), monkeypatch, installed=False)
    assert calls[0][-1] == wheel
    with pytest.raises(SystemExit, match="Set HIPER_JAX_SOURCE"):
        _run_cell(colab.setup_cell_source(colab.PLACEHOLDER_SOURCE, ""), monkeypatch, installed=False)


def test_cli_rewrites_source_link_and_setup(tmp_path):
    (tmp_path / "notebooks").mkdir()
    path = tmp_path / "notebooks" / "train_tiny.ipynb"
    shutil.copy(ROOT / "notebooks" / "train_tiny.ipynb", path)
    notebook = json.loads(path.read_text())
    notebook["cells"][1]["source"] = ["# an old set-up cell\n", 'HIPER_JAX_SOURCE = "https://github.com/acme/hj"\n']
    path.write_text(json.dumps(notebook))
    assert colab.main(["--check", "--root", str(tmp_path), str(path)]) == 1
    assert colab.main(["--root", str(tmp_path), str(path)]) == 0
    cells = _cells(path)
    # the notebook's own source survives the rewrite, and the link follows it
    assert colab.notebook_source(cells) == "https://github.com/acme/hj"
    assert ("https://colab.research.google.com/github/acme/hj/blob/main/notebooks/train_tiny.ipynb"
            in "".join(cells[0]["source"]))
    assert len(cells) == len(_cells(ROOT / "notebooks" / "train_tiny.ipynb"))
    assert colab.main(["--check", "--root", str(tmp_path), str(path)]) == 0
    wheel = "/content/hiper_jax-0.1.0-py3-none-any.whl"
    assert colab.main(["--source", wheel, "--root", str(tmp_path), str(path)]) == 0
    cells = _cells(path)
    assert colab.notebook_source(cells) == wheel and "colab.research.google.com/github" not in cells[0]["source"][0]


def test_describe_runtime():
    line = colab.describe_runtime()
    assert line.startswith("JAX ") and "backend cpu" in line and "process 0 of 1" in line
