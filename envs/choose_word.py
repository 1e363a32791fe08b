"""ChooseWord: a tiny text task for sanity checks of the RL loop, ``hiper/ChooseWord-v0``.

Every turn the agent may say one of a few words; saying the rewarded one ends the episode with
``success_reward``, any other admissible word gets "Nothing happens." and the episode goes on
until ``max_steps``. An action that is not admissible is invalid. One action earns reward and
nothing in the observation says which, so a policy that starts undecided can only learn it
from the reward: a trainer that works raises the success rate within a few iterations.
"""

from __future__ import annotations

from typing import Any, Optional

import gymnasium
import numpy as np

from hiper_envs.spaces import TextSpace


class ChooseWordEnv(gymnasium.Env):
    """See the module docstring. ``info`` carries admissible_actions, won, invalid, task,
    task_type ("choose_word") and gamefile (the task index)."""

    metadata = {"render_modes": []}

    def __init__(self, words: tuple[str, ...] = ("alpha", "beta"), rewarded: str = "alpha",
                 max_steps: int = 3, success_reward: float = 10.0, num_tasks: int = 8):
        if rewarded not in words:
            raise ValueError(f"rewarded word {rewarded!r} is not one of {words}")
        if max_steps < 1 or num_tasks < 1:
            raise ValueError(f"max_steps and num_tasks must be >= 1, got {max_steps}, {num_tasks}")
        self.observation_space = TextSpace()
        self.action_space = TextSpace()
        self.words = tuple(words)
        self.rewarded = rewarded
        self.max_steps = max_steps
        self.success_reward = success_reward
        self.num_tasks = num_tasks
        self._rng = np.random.default_rng(0)
        self._task = 0
        self._steps = 0
        self._admissible: list[str] = []

    def _info(self, won: bool = False, invalid: bool = False) -> dict[str, Any]:
        self._admissible = [f"say {w}" for w in self._rng.permutation(self.words)]
        return {"admissible_actions": list(self._admissible), "won": won, "invalid": invalid,
                "task": "say the magic word", "task_type": "choose_word", "gamefile": str(self._task)}

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        super().reset(seed=seed)
        self._rng = np.random.default_rng(seed)
        self._task = int((options or {}).get("task", 0)) % self.num_tasks
        self._steps = 0
        return "You stand before a door that opens to the magic word.", self._info()

    def step(self, action):
        if self._steps >= self.max_steps:
            raise RuntimeError("step() called after the episode ended; call reset()")
        self._steps += 1
        text = " ".join(str(action).split()).lower()
        invalid = text not in self._admissible
        won = not invalid and text == f"say {self.rewarded}"
        observation = "The door opens." if won else "Nothing happens."
        truncated = not won and self._steps >= self.max_steps
        reward = self.success_reward if won else 0.0
        return observation, reward, won, truncated, self._info(won=won, invalid=invalid)
