"""Token spans against a slow reference built from known piece offsets and prefix decoding."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hiper_jax.agent.spans import TokenBytes, response_spans

WORDS = ["find", "the", "apple", "go", "to", "countertop", "1", "heat", "microwave", "KEEP",
         "SWITCH", "fridge", "x", "<", ">", "/", "12"]


def build_response(rng_choices):
    """A response assembled piece by piece; returns text and block char spans (tags included)."""
    draw_ws, switch_word, subgoal, action, lead, trail = rng_choices
    pieces, spans, pos = [], {}, 0

    def add(text, block=None):
        nonlocal pos
        start = pos
        pieces.append(text)
        pos += len(text)
        if block is not None:
            spans[block] = (start, pos)

    add(lead)
    add(f"<switch>{draw_ws}{switch_word}</switch>", "switch")
    add(draw_ws)
    add(f"<subgoal>{subgoal}</subgoal>", "subgoal")
    add(draw_ws)
    add(f"<action>{action}</action>", "action")
    add(trail)
    return "".join(pieces), spans


def reference_spans(ids, tokenizer, spans):
    """Token char offsets by decoding every prefix (ASCII text: chars == bytes)."""
    ends = [len(tokenizer.decode(ids[: k + 1])) for k in range(len(ids))]
    starts = [0] + ends[:-1]
    taken = [False] * len(ids)
    masks = {}
    for name in ("switch", "subgoal", "action"):
        lo, hi = spans[name]
        masks[name] = [not taken[k] and starts[k] < hi and ends[k] > lo for k in range(len(ids))]
        taken = [t or m for t, m in zip(taken, masks[name])]
    after = [k for k in range(len(ids)) if starts[k] >= spans["subgoal"][1]]
    return masks, (after[0] if after else len(ids) - 1)


ascii_words = st.lists(st.sampled_from(WORDS), max_size=6).map(" ".join)
RESPONSES = st.tuples(st.sampled_from(["", " ", "\n"]), st.sampled_from(["KEEP", "SWITCH", "keep"]),
                      ascii_words, ascii_words, st.sampled_from(["", "ok ", "Plan: "]),
                      st.sampled_from(["", "<|im_end|>", " bye"]))


@pytest.mark.parametrize("which", ["tiny_tokenizer", "qwen_tokenizer"])
def test_spans_match_slow_reference(which, request):
    tokenizer = request.getfixturevalue(which)
    table = TokenBytes(tokenizer)

    @settings(max_examples=150, deadline=None)
    @given(RESPONSES)
    def check(choices):
        text, spans = build_response(choices)
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert table.decode(ids) == tokenizer.decode(ids)
        got = response_spans(ids, table)
        masks, v_low = reference_spans(ids, tokenizer, spans)
        for name in ("switch", "subgoal", "action"):
            np.testing.assert_array_equal(getattr(got, name), masks[name], err_msg=name)
        assert got.v_low_pos == v_low and got.v_high_pos == 0 and got.v_term_pos == 0

    check()


def test_unicode_and_byte_fallback(qwen_tokenizer):
    table = TokenBytes(qwen_tokenizer)
    text = "<switch>SWITCH</switch><subgoal>chauffer l'œuf 🍳 vite</subgoal><action>go to 微波炉 1</action>"
    ids = qwen_tokenizer.encode(text, add_special_tokens=False)
    assert table.decode(ids) == text
    spans = response_spans(ids, table)
    action_text = qwen_tokenizer.decode(np.asarray(ids)[spans.action].tolist())
    # Qwen merges "><" into one token, which counts for the earlier (subgoal) block.
    assert action_text.endswith("action>go to 微波炉 1</action>")
    subgoal_text = qwen_tokenizer.decode(np.asarray(ids)[spans.subgoal].tolist())
    assert subgoal_text == "subgoal>chauffer l'œuf 🍳 vite</subgoal><"


def test_missing_blocks_and_fallbacks(tiny_tokenizer):
    table = TokenBytes(tiny_tokenizer)
    ids = tiny_tokenizer.encode("<switch>KEEP</switch> go to fridge", add_special_tokens=False)
    spans = response_spans(ids, table)
    assert not spans.subgoal.any() and not spans.action.any() and spans.switch.any()
    first_after_switch = int(np.flatnonzero(~spans.switch)[0])
    assert spans.v_low_pos == first_after_switch
    garbage = tiny_tokenizer.encode("no tags at all", add_special_tokens=False)
    spans = response_spans(garbage, table)
    assert spans.v_low_pos == 0 and not (spans.switch | spans.subgoal | spans.action).any()
    spans = response_spans([], table)
    assert spans.switch.shape == (0,)


def test_padded_model_vocab_and_special_tokens(qwen_tokenizer):
    table = TokenBytes(qwen_tokenizer, vocab_size=len(qwen_tokenizer) + 100)
    eos = qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert table.decode([eos]) == "<|im_end|>"
    assert table.decode([len(qwen_tokenizer) + 5]) == ""


def test_rejects_non_byte_level_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    word_level = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")))
    with pytest.raises(ValueError, match="byte-level"):
        TokenBytes(word_level)
