"""ChooseWord with injected faults, for the collector, trainer and fault-injection tests.

``plan_dir`` holds fault files named ``<task>-<step>-<kind>`` (kind ``die``: SIGKILL the worker
process, ``hang``: block, ``raise``: raise in ``step``); a file fires when the env of that task
takes that step (1-based) and is consumed by firing, unless its name ends in ``-always``.
Importing this module registers ``hiper_test/FaultyChooseWord-v0``.
"""

import os
import signal
import time

import gymnasium

from hiper_envs.choose_word import ChooseWordEnv

ENV_ID = "hiper_test/FaultyChooseWord-v0"


def plan_fault(plan_dir, task: int, step: int, kind: str, always: bool = False) -> None:
    """Arms a fault (see the module docstring)."""
    name = f"{task}-{step}-{kind}" + ("-always" if always else "")
    open(os.path.join(plan_dir, name), "w").close()


class FaultyChooseWordEnv(ChooseWordEnv):
    def __init__(self, plan_dir: str = "", **kwargs):
        super().__init__(**kwargs)
        self.plan_dir = plan_dir

    def step(self, action):
        step = self._steps + 1
        for kind in ("die", "hang", "raise"):
            stem = os.path.join(self.plan_dir, f"{self._task}-{step}-{kind}")
            fires = os.path.exists(stem + "-always")
            if not fires:
                try:
                    os.unlink(stem)  # consumed: fires once, even with several workers racing
                    fires = True
                except FileNotFoundError:
                    pass
            if fires:
                if kind == "die":
                    os.kill(os.getpid(), signal.SIGKILL)
                if kind == "hang":
                    time.sleep(3600)
                raise RuntimeError(f"injected fault in task {self._task} at step {step}")
        return super().step(action)


if ENV_ID not in gymnasium.registry:
    gymnasium.register(id=ENV_ID, entry_point=FaultyChooseWordEnv)
