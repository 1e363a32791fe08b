"""The ALFWorld expert (alfworld's handcoded expert, fixed) and subgoal annotation.

The handcoded expert searches like a person: it visits receptacles where ALFRED says the
object class is likely, opens closed ones, takes the object, uses the appliance and puts it
down; it never reads hidden state. We use alfworld 0.4.2's expert with its known bugs fixed:

- It tracks what it holds by looking for the word "put" in the last command, but the grammar's
  command is "move X to Y": after a put its inventory never empties, so on pick_two it never
  looks for the second object (it loops until its step limit). `fixed_policy` maps the
  command back before the expert's state tracking reads it.
- When it takes an object from a receptacle it opened, it leaves with a "close X" still queued
  and later plays it where X is not (an inadmissible command, which alfworld turns into
  "look"). Queued closes are dropped when it moves on.
- It draws from the global `random` module (which object to take when several are visible;
  a random admissible command when it would repeat itself). Each expert gets its own seeded
  `random.Random`, so a demonstration is reproducible and the host's global state untouched.
- `AlfredExpert(expert_type)` in alfworld ignores its argument; we build the expert directly.

`subgoal_of()` names the current step of the task from the true game state (what the agent
holds, whether it is hot/cool/clean, how many targets are in place). It depends only on the
task, not on which expert acts, so it annotates any trajectory consistently.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence
from typing import Any

from hiper_envs.alfworld.engine import require_engine

# Receptacles one puts things "on"; the others one puts things "in".
_SURFACES = {
    "armchair", "bed", "cart", "coffeetable", "countertop", "desk", "diningtable", "dresser",
    "ottoman", "shelf", "sidetable", "sofa", "stoveburner", "toilet", "tvstand",
}  # fmt: skip
_TRANSFORM = {
    "pick_heat_then_place_in_recep": ("ishot", "heat the {obj} with the microwave"),
    "pick_cool_then_place_in_recep": ("iscool", "cool the {obj} with the fridge"),
    "pick_clean_then_place_in_recep": ("isclean", "clean the {obj} with the sinkbasin"),
}


def _entity_class(name: str) -> str:
    """'apple 1' -> 'apple' (engine names are the lower-case class and an instance number)."""
    name = name.strip()
    head, _, tail = name.rpartition(" ")
    return head if head and tail.isdigit() else name


def _put_phrase(obj: str, recep: str, which: str = "the") -> str:
    preposition = "on" if recep in _SURFACES else "in"
    return f"put {which} {obj} {preposition} the {recep}"


def subgoal_of(facts: Sequence[Any], task_type: str, pddl_params: dict) -> str:
    """Short natural-language subgoal for the current state of a task.

    Args:
      facts: the engine's facts (`textworld.logic.Proposition`, human-readable names).
      task_type: one of the six ALFWorld task types.
      pddl_params: `traj_data.json`'s `pddl_params` (object/parent/toggle targets).
    Returns:
      e.g. "find and take the apple", "heat the apple with the microwave",
      "put the apple in the fridge".
    """
    obj = pddl_params["object_target"].lower()
    recep = (pddl_params.get("parent_target") or "").lower()
    held = [f.names[1] for f in facts if f.name == "holds"]
    held_targets = [h for h in held if _entity_class(h) == obj]
    if task_type == "look_at_obj_in_light":
        lamp = pddl_params["toggle_target"].lower()
        return f"look at the {obj} under the {lamp}" if held_targets else f"find and take the {obj}"
    if task_type == "pick_two_obj_and_place":
        placed = sum(
            1
            for f in facts
            if f.name == "inreceptacle"
            and _entity_class(f.names[0]) == obj
            and _entity_class(f.names[1]) == recep
        )
        if placed == 0:
            return _put_phrase(obj, recep) if held_targets else f"find and take a {obj}"
        return _put_phrase(obj, recep, "the second") if held_targets else f"find and take another {obj}"
    if not held_targets:
        return f"find and take the {obj}"
    if task_type in _TRANSFORM:
        predicate, phrase = _TRANSFORM[task_type]
        done = {f.names[0].strip() for f in facts if f.name == predicate}
        if not any(h.strip() in done for h in held_targets):
            return phrase.format(obj=obj)
    return _put_phrase(obj, recep)


def task_subgoals(task_type: str, pddl_params: dict) -> list[str]:
    """Every subgoal :func:`subgoal_of` can name for a task, in the order the task needs them,
    e.g. ``["find and take the apple", "heat the apple with the microwave",
    "put the apple in the fridge"]`` (the env's ``admissible_subgoals``)."""
    obj = pddl_params["object_target"].lower()
    recep = (pddl_params.get("parent_target") or "").lower()
    if task_type == "look_at_obj_in_light":
        lamp = pddl_params["toggle_target"].lower()
        return [f"find and take the {obj}", f"look at the {obj} under the {lamp}"]
    if task_type == "pick_two_obj_and_place":
        return [f"find and take a {obj}", _put_phrase(obj, recep), f"find and take another {obj}",
                _put_phrase(obj, recep, "the second")]
    middle = [_TRANSFORM[task_type][1].format(obj=obj)] if task_type in _TRANSFORM else []
    return [f"find and take the {obj}", *middle, _put_phrase(obj, recep)]


def fixed_policy(policy_cls: type) -> type:
    """alfworld's handcoded task policy class with the fixes above."""

    class Policy(policy_cls):
        def update_state_tracking(self, game_state: Any, last_action: str) -> None:
            if last_action.startswith("move "):
                last_action = "put " + last_action[len("move ") :]
            super().update_state_tracking(game_state, last_action)
            if last_action.startswith("go to "):
                # A "close X" queued when X was opened is only meaningful while at X.
                self.action_backlog = [a for a in self.action_backlog if a == f"close {self.curr_recep}"]

    Policy.__name__ = Policy.__qualname__ = policy_cls.__name__
    return Policy


@contextlib.contextmanager
def _module_random(rng: random.Random) -> Iterator[None]:
    """Route the handcoded expert module's `random.*` calls to `rng` for the duration."""
    from alfworld.agents.expert import handcoded_expert

    saved = handcoded_expert.random
    handcoded_expert.random = rng
    try:
        yield
    finally:
        handcoded_expert.random = saved


class HandcodedExpert:
    """alfworld's handcoded expert for one episode, fixed (see the module docstring).

    Usage: `expert = HandcodedExpert(gamefile, seed)`, then after `reset` and after every step
    (whatever action was taken) `action = expert.act(game_state, last_action)`. The game state
    must carry `facts` and `admissible_commands`. Returns None once the expert gives up.
    """

    FIRST_LAST_ACTION = "look"  # alfworld's expert always starts from a "look"

    def __init__(self, gamefile: str, seed: int = 0, max_steps: int = 200):
        require_engine()
        from alfworld.agents.expert import HandCodedTWAgent

        class Agent(HandCodedTWAgent):
            def get_task_policy(self, task_param: dict) -> type:
                return fixed_policy(super().get_task_policy(task_param))

        self._rng = random.Random(seed)
        self._agent = Agent(max_steps=max_steps)
        self._agent.reset(gamefile)
        self._gave_up = False

    def act(self, game_state: Any, last_action: str | None) -> str | None:
        """Next expert command given the state reached by `last_action` (None after reset)."""
        from alfworld.agents.expert import HandCodedAgentTimeout
        from alfworld.agents.expert.handcoded_expert import HandCodedAgentFailed

        if self._gave_up:
            return None
        if last_action is None:
            self._agent.observe(game_state["feedback"])
            last_action = self.FIRST_LAST_ACTION
        try:
            with _module_random(self._rng):
                action = self._agent.act(game_state, 0, game_state["won"], last_action)
        except (HandCodedAgentTimeout, HandCodedAgentFailed):
            self._gave_up = True
            return None
        return action if action in game_state["admissible_commands"] else "look"
