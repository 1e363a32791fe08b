"""The shipped configs, importable from an installed package.

Each module here is an ``ml_collections`` config file with a ``get_config()``: ``alfworld_tiny``
and ``webshop_tiny`` (2-core CPU), ``alfworld_qwen2_5_1_5b``, ``alfworld_qwen2_5_7b`` and
``webshop_qwen2_5_1_5b`` (HiPER's published settings), ``study_alfworld_cpu`` and
``study_alfworld_gpu`` (the estimator study). In a checkout, ``configs/`` links to this folder,
so ``--config configs/alfworld_tiny.py`` and ``--config "$(python -m hiper_jax.configs
alfworld_tiny)"`` name the same file.

    from hiper_jax import configs
    config = configs.get("alfworld_tiny")      # an ml_collections.ConfigDict
    configs.path("alfworld_tiny")              # its file, for --config flags

Loading a training config imports no JAX (the study configs do: their section defaults live in
:mod:`hiper_jax.experiments.study`).
"""

from __future__ import annotations

import importlib
import os

import ml_collections

_HERE = os.path.dirname(os.path.abspath(__file__))


def names() -> list[str]:
    """The shipped config names, sorted (file stems of this package's modules)."""
    return sorted(f[:-3] for f in os.listdir(_HERE)
                  if f.endswith(".py") and not f.startswith("_"))


def _name(name: str) -> str:
    stem = os.path.basename(name)
    stem = stem[:-3] if stem.endswith(".py") else stem
    if stem not in names():
        raise ValueError(f"unknown config {name!r}; shipped configs: {', '.join(names())}")
    return stem


def path(name: str) -> str:
    """The file of config ``name`` (``"alfworld_tiny"``, ``"alfworld_tiny.py"`` or
    ``"configs/alfworld_tiny.py"``); raises ValueError listing the shipped names."""
    return os.path.join(_HERE, _name(name) + ".py")


def get(name: str) -> ml_collections.ConfigDict:
    """A fresh copy of config ``name``'s ``get_config()`` (see :func:`path` for the names)."""
    module = importlib.import_module(f"{__name__}.{_name(name)}")
    return module.get_config()

