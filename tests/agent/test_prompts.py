"""Prompts: content, chat template, token budget and truncation order."""

import pytest

from hiper_jax.agent.prompts import (
    FLAT_FORMAT,
    PLAN_EXECUTE_FORMAT,
    AgentView,
    PromptConfig,
    build_messages,
    render_prompt,
)

VIEW = AgentView(
    task="put a hot apple in fridge",
    step=5,
    observation="You arrive at countertop 1. On the countertop 1, you see a apple 1.",
    admissible_actions=["take apple 1 from countertop 1", "go to fridge 1", "look"],
    subgoal="find and take the apple",
    history=[(f"You arrive at cabinet {i - 1}.", f"go to cabinet {i}") for i in range(1, 6)],
)


def test_plan_execute_message_content():
    cfg = PromptConfig(history_turns=2, max_steps=50)
    system, user = build_messages(VIEW, cfg)
    assert system["role"] == "system" and user["role"] == "user"
    text = user["content"]
    assert "Task: put a hot apple in fridge" in text and "Step 6 of 50." in text
    assert "[Step 4] You arrive at cabinet 3.\n> go to cabinet 4" in text
    assert "go to cabinet 5" in text and "go to cabinet 3" not in text
    assert "Current subgoal: find and take the apple" in text
    assert "Admissible actions: take apple 1 from countertop 1, go to fridge 1, look" in text
    assert text.endswith(PLAN_EXECUTE_FORMAT)
    first = AgentView(task="t", step=0, observation="o", admissible_actions=["look"])
    assert "Current subgoal: None" in build_messages(first, cfg)[1]["content"]


def test_flat_style_has_no_subgoal():
    text = build_messages(VIEW, PromptConfig(style="flat", env="webshop"))[1]["content"]
    assert "subgoal" not in text.lower() and text.endswith(FLAT_FORMAT)


@pytest.mark.parametrize("which", ["tiny_tokenizer", "qwen_tokenizer"])
def test_budget_drops_oldest_history_then_cuts_observation(which, request):
    tokenizer = request.getfixturevalue(which)
    full_cfg = PromptConfig(history_turns=5, max_prompt_tokens=100_000)
    full = render_prompt(VIEW, full_cfg, tokenizer)
    text = tokenizer.decode(full)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert all(f"go to cabinet {i}" in text for i in range(1, 6))

    budget = len(full) - 5
    ids = render_prompt(VIEW, PromptConfig(history_turns=5, max_prompt_tokens=budget), tokenizer)
    text = tokenizer.decode(ids)
    assert len(ids) <= budget
    assert "go to cabinet 1" not in text and "go to cabinet 5" in text

    no_history = render_prompt(VIEW, PromptConfig(history_turns=0, max_prompt_tokens=100_000), tokenizer)
    tight = len(no_history) - 8
    ids = render_prompt(VIEW, PromptConfig(history_turns=5, max_prompt_tokens=tight), tokenizer)
    text = tokenizer.decode(ids)
    assert len(ids) <= tight and "go to cabinet" not in text
    assert "Observation: You arrive at" in text and " ..." in text
    assert PLAN_EXECUTE_FORMAT in text and "Current subgoal: find and take the apple" in text


def test_budget_too_small_is_a_clear_error(tiny_tokenizer):
    with pytest.raises(ValueError, match="max_prompt_tokens=10"):
        render_prompt(VIEW, PromptConfig(max_prompt_tokens=10), tiny_tokenizer)


def test_config_validation():
    with pytest.raises(ValueError, match="env"):
        PromptConfig(env="minecraft")
    with pytest.raises(ValueError, match="style"):
        PromptConfig(style="react")
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        PromptConfig(max_prompt_tokens=0)
