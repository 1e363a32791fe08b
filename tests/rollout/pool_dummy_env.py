"""A tiny text env for the env-pool tests (importable by spawned workers)."""

import os
import signal
import time

import gymnasium
from gymnasium import spaces


class CountingEnv(gymnasium.Env):
    """Observation "<seed>:<t>"; reward 1 and termination on action "win"; truncation after
    `max_steps`. Actions "raise", "hang" and "die" make the env raise, block or kill its process."""

    def __init__(self, max_steps: int = 3):
        self.max_steps = max_steps
        self.observation_space = spaces.Text(64)
        self.action_space = spaces.Text(64)
        self._t = 0
        self._episode_seed = None

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._t = 0
        self._episode_seed = seed if seed is not None else int(self.np_random.integers(1000, 2000))
        info = {"pid": os.getpid(), "options": options}
        return f"{self._episode_seed}:0", info

    def step(self, action):
        if action == "raise":
            raise ValueError("asked to raise")
        if action == "hang":
            time.sleep(3600)
        if action == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        self._t += 1
        won = action == "win"
        truncated = not won and self._t >= self.max_steps
        return (
            f"{self._episode_seed}:{self._t}",
            float(won),
            won,
            truncated,
            {"pid": os.getpid(), "action": action},
        )


def make_counting_env(max_steps: int = 3) -> CountingEnv:
    return CountingEnv(max_steps)


class FactoryFailingWhileFileExists:
    """Builds CountingEnvs, but raises while `path` exists (a worker that cannot restart)."""

    def __init__(self, path: str):
        self.path = path

    def __call__(self) -> CountingEnv:
        if os.path.exists(self.path):
            raise OSError(f"{self.path} blocks start-up")
        return CountingEnv(max_steps=10)
