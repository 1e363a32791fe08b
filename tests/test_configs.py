"""Every shipped config loads and validates; the Qwen ones name their missing checkpoint. The
configs are found through the package (``hiper_jax.configs``), also from an installed wheel,
and loading a config imports no JAX."""

import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

from hiper_jax import configs
from hiper_jax.experiments.study_config import validate_study
from hiper_jax.train.config import validate

ROOT = pathlib.Path(__file__).parent.parent
NAMES = configs.names()
TRAINING = [n for n in NAMES if not n.startswith("study_")]


@pytest.mark.parametrize("name", NAMES)
def test_config_validates(name):
    config = configs.get(name)
    if name.startswith("study_"):
        validate_study(config, check_paths=False)
        if "gpu" in name:
            with pytest.raises(ValueError, match="config field model.checkpoint"):
                validate_study(config)
        else:
            validate_study(config)
        return
    validate(config, num_devices=8, check_paths=False)
    if "qwen" in name:
        assert config.advantage.gamma == 1.0 and config.env.num_envs == 128
        assert config.model.compute_dtype == "bfloat16"
        with pytest.raises(ValueError, match="config field model.checkpoint"):
            validate(config)
    else:
        validate(config)  # the tiny configs use the shipped checkpoint


def test_expected_configs_exist():
    assert {"alfworld_tiny", "webshop_tiny", "alfworld_qwen2_5_1_5b", "alfworld_qwen2_5_7b",
            "webshop_qwen2_5_1_5b", "study_alfworld_cpu", "study_alfworld_gpu"} <= set(NAMES)


def test_names_paths_and_the_checkout_link():
    for name in NAMES:
        path = configs.path(name)
        assert path == configs.path(name + ".py") == configs.path(f"configs/{name}.py")
        # the paths the README, scripts and tpu_scripts use name the same files
        assert os.path.samefile(path, ROOT / "configs" / f"{name}.py")
    assert sorted(p.stem for p in (ROOT / "configs").glob("*.py") if not p.stem.startswith("_")) == NAMES
    with pytest.raises(ValueError, match="unknown config 'alfworld'; shipped configs: alfworld_qwen2_5_1_5b"):
        configs.get("alfworld")
    assert configs.get("alfworld_tiny") is not configs.get("alfworld_tiny")  # fresh copies


def test_cli_prints_paths():
    out = subprocess.run([sys.executable, "-m", "hiper_jax.configs", "alfworld_tiny"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == configs.path("alfworld_tiny")
    bad = subprocess.run([sys.executable, "-m", "hiper_jax.configs", "nope"], capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.strip().startswith("error: unknown config 'nope'")


LOAD_WITHOUT_JAX = textwrap.dedent("""
    import sys
    from hiper_jax import configs
    for name in {names!r}:
        config = configs.get(name)
        config = config.run if "run" in config else config  # a study's training section
        assert config.env.num_envs >= 1, name
    print("jax imported:", "jax" in sys.modules)
""")


def test_every_config_loads_without_jax():
    """Training and study configs alike (the study's section lives in a module without JAX)."""
    script = LOAD_WITHOUT_JAX.format(names=NAMES)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "jax imported: False"


def _pip(venv, *args, timeout=900):
    result = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *args],
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]


INSTALLED_CHECK = textwrap.dedent("""
    import importlib.util, os, sys, sysconfig
    import hiper_jax
    from hiper_jax import configs
    from hiper_jax.assets import TINY_ALFWORLD
    site = sysconfig.get_paths()["purelib"]
    assert hiper_jax.__file__.startswith(site), hiper_jax.__file__   # the wheel, not the checkout
    assert all(configs.path(n).startswith(site) for n in configs.names())
    assert sorted(os.listdir(TINY_ALFWORLD)) == {assets!r}, os.listdir(TINY_ALFWORLD)
    loaded = [n for n in configs.names() if not n.startswith("study_") and configs.get(n)]
    print("loaded:", ",".join(loaded))
    print("jax importable:", importlib.util.find_spec("jax") is not None, "imported:", "jax" in sys.modules)
""")

VALIDATE_ALL = textwrap.dedent("""
    from hiper_jax import configs
    from hiper_jax.experiments.study_config import validate_study
    from hiper_jax.train.config import validate
    for name in configs.names():
        config = configs.get(name)
        if name.startswith("study_"):
            validate_study(config, check_paths="cpu" in name)
        else:
            validate(config, num_devices=8, check_paths="tiny" in name)  # the shipped checkpoint
    print("validated:", len(configs.names()))
""")


@pytest.mark.slow
def test_configs_load_from_an_installed_wheel(tmp_path):
    """A non-editable wheel in a fresh virtualenv, run from outside the checkout: first with
    ml-collections as its only dependency (the training configs load, JAX is not even
    installed), then with all its dependencies (every config validates, the tiny ones
    against the checkpoint shipped inside the wheel). Builds and installs: a few minutes."""
    source = tmp_path / "src"
    # A copy of the checkout without build outputs, so the build writes nothing into it.
    ignore = shutil.ignore_patterns("*.egg-info", "build", "dist", ".venv", ".git", "runs", "outputs",
                                    "__pycache__", ".pytest_cache", ".hypothesis")
    shutil.copytree(ROOT, source, symlinks=True, ignore=ignore)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "-w", str(wheels), str(source)], check=True, capture_output=True, timeout=900)
    (wheel,) = wheels.glob("hiper_jax-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    _pip(venv, "--no-deps", str(wheel))
    _pip(venv, "ml-collections")
    run = tmp_path / "elsewhere"
    run.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    assets = sorted(os.listdir(ROOT / "hiper_jax" / "assets" / "tiny_alfworld"))
    check = subprocess.run([str(venv / "bin" / "python"), "-c", INSTALLED_CHECK.format(assets=assets)],
                           capture_output=True, text=True, cwd=run, env=env, timeout=300)
    assert check.returncode == 0, check.stderr[-3000:]
    assert f"loaded: {','.join(TRAINING)}" in check.stdout
    assert "jax importable: False imported: False" in check.stdout
    _pip(venv, str(wheel))  # now with its dependencies (JAX, Flax, ...)
    full = subprocess.run([str(venv / "bin" / "python"), "-c", VALIDATE_ALL], capture_output=True,
                          text=True, cwd=run, env=env, timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]
    assert f"validated: {len(NAMES)}" in full.stdout
