"""A toy environment that lives outside hiper_jax and hiper_envs, with its own names for every
reset option, ``info`` key and constructor keyword, to show that an env plugs into the trainer
through an adapter alone. Importing this module registers ``hiper_test/Toy-v0``.

The task: say the magic word. ``say alpha`` wins ``win_reward``; ``say beta`` gets "Nothing
happens."; the episode ends after ``limit`` steps.
"""

from __future__ import annotations

from typing import Any, Optional

import gymnasium

from hiper_envs.spaces import TextSpace

ENV_ID = "hiper_test/Toy-v0"
WORDS = ("alpha", "beta")


class ToyEnv(gymnasium.Env):
    """``info``: ``choices`` (the admissible actions), ``kind`` (the task type), ``won``, ``task``."""

    metadata = {"render_modes": []}

    def __init__(self, num_puzzles: int = 4, limit: int = 3, win_reward: float = 1.0):
        self.observation_space = TextSpace()
        self.action_space = TextSpace()
        self.num_puzzles, self.limit, self.win_reward = num_puzzles, limit, win_reward
        self._steps, self._puzzle = 0, 0

    def _info(self, won: bool = False, invalid: bool = False) -> dict[str, Any]:
        return {"choices": [f"say {w}" for w in WORDS], "kind": "toy", "won": won, "invalid": invalid,
                "task": "say the magic word", "gamefile": str(self._puzzle)}

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        super().reset(seed=seed)
        self._puzzle = int((options or {})["puzzle"]) % self.num_puzzles
        self._steps = 0
        return "You stand before a door that opens to the magic word.", self._info()

    def step(self, action: str):
        self._steps += 1
        won = action.strip() == "say alpha"
        invalid = action.strip() not in self._info()["choices"]
        truncated = not won and self._steps >= self.limit
        observation = "The door opens." if won else "Nothing happens."
        return observation, self.win_reward if won else 0.0, won, truncated, self._info(won, invalid)


if ENV_ID not in gymnasium.registry:
    gymnasium.register(id=ENV_ID, entry_point=f"{__name__}:ToyEnv")
