"""`hiper/ALFWorld-v0`: a gymnasium environment on the real ALFWorld text engine.

    env = gymnasium.make("hiper/ALFWorld-v0", games="games/train")    # or "official:valid_unseen"
    obs, info = env.reset(seed=0)                  # a random game; options={"game": i} picks one
    obs, reward, terminated, truncated, info = env.step(info["admissible_actions"][0])

Observations and actions are strings. `info` holds `admissible_actions` (sorted), `won`,
`task_type`, `task` (the goal sentence), `gamefile`, `invalid` (the action was not admissible)
and, with `expert=True`, `expert_action` (the fixed handcoded expert's next command, None if
it gave up) and `expert_subgoal` (the current step of the task in words); with
`subgoals=True`, `admissible_subgoals` (every subgoal of the task, in the order it needs them:
what a planner may choose from, the counterpart of `admissible_actions`).

Reward is `success_reward` (10, the HiPER setting) on the step that wins, else 0; winning
terminates the episode, and `max_steps` actions (default 50) truncate it. A command the
engine does not accept (unknown, malformed, not a string) gets the engine's own answer,
"Nothing happens.", leaves the game unchanged, counts as a step and sets `invalid=True`; it
never raises. (The engine answers exactly that for any non-admissible command, so we reply
without asking it and skip recomputing the unchanged admissible commands.)
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Sequence
from typing import Any

import gymnasium
from gymnasium import spaces
from hiper_envs.alfworld.engine import close_textworld_env, make_textworld_env
from hiper_envs.alfworld.expert import HandcodedExpert, subgoal_of, task_subgoals
from hiper_envs.alfworld.games import GameInfo, read_game_info, resolve_games

NOTHING_HAPPENS = "Nothing happens."
_TASK_RE = re.compile(r"Your task is to: (.*?)\.?\s*$", re.DOTALL)
_TEXT_CHARSET = string.printable
_MAX_TEXT = 100_000


class AlfWorldEnv(gymnasium.Env):
    """One ALFWorld game at a time, drawn from a pool of game files (see module docstring)."""

    metadata = {"render_modes": ["ansi"]}

    def __init__(
        self,
        games: str | Iterable[str],
        task_types: Sequence[str] | None = None,
        max_steps: int = 50,
        success_reward: float = 10.0,
        expert: bool = False,
        subgoals: bool = False,
        render_mode: str | None = None,
    ):
        """
        Args:
          games: a directory searched recursively for ALFWorld games, a `game.tw-pddl` path,
            a list of those, or `"official:<split>"` for `$ALFWORLD_DATA/json_2.1.1/<split>`.
          task_types: keep only games of these task types (default: all).
          max_steps: actions per episode before truncation.
          success_reward: reward on the winning step.
          expert: also report the expert's next action and the current subgoal in `info`.
          subgoals: also report the task's subgoals in `info["admissible_subgoals"]`.
          render_mode: None or "ansi" (`render()` returns the last observation).
        """
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        if render_mode not in (None, "ansi"):
            raise ValueError(f"render_mode must be None or 'ansi', got {render_mode!r}")
        self.gamefiles = resolve_games(games, task_types)
        self.max_steps = max_steps
        self.success_reward = float(success_reward)
        self.expert = expert
        self.subgoals = subgoals
        self.render_mode = render_mode
        self.observation_space = spaces.Text(_MAX_TEXT, charset=_TEXT_CHARSET)
        self.action_space = spaces.Text(_MAX_TEXT, charset=_TEXT_CHARSET)
        self._engine: Any = None
        self._loaded: str | None = None
        self._game: GameInfo | None = None
        self._task = ""
        self._state: Any = None
        self._expert: HandcodedExpert | None = None
        self._steps = 0
        self._done = True
        self._obs = ""

    def _pick_game(self, options: dict) -> str:
        if "gamefile" in options:
            return str(options["gamefile"])
        if "game" in options:
            return self.gamefiles[int(options["game"]) % len(self.gamefiles)]
        return self.gamefiles[int(self.np_random.integers(len(self.gamefiles)))]

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[str, dict]:
        """Start a game: `options={"game": index}` or `{"gamefile": path}`, else a random one."""
        super().reset(seed=seed)
        gamefile = self._pick_game(options or {})
        if self._engine is None:
            self._engine = make_textworld_env(request_facts=self.expert)
        if gamefile != self._loaded:
            self._loaded = None
            self._game = read_game_info(gamefile)
            self._engine.load(gamefile)
            self._loaded = gamefile
        self._state = self._engine.reset()
        self._obs = self._state["feedback"]
        match = _TASK_RE.search(self._obs)
        self._task = match.group(1).strip() if match else ""
        self._steps = 0
        self._done = False
        if self.expert:
            self._expert = HandcodedExpert(gamefile, seed=int(self.np_random.integers(2**31)))
        return self._obs, self._info(invalid=False, last_action=None)

    def step(self, action: Any) -> tuple[str, float, bool, bool, dict]:
        if self._state is None:
            raise RuntimeError("call reset() before step()")
        if self._done:
            raise RuntimeError("the episode has ended; call reset()")
        command = action.strip() if isinstance(action, str) else None
        invalid = command not in self._state["admissible_commands"]
        if invalid:
            self._obs = NOTHING_HAPPENS
        else:
            self._state, _, _ = self._engine.step(command)
            self._obs = self._state["feedback"]
        self._steps += 1
        won = bool(self._state["won"])
        truncated = not won and self._steps >= self.max_steps
        self._done = won or truncated
        reward = self.success_reward if won else 0.0
        # The expert tracks the game from the commands that changed it ("" for a no-op: its
        # state tracking would otherwise act on an unknown "go to ..." as if it had happened).
        return self._obs, reward, won, truncated, self._info(invalid, "" if invalid else command)

    def _info(self, invalid: bool, last_action: str | None) -> dict:
        info = {
            "admissible_actions": list(self._state["admissible_commands"]),
            "won": bool(self._state["won"]),
            "task_type": self._game.task_type,
            "task": self._task,
            "gamefile": self._loaded,
            "invalid": invalid,
        }
        if self.subgoals:
            info["admissible_subgoals"] = task_subgoals(self._game.task_type, self._game.pddl_params)
        if self.expert:
            feedback_state = self._state if not invalid else {**self._state, "feedback": NOTHING_HAPPENS}
            info["expert_action"] = None if self._done else self._expert.act(feedback_state, last_action)
            info["expert_subgoal"] = subgoal_of(
                self._state["facts"], self._game.task_type, self._game.pddl_params
            )
        return info

    def render(self) -> str | None:
        return self._obs if self.render_mode == "ansi" else None

    def close(self) -> None:
        if self._engine is not None:
            close_textworld_env(self._engine)
            self._engine = None
            self._loaded = None
            self._state = None
