"""Plan-Execute (and flat) prompts for ALFWorld and WebShop, rendered with the chat template.

A prompt shows the task, the step count, the last K (observation, action) pairs, the current
observation, the current subgoal ("None" before the first), the admissible actions and the
strict output format. Its length is measured in tokens of the fully rendered chat prompt; when
too long, the oldest history goes first, then the current observation is shortened (its start
kept, "..." marking the cut); the format block is never cut.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

ENV_INTROS = {
    "alfworld": "You are an agent in a text household world. Finish the task with the fewest actions.",
    "webshop": "You are an agent shopping in a text web store. Buy the product that matches the instruction.",
    "choose_word": "You are an agent in a text game.",
}
STYLES = ("plan_execute", "flat")
PLAN_EXECUTE_FORMAT = (
    "Answer with exactly three blocks: <switch>KEEP or SWITCH</switch> (KEEP the current "
    "subgoal or SWITCH to a new one), <subgoal>the subgoal</subgoal> (copy it on KEEP), "
    "<action>one admissible action</action>."
)
FLAT_FORMAT = "Answer with exactly one block: <action>one admissible action</action>."
_CUT_MARK = " ..."


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """How prompts look.

    Attributes:
      env: a key of :data:`ENV_INTROS` (selects the introduction) or any name with ``intro``.
      style: "plan_execute" (switch/subgoal/action) or "flat" (action only).
      history_turns: how many past (observation, action) pairs to show at most.
      max_prompt_tokens: token budget of the rendered prompt.
      max_steps: the episode's step limit, shown as "step t of max_steps".
      intro: the system introduction ("" = ``ENV_INTROS[env]``); env adapters set it.
    """

    env: str = "alfworld"
    style: str = "plan_execute"
    history_turns: int = 2
    max_prompt_tokens: int = 2048
    max_steps: int = 50
    intro: str = ""

    def __post_init__(self):
        if not self.intro and self.env not in ENV_INTROS:
            raise ValueError(f"PromptConfig.env must be one of {sorted(ENV_INTROS)} (or come with "
                             f"an intro), got {self.env!r}")
        if self.style not in STYLES:
            raise ValueError(f"PromptConfig.style must be one of {STYLES}, got {self.style!r}")
        for name in ("history_turns", "max_prompt_tokens", "max_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "history_turns" else 1):
                raise ValueError(f"PromptConfig.{name} must be a positive integer, got {value!r}")


@dataclasses.dataclass(frozen=True)
class AgentView:
    """What the agent knows before acting at one turn.

    Attributes:
      task: the goal sentence / instruction.
      step: 0-based turn index.
      observation: the current observation text.
      admissible_actions: the actions the environment accepts now.
      subgoal: the subgoal in force (None before the first).
      history: past ``(observation, action)`` pairs, oldest first: what the agent saw at an
        earlier turn and what it did.
      admissible_subgoals: the subgoals a planner may choose from, when the env names them
        (shown in the prompt and, with constrained decoding, the only subgoals it may write).
    """

    task: str
    step: int
    observation: str
    admissible_actions: Sequence[str]
    subgoal: Optional[str] = None
    history: Sequence[tuple[str, str]] = ()
    admissible_subgoals: Sequence[str] = ()


def _user_message(view: AgentView, cfg: PromptConfig, history: Sequence[tuple[str, str]],
                  observation: str) -> str:
    lines = [f"Task: {view.task}", f"Step {view.step + 1} of {cfg.max_steps}."]
    if history:
        lines.append("Recent history:")
        first_step = view.step - len(history) + 1
        lines.extend(f"[Step {first_step + i}] {obs}\n> {action}"
                     for i, (obs, action) in enumerate(history))
    lines.append(f"Observation: {observation}")
    if cfg.style == "plan_execute":
        if view.admissible_subgoals:
            lines.append("Subgoals: " + ", ".join(view.admissible_subgoals))
        lines.append(f"Current subgoal: {view.subgoal or 'None'}")
    lines.append("Admissible actions: " + ", ".join(view.admissible_actions))
    lines.append(PLAN_EXECUTE_FORMAT if cfg.style == "plan_execute" else FLAT_FORMAT)
    return "\n".join(lines)


def build_messages(view: AgentView, cfg: PromptConfig,
                   history: Optional[Sequence[tuple[str, str]]] = None,
                   observation: Optional[str] = None) -> list[dict]:
    """Chat messages (system + user) for one turn; defaults show the last K history pairs."""
    if history is None:
        history = list(view.history)[-cfg.history_turns:] if cfg.history_turns else []
    return [
        {"role": "system", "content": cfg.intro or ENV_INTROS[cfg.env]},
        {"role": "user", "content": _user_message(
            view, cfg, history, view.observation if observation is None else observation)},
    ]


def _encode(tokenizer, messages) -> list[int]:
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def render_prompt(view: AgentView, cfg: PromptConfig, tokenizer) -> list[int]:
    """Token ids of the chat prompt for one turn, within ``cfg.max_prompt_tokens``.

    Drops the oldest history pairs first, then shortens the current observation. Raises
    ValueError when even an empty observation and no history do not fit.
    """
    history = list(view.history)[-cfg.history_turns:] if cfg.history_turns else []
    for first in range(len(history) + 1):
        ids = _encode(tokenizer, build_messages(view, cfg, history=history[first:]))
        if len(ids) <= cfg.max_prompt_tokens:
            return ids
    observation = view.observation
    bare = _encode(tokenizer, build_messages(view, cfg, history=[], observation=_CUT_MARK))
    if len(bare) > cfg.max_prompt_tokens:
        raise ValueError(
            f"the prompt without history or observation has {len(bare)} tokens, over "
            f"max_prompt_tokens={cfg.max_prompt_tokens} (task and admissible actions too long)"
        )
    low, high = 0, len(observation)  # longest observation prefix that fits
    while low < high:
        middle = (low + high + 1) // 2
        cut = observation[:middle] + _CUT_MARK
        if len(_encode(tokenizer, build_messages(view, cfg, [], cut))) <= cfg.max_prompt_tokens:
            low = middle
        else:
            high = middle - 1
    return _encode(tokenizer, build_messages(view, cfg, [], observation[:low] + _CUT_MARK))
