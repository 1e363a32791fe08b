"""Expert demonstrations (JSONL, one episode a line) as prompt/response pairs for warm starts.

Schema of a line (written by ``hiper_envs.alfworld`` and ``hiper_envs.webshop``)::

    {"env": "alfworld", "game": "...", "task_type": "...", "task": "...", "won": true,
     "num_turns": N, "turns": [{"observation": "...", "admissible_actions": [...],
     "switch": "SWITCH" | "KEEP", "subgoal": "...", "action": "...", "reward": 0.0,
     "done": false}, ...]}

An episode may also list ``"admissible_subgoals": [...]`` (the env's subgoals of its task).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Iterator, Optional

from hiper_jax.agent.parsing import format_response
from hiper_jax.agent.prompts import AgentView, PromptConfig

_TURN_FIELDS = {"observation": str, "admissible_actions": list, "switch": str, "subgoal": str,
                "action": str}
_EPISODE_FIELDS = {"task": str, "turns": list}


class DemoFormatError(ValueError):
    """A demonstration file does not follow the schema; the message names file, line, field."""


@dataclasses.dataclass(frozen=True)
class DemoTurn:
    """One supervised example: what the agent saw and the response it should give.

    ``response`` is the target text in the prompt style; ``switch``, ``subgoal`` and
    ``action`` are its parts (a grammar writes the target tokens from them).
    """

    view: AgentView
    response: str
    episode: int
    task_type: str
    switch: bool = True
    subgoal: str = ""
    action: str = ""


def read_demos(path: str) -> list[dict]:
    """Reads and checks a demonstrations JSONL file; raises :class:`DemoFormatError`."""
    episodes = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                episode = json.loads(line)
            except json.JSONDecodeError as error:
                raise DemoFormatError(f"{where}: not valid JSON ({error.msg})") from None
            if not isinstance(episode, dict):
                raise DemoFormatError(f"{where}: a line must be a JSON object")
            _check_fields(episode, _EPISODE_FIELDS, where)
            for index, turn in enumerate(episode["turns"]):
                if not isinstance(turn, dict):
                    raise DemoFormatError(f"{where}: turns[{index}] must be an object")
                _check_fields(turn, _TURN_FIELDS, f"{where}: turns[{index}]")
                if turn["switch"] not in ("KEEP", "SWITCH"):
                    raise DemoFormatError(
                        f"{where}: turns[{index}].switch must be KEEP or SWITCH, got {turn['switch']!r}")
            episodes.append(episode)
    if not episodes:
        raise DemoFormatError(f"{path}: no demonstrations in the file")
    return episodes


def _check_fields(record: dict, fields: dict, where: str) -> None:
    for name, kind in fields.items():
        if name not in record:
            raise DemoFormatError(f"{where}: missing field {name!r}")
        if not isinstance(record[name], kind):
            raise DemoFormatError(
                f"{where}: field {name!r} must be {kind.__name__}, got {type(record[name]).__name__}")


def response_text(switch: bool, subgoal: str, action: str, style: str) -> str:
    """The target response of a turn in the prompt style ("plan_execute" or "flat")."""
    if style == "flat":
        return f"<action>{action}</action>"
    return format_response(switch, subgoal, action)


def demo_turns(episodes: list[dict], cfg: PromptConfig, only_won: bool = True,
               subgoals: bool = False) -> Iterator[DemoTurn]:
    """Every turn of every (won) episode as a :class:`DemoTurn`, history as the agent saw it.

    ``subgoals``: views carry the episode's ``admissible_subgoals`` (for agents whose env
    names them, e.g. ALFWorld with ``subgoals=True``); otherwise they are left out.
    """
    for index, episode in enumerate(episodes):
        if only_won and not episode.get("won", True):
            continue
        turns = episode["turns"]
        subgoal: Optional[str] = None
        for t, turn in enumerate(turns):
            history = [(turns[j]["observation"], turns[j]["action"]) for j in range(t)]
            view = AgentView(task=episode["task"], step=t, observation=turn["observation"],
                             admissible_actions=turn["admissible_actions"], subgoal=subgoal,
                             history=history,
                             admissible_subgoals=episode.get("admissible_subgoals", ()) if subgoals else ())
            switch = turn["switch"] == "SWITCH" or t == 0
            yield DemoTurn(view=view,
                           response=response_text(switch, turn["subgoal"], turn["action"], cfg.style),
                           episode=index, task_type=str(episode.get("task_type", "")),
                           switch=switch, subgoal=turn["subgoal"], action=turn["action"])
            subgoal = turn["subgoal"]
