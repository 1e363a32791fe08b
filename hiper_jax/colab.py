"""Notebooks that open in Colab: the set-up cell, the "Open in Colab" link, the runtime line.

Every notebook under ``notebooks/`` starts with two cells written from here, so they cannot
drift apart:

1. a Markdown cell with the "Open in Colab" link, built from the set-up cell's source variable
   (a GitHub git URL gives ``colab.research.google.com/github/ORG/REPO/blob/REF/notebooks/...``);
2. the set-up cell: on a runtime where ``hiper_jax`` is not importable (a fresh Colab) it picks
   the JAX extra for the accelerator it finds (``gpu`` when ``nvidia-smi`` is on the path,
   ``tpu`` when ``/dev/accel*`` or ``/dev/vfio/N`` exists), pip-installs ``hiper_jax`` from
   ``HIPER_JAX_SOURCE`` (a git URL or a wheel path) with the notebook's extras, and prints the
   runtime (:func:`describe_runtime`). Where the package imports already (a checkout with
   ``pip install -e .``, the test suite) it only prints the runtime.

    python -m hiper_jax.colab notebooks/*.ipynb                     # rewrite both cells
    python -m hiper_jax.colab --source git+https://github.com/ORG/hiper_jax.git@main notebooks/*.ipynb
    python -m hiper_jax.colab --check notebooks/*.ipynb             # exit 1 if a cell is stale

This module imports nothing heavy at the top (the notebooks' JSON is edited with :mod:`json`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Optional

PLACEHOLDER_SOURCE = "git+https://github.com/YOUR_ORG/hiper_jax.git@main"
SETUP_TAG = "hiper-setup"          # cell metadata tag of the set-up cell
BADGE_TAG = "hiper-colab-link"     # cell metadata tag of the link cell
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
# The extras each notebook installs (the [tpu]/[gpu] JAX extra is added by runtime).
NOTEBOOK_EXTRAS = {"hae_quickstart.ipynb": "", "train_tiny.ipynb": "alfworld",
                   "explore_agent.ipynb": "alfworld"}
# Measured: `pip install` of the [alfworld] extra in a fresh virtualenv, see benchmarks/RESULTS.md.
ALFWORLD_INSTALL_NOTE = ("the ALFWorld engine (fast-downward, jericho) compiles from C++ source: "
                         "about 5 minutes on 2 CPUs")

_GITHUB = re.compile(r"^(?:git\+)?https://github\.com/(?P<org>[^/@\s]+)/(?P<repo>[^/@\s]+?)"
                     r"(?:\.git)?/?(?:@(?P<ref>[^#\s]+))?(?:#.*)?$")
_SOURCE_LINE = re.compile(r'^HIPER_JAX_SOURCE = "(?P<source>[^"]*)"', re.M)

SETUP_TEMPLATE = '''\
# Set-up for a fresh runtime (Colab): installs hiper_jax unless it is importable already.
HIPER_JAX_SOURCE = "{source}"  # a git URL or a wheel path
EXTRAS = "{extras}"{extras_note}

import glob, importlib, importlib.util, os, shutil, subprocess, sys

if importlib.util.find_spec("hiper_jax") is None:
    if "YOUR_ORG" in HIPER_JAX_SOURCE:
        raise SystemExit("Set HIPER_JAX_SOURCE to this repository's git URL or to a wheel path.")
    extras = [e for e in EXTRAS.split(",") if e]
    # JAX for the runtime's accelerator: GPUs come with nvidia-smi; TPU VMs show /dev/accel*
    # (v2-v4) or /dev/vfio/N (v5e and later); old Colab TPU nodes set COLAB_TPU_ADDR.
    if shutil.which("nvidia-smi"):
        extras.append("gpu")
    elif glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*") or os.environ.get("COLAB_TPU_ADDR"):
        extras.append("tpu")
    extra = f"[{{','.join(extras)}}]" if extras else ""
    requirement = (HIPER_JAX_SOURCE + extra if HIPER_JAX_SOURCE.endswith(".whl")
                   else f"hiper_jax{{extra}} @ {{HIPER_JAX_SOURCE}}")
    print("pip install", requirement)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", requirement], check=True)
    importlib.invalidate_caches()

from hiper_jax.colab import describe_runtime

print(describe_runtime())'''


def colab_url(source: str, notebook: str) -> Optional[str]:
    """The Colab address that opens ``notebook`` (a path inside the repository, e.g.
    ``notebooks/train_tiny.ipynb``) from the GitHub repository named by ``source``
    (``[git+]https://github.com/ORG/REPO[.git][@REF]``, REF default ``main``); None when
    ``source`` is not a GitHub URL (a wheel path)."""
    match = _GITHUB.match(source.strip())
    if match is None:
        return None
    ref = match["ref"] or "main"
    return (f"https://colab.research.google.com/github/{match['org']}/{match['repo']}/blob/"
            f"{ref}/{notebook.lstrip('/')}")


def badge_cell_source(source: str, notebook: str) -> str:
    """The Markdown of the link cell (a plain note when ``source`` names no GitHub repo)."""
    url = colab_url(source, notebook)
    if url is None:
        return (f"Installed from `{source}`; open this notebook in Colab from its GitHub copy "
                "(File > Open notebook > GitHub).")
    return f"[![Open In Colab]({BADGE_IMAGE})]({url})"


def setup_cell_source(source: str, extras: str) -> str:
    """The set-up cell's code for ``source`` (git URL or wheel path) and ``extras``
    (comma-separated, e.g. ``"alfworld"``)."""
    note = f"  # {ALFWORLD_INSTALL_NOTE}" if "alfworld" in extras.split(",") else ""
    return SETUP_TEMPLATE.format(source=source, extras=extras, extras_note=note)


def notebook_source(cells: list[dict]) -> Optional[str]:
    """``HIPER_JAX_SOURCE`` as written in a notebook's set-up cell (None without one)."""
    for cell in cells:
        if SETUP_TAG in cell.get("metadata", {}).get("tags", []):
            match = _SOURCE_LINE.search(_text(cell))
            return match["source"] if match else None
    return None


def describe_runtime() -> str:
    """One line: JAX version, backend (cpu, gpu or tpu), device count and kinds, processes."""
    import jax

    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    return (f"JAX {jax.__version__}, backend {jax.default_backend()}: {len(devices)} device(s) "
            f"({', '.join(kinds)}), {jax.local_device_count()} local; process "
            f"{jax.process_index()} of {jax.process_count()}")


def _text(cell: dict) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def _lines(text: str) -> list[str]:
    return text.splitlines(keepends=True)


def _cell(kind: str, text: str, tag: str) -> dict:
    cell = {"cell_type": kind, "id": tag, "metadata": {"tags": [tag]}, "source": _lines(text)}
    if kind == "code":
        cell.update(execution_count=None, outputs=[])
    return cell


def synced_cells(cells: list[dict], notebook: str, source: Optional[str] = None,
                 extras: Optional[str] = None) -> list[dict]:
    """``cells`` with the link and set-up cells (re)written at the top. ``source`` defaults to
    the notebook's own ``HIPER_JAX_SOURCE`` (else the placeholder), ``extras`` to
    :data:`NOTEBOOK_EXTRAS` for the notebook's file name (else none). ``notebook`` is the
    path inside the repository."""
    source = source or notebook_source(cells) or PLACEHOLDER_SOURCE
    if extras is None:
        extras = NOTEBOOK_EXTRAS.get(os.path.basename(notebook), "")
    rest = [c for c in cells if not ({SETUP_TAG, BADGE_TAG} & set(c.get("metadata", {}).get("tags", [])))]
    return [_cell("markdown", badge_cell_source(source, notebook), BADGE_TAG),
            _cell("code", setup_cell_source(source, extras), SETUP_TAG)] + rest


def _same(a: list[dict], b: list[dict]) -> bool:
    def key(cells):
        return [(c["cell_type"], c.get("id"), _text(c), c.get("metadata", {}).get("tags", []))
                for c in cells]
    return key(a) == key(b)


def sync_notebook(path: str, repo_root: str, source: Optional[str] = None, check: bool = False) -> bool:
    """Rewrites the top cells of the notebook at ``path`` (see :func:`synced_cells`); returns
    whether they changed. ``check``: only report, write nothing."""
    with open(path, encoding="utf-8") as handle:
        notebook = json.load(handle)
    inside = os.path.relpath(os.path.abspath(path), os.path.abspath(repo_root)).replace(os.sep, "/")
    cells = synced_cells(notebook["cells"], inside, source)
    changed = not _same(cells, notebook["cells"])
    if changed and not check:
        notebook["cells"] = cells
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(notebook, handle, indent=1, ensure_ascii=False, sort_keys=True)
            handle.write("\n")
    return changed


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="+")
    parser.add_argument("--source", help="git URL or wheel path (default: each notebook's own)")
    parser.add_argument("--root", default=".", help="repository root (for the notebooks' paths)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if stale")
    args = parser.parse_args(argv)
    stale = [p for p in args.notebooks if sync_notebook(p, args.root, args.source, args.check)]
    for path in stale:
        print(("stale: " if args.check else "updated: ") + path)
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
