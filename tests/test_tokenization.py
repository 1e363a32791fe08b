"""The small trained tokenizer encodes the same way however it is loaded back."""

import dataclasses

import jax
from transformers import AutoTokenizer

from hiper_jax.models import qwen2
from hiper_jax.experiments.tiny import tiny_model_config
from hiper_jax.tokenization import train_byte_level_bpe

TEXTS = [
    "You arrive at drawer 12. On the drawer 12, you see a keychain 3, and a pen 1.",
    "<switch>SWITCH</switch><subgoal>find and take the apple</subgoal><action>go to fridge 1</action>",
    "Admissible actions: examine shelf 2, go to countertop 1, take mug 2 from shelf 2, help",
    "search[red cotton shirt, size xl, price < 40.00 dollars] [SEP] click[< Prev] café naïve",
] * 20


def test_encoding_survives_save_and_load_next_to_a_qwen2_config(tmp_path):
    trained = train_byte_level_bpe(TEXTS, vocab_size=400)
    trained.save_pretrained(tmp_path)
    before_config = AutoTokenizer.from_pretrained(tmp_path)
    # With a Qwen2 config.json beside it, AutoTokenizer picks transformers' Qwen2 tokenizer
    # class, which rebuilds the normalizer and pre-tokenizer: the encoding must not change.
    config = dataclasses.replace(tiny_model_config(len(trained), hidden_size=16, num_layers=1,
                                                   intermediate_size=32), eos_token_id=trained.eos_token_id)
    qwen2.save_hf_checkpoint(qwen2.init_params(jax.random.key(0), config), config, str(tmp_path))
    after_config = AutoTokenizer.from_pretrained(tmp_path)
    probe = ("Step 3 of 30. You are facing the sidetable 2, a 12-pack; [SEP] café price: $17.99\n"
             "<|im_start|>assistant\n<switch>KEEP</switch><action>go to drawer 10</action><|im_end|>")
    ids = trained.encode(probe)
    assert before_config.encode(probe) == ids
    assert after_config.encode(probe) == ids
    assert after_config.decode(ids) == probe
    assert after_config.eos_token_id == trained.eos_token_id == trained.convert_tokens_to_ids("<|im_end|>")
    assert after_config.pad_token_id == trained.pad_token_id
    messages = [{"role": "user", "content": "hi"}]
    assert (after_config.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            == trained.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def test_a_damaged_tokenizer_directory_names_the_file(tmp_path):
    import json
    import shutil

    import pytest

    from hiper_jax.assets import TINY_ALFWORLD
    from hiper_jax.tokenization import TokenizerFileError, load_tokenizer

    path = tmp_path / "tok"
    shutil.copytree(TINY_ALFWORLD, path)
    assert len(load_tokenizer(str(path))) > 256
    tokenizer_file = path / "tokenizer.json"
    text = tokenizer_file.read_text()
    tokenizer_file.write_text(text[: len(text) // 2])
    with pytest.raises(TokenizerFileError, match=r"tok/tokenizer\.json: not valid JSON \(.*line \d+"):
        load_tokenizer(str(path))
    data = json.loads(text)
    del data["model"]
    tokenizer_file.write_text(json.dumps(data))
    with pytest.raises(TokenizerFileError, match=r"tokenizer\.json: field 'model' must be an object"):
        load_tokenizer(str(path))
    tokenizer_file.write_text(text)
    (path / "tokenizer_config.json").write_text("{")
    with pytest.raises(TokenizerFileError, match=r"tokenizer_config\.json: not valid JSON"):
        load_tokenizer(str(path))
    with pytest.raises(FileNotFoundError, match="tokenizer directory not found"):
        load_tokenizer(str(tmp_path / "nowhere"))
