"""Host-side records of multi-turn rollouts: one :class:`TurnRecord` per LLM response + env step."""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from hiper_jax.agent.prompts import AgentView
from hiper_jax.agent.spans import ResponseSpans


@dataclasses.dataclass
class TurnRecord:
    """Everything the update needs about one turn.

    Attributes:
      prompt_ids: ``[P]`` int32 prompt tokens (chat-templated).
      response_ids: ``[R]`` int32 sampled tokens, the stop token included when one was sampled.
      response_logp: ``[R]`` float32 log-probs of ``response_ids`` under the sampling policy.
      spans: block masks and value-read positions over the response tokens.
      switch: the policy said SWITCH.  keep_changed: KEEP with a changed subgoal text.
      subgoal: the subgoal in force after the turn.  action: the string sent to the env.
      reward: env reward of the step.  done: terminated.  truncated: cut by the step limit or a
      worker crash.  invalid: the response format was invalid or the env rejected the action.
      format_valid: the response had all three blocks and a KEEP/SWITCH word.
      response_text: the decoded response (for logs).
      allowed_mode, allowed_ids: for constrained sampling, the allowed set of each response
        position (``[R]`` int8 and ``[R, K]`` int32, see
        :func:`hiper_jax.agent.grammar.allowed_sets`); None when sampled unconstrained.
      view: what the agent saw before acting (task, observation, admissible actions, subgoal,
        history).
      env_info: the env ``info`` entries the collector was asked to keep (``info_keys``), as
        they stood before the action (e.g. an expert's label of the state); empty by default.
      images: for a vision-language policy, the uint8 images ``[H, W, C]`` the prompt's
        placeholder runs stand for, in order (the episode's arrays, shared by its turns, not
        copied); empty for text prompts. With ``image_grid`` (``[n, 3]`` int64 ``(t, h, w)`` in
        patches, None for text prompts) they re-make the turn's patches
        (:func:`hiper_jax.rollout.images.turn_sequence`).
    """

    prompt_ids: np.ndarray
    response_ids: np.ndarray
    response_logp: np.ndarray
    spans: ResponseSpans
    switch: bool
    keep_changed: bool
    subgoal: str
    action: str
    reward: float
    done: bool
    truncated: bool
    invalid: bool
    format_valid: bool
    response_text: str = ""
    allowed_mode: Optional[np.ndarray] = None
    allowed_ids: Optional[np.ndarray] = None
    view: Optional[AgentView] = None
    env_info: dict = dataclasses.field(default_factory=dict)
    images: tuple = ()
    image_grid: Optional[np.ndarray] = None


@dataclasses.dataclass
class Trajectory:
    """One episode's turns and what is known about its task.

    Attributes:
      turns: the turns in order.
      task: the goal sentence / instruction.  task_type: e.g. ALFWorld's task type.
      won: the episode ended in success.  group_id: rollouts of the same task share it (GRPO).
      game: the game file or goal id (for evaluation breakdowns).
      lost: an env worker fault cut the episode and its replays short; it has no turns, its
        batch row is masked and metrics leave it out.
    """

    turns: list[TurnRecord]
    task: str = ""
    task_type: str = ""
    won: bool = False
    group_id: int = 0
    game: Optional[str] = None
    lost: bool = False

    @property
    def num_turns(self) -> int:
        return len(self.turns)
