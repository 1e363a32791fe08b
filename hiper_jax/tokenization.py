"""Small byte-level BPE tokenizers with a ChatML chat template (Qwen's message format).

Used to make the embedded default model's tokenizer from environment text, and by tests.
"""

from __future__ import annotations

from typing import Iterable

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)
# Qwen2's pre-tokenizer split (single digits, a leading space or punctuation glued to words).
# The trained tokenizer must pre-tokenize exactly as `transformers`' Qwen2Tokenizer does: next to
# a Qwen2 config.json, AutoTokenizer loads the files with that class, which rebuilds the
# normalizer and pre-tokenizer from its own defaults.
QWEN2_SPLIT_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                       r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int = 1024, min_frequency: int = 2):
    """Trains a byte-level BPE on ``texts`` and wraps it as a ``transformers`` tokenizer.

    The result has Qwen's special tokens (``<|endoftext|>`` as pad, ``<|im_end|>`` as eos), the
    ChatML chat template, and saves/loads with ``save_pretrained``/``AutoTokenizer``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=CHATML_TEMPLATE,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        additional_special_tokens=[IM_START],
        clean_up_tokenization_spaces=False,
    )


# The JSON files `AutoTokenizer` may read from a tokenizer directory.
_TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                         "added_tokens.json", "vocab.json", "config.json")


class TokenizerFileError(ValueError):
    """A tokenizer directory cannot be loaded; the message names the file (and field)."""


def load_tokenizer(path: str):
    """``AutoTokenizer.from_pretrained(path)`` with errors that name the bad file.

    Every JSON file of the directory is parsed first, so a truncated ``tokenizer.json`` reports
    its path and position instead of a bare ``JSONDecodeError``; ``tokenizer.json`` must hold a
    ``model`` object.

    Raises:
      FileNotFoundError: ``path`` is not a directory.
      TokenizerFileError: a file is not valid JSON, lacks a required field, or the tokenizer
        cannot be built from the files.
    """
    import json
    import os

    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    for name in _TOKENIZER_JSON_FILES:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        try:
            with open(file, encoding="utf-8") as handle:
                data = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise TokenizerFileError(f"{file}: not valid JSON ({error})") from None
        if name == "tokenizer.json" and not (isinstance(data, dict) and isinstance(data.get("model"), dict)):
            raise TokenizerFileError(f"{file}: field 'model' must be an object (the tokenizer's "
                                     "vocabulary and merges)")
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as error:  # noqa: BLE001 - reported with the directory; the cause is chained
        raise TokenizerFileError(f"{path}: cannot load the tokenizer "
                                 f"({type(error).__name__}: {error})") from error
