"""Every shipped config loads and validates; the Qwen ones name their missing checkpoint."""

import importlib.util
import pathlib

import pytest

from hiper_jax.study import validate_study
from hiper_jax.train.config import validate

CONFIGS = sorted((pathlib.Path(__file__).parent.parent / "configs").glob("*.py"))


def load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_validates(path):
    config = load(path)
    if path.stem.startswith("study_"):
        validate_study(config, check_paths=False)
        if "gpu" in path.stem:
            with pytest.raises(ValueError, match="config field model.checkpoint"):
                validate_study(config)
        else:
            validate_study(config)
        return
    validate(config, num_devices=8, check_paths=False)
    if "qwen" in path.stem:
        assert config.advantage.gamma == 1.0 and config.env.num_envs == 128
        assert config.model.compute_dtype == "bfloat16"
        with pytest.raises(ValueError, match="config field model.checkpoint"):
            validate(config)
    else:
        validate(config)  # the tiny configs use the shipped checkpoint


def test_expected_configs_exist():
    names = {p.stem for p in CONFIGS}
    assert {"alfworld_tiny", "webshop_tiny", "alfworld_qwen2_5_1_5b", "alfworld_qwen2_5_7b",
            "webshop_qwen2_5_1_5b", "study_alfworld_cpu", "study_alfworld_gpu"} <= names
