"""Finding ALFWorld games on disk: generated ones or the official data layout.

Both use ALFWorld's layout: a trial directory holds `game.tw-pddl` and `traj_data.json`. The
official data (from `alfworld-download`, which needs the internet) lives under
`$ALFWORLD_DATA/json_2.1.1/{train,valid_seen,valid_unseen}/<task>-<obj>-...-<scene>/trial_*/`.
As alfworld's own loader does, we skip games marked unsolvable or without a `solvable` key,
and the movable-receptacle and sliced-object tasks (not among the six text task types).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Sequence

GAME_FILE = "game.tw-pddl"
TRAJ_FILE = "traj_data.json"
OFFICIAL_SPLITS = ("train", "valid_seen", "valid_unseen")
OFFICIAL_VERSION_DIR = "json_2.1.1"


@dataclasses.dataclass(frozen=True)
class GameInfo:
    """What a game is about, from its `traj_data.json`."""

    gamefile: str
    task_type: str
    pddl_params: dict


def read_game_info(gamefile: str) -> GameInfo:
    """Read the `traj_data.json` next to `gamefile`."""
    traj_path = os.path.join(os.path.dirname(gamefile), TRAJ_FILE)
    try:
        with open(traj_path) as f:
            traj = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{traj_path} is missing: every {GAME_FILE} needs a {TRAJ_FILE} beside it"
        ) from None
    for key in ("task_type", "pddl_params"):
        if key not in traj:
            raise ValueError(f"{traj_path} has no {key!r} field")
    return GameInfo(gamefile, traj["task_type"], traj["pddl_params"])


def _is_playable(root: str, task_types: Sequence[str] | None) -> bool:
    if "movable" in root or "Sliced" in root:
        return False
    with open(os.path.join(root, TRAJ_FILE)) as f:
        if task_types is not None and json.load(f).get("task_type") not in task_types:
            return False
    with open(os.path.join(root, GAME_FILE)) as f:
        return bool(json.load(f).get("solvable", False))


def find_games(root: str, task_types: Sequence[str] | None = None) -> list[str]:
    """Sorted paths of the playable `game.tw-pddl` files under `root` (searched recursively)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"game directory {root!r} does not exist")
    games = [
        os.path.join(dirpath, GAME_FILE)
        for dirpath, _, files in os.walk(root)
        if GAME_FILE in files and TRAJ_FILE in files and _is_playable(dirpath, task_types)
    ]
    return sorted(games)


def official_data_dir(data_dir: str | None = None) -> str:
    """`data_dir`, or `$ALFWORLD_DATA` (as alfworld itself uses it)."""
    data_dir = data_dir or os.environ.get("ALFWORLD_DATA")
    if not data_dir:
        raise ValueError("no official ALFWorld data: pass data_dir or set $ALFWORLD_DATA")
    return os.path.expanduser(data_dir)


def official_games(
    split: str, data_dir: str | None = None, task_types: Sequence[str] | None = None
) -> list[str]:
    """Games of an official split (`train`, `valid_seen`, `valid_unseen`)."""
    if split not in OFFICIAL_SPLITS:
        raise ValueError(f"unknown official split {split!r}; expected one of {OFFICIAL_SPLITS}")
    return find_games(os.path.join(official_data_dir(data_dir), OFFICIAL_VERSION_DIR, split), task_types)


def resolve_games(games: str | Iterable[str], task_types: Sequence[str] | None = None) -> list[str]:
    """Game files from a directory, a single game file, a list of either, or `official:<split>`."""
    if isinstance(games, str):
        if games.startswith("official:"):
            return official_games(games.split(":", 1)[1], task_types=task_types)
        games = [games]
    found: list[str] = []
    for item in games:
        item = os.fspath(item)
        if os.path.isdir(item):
            found += find_games(item, task_types)
        elif os.path.isfile(item):
            found.append(item)
        else:
            raise FileNotFoundError(f"no game file or directory at {item!r}")
    if not found:
        raise ValueError(f"no playable ALFWorld games found in {games!r}")
    return found
