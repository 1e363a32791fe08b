"""Scene catalogue from the layouts shipped with alfworld, and ALFRED's placement rules.

A layout is two files in `alfworld/gen/layouts/`: `FloorPlanN-objects.json` (the object and
receptacle types present in the scene) and `FloorPlanN-openable.json` (receptacle instance
ids such as `Cabinet|+00.68|+00.50|-02.20`, each with the agent pose `[x, z, rotation,
horizon]` from which it is reached). The second file omits some receptacles (e.g. GarbageCan,
StoveBurner, Toaster, CoffeeMachine); each such type listed in the first file is added once
with an id derived from the scene, so it can be a task target as in ALFWorld's own games.

Which objects may start in (or be put into) which receptacle follows ALFRED's
`constants.VAL_RECEPTACLE_OBJECTS`; which objects can be heated, cooled, cleaned or toggled
follows `constants.VAL_ACTION_OBJECTS`; which task types a room supports follows
`constants.GOALS_VALID`.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import os
import re

from hiper_envs.alfworld.engine import require_engine, shipped_path

LAMP_TYPES = ("DeskLamp", "FloorLamp")
# ALFRED's layouts do not say where lamps stand; these are the furniture a lamp is put on (a
# toggle action needs the lamp inside a receptacle, as in ALFWorld's look_at games).
LAMP_HOSTS = {
    "DeskLamp": ("Desk", "SideTable", "Dresser", "Shelf", "CoffeeTable", "DiningTable"),
    "FloorLamp": ("SideTable", "Desk", "Dresser", "CoffeeTable", "TVStand", "Sofa", "ArmChair"),
}
BASIN_TYPES = ("SinkBasin", "BathtubBasin")


def _constants():
    require_engine()
    import alfworld.gen.constants as constants

    return constants


@dataclasses.dataclass(frozen=True)
class Receptacle:
    """A static receptacle instance: ALFRED id (`Type|x|y|z[|Basin]`), type and pose."""

    id: str
    type: str
    pose: tuple[float, float, int, int]


@dataclasses.dataclass(frozen=True)
class Scene:
    """One floor plan: its receptacles (sorted by id) and the object types it contains."""

    num: int
    room: str
    receptacles: tuple[Receptacle, ...]
    object_types: tuple[str, ...]

    @property
    def receptacle_types(self) -> frozenset[str]:
        return frozenset(r.type for r in self.receptacles)

    @property
    def lamp_types(self) -> tuple[str, ...]:
        return tuple(t for t in LAMP_TYPES if t in self.object_types)


def room_of(scene_num: int) -> str:
    """ALFRED room type of a floor plan number (1-30 kitchens, 201-230 living rooms, ...)."""
    for room, numbers in _constants().SCENE_TYPE.items():
        if scene_num in numbers:
            return room
    raise ValueError(f"FloorPlan{scene_num} is not an ALFRED scene")


def static_receptacle_types() -> frozenset[str]:
    constants = _constants()
    return frozenset(constants.RECEPTACLES) - frozenset(constants.MOVABLE_RECEPTACLES)


def pickupable_types() -> frozenset[str]:
    """Object types ALFRED places in receptacles (sliced variants excluded)."""
    constants = _constants()
    placed = set().union(*constants.VAL_RECEPTACLE_OBJECTS.values())
    return frozenset(t for t in placed if not t.endswith("Sliced"))


def can_contain(receptacle_type: str, object_type: str) -> bool:
    return object_type in _constants().VAL_RECEPTACLE_OBJECTS.get(receptacle_type, ())


def has_property(object_type: str, prop: str) -> bool:
    """`prop` is one of ALFRED's action classes: Heatable, Coolable, Cleanable, Toggleable."""
    return object_type in _constants().VAL_ACTION_OBJECTS[prop]


def _receptacle_type(instance_id: str) -> str:
    parts = instance_id.split("|")
    # Basins are `Sink|x|y|z|SinkBasin`; the engine names them after the first part + "basin".
    return parts[0] + "Basin" if len(parts) == 5 else parts[0]


def _synthetic_id(type_name: str, scene_num: int) -> str:
    """A stable ALFRED-style id for a receptacle the openable layout omits."""
    digest = hashlib.sha256(f"{scene_num}|{type_name}".encode()).digest()
    x, y, z = (d / 255 * 6 - 3 for d in digest[:3])
    coords = f"{x:+06.2f}|{y:+06.2f}|{z:+06.2f}"
    for basin in BASIN_TYPES:
        if type_name == basin:
            return f"{basin[: -len('Basin')]}|{coords}|{basin}"
    return f"{type_name}|{coords}"


def _load_scene(layout_dir: str, scene_num: int) -> Scene:
    with open(os.path.join(layout_dir, f"FloorPlan{scene_num}-objects.json")) as f:
        object_types = json.load(f)
    with open(os.path.join(layout_dir, f"FloorPlan{scene_num}-openable.json")) as f:
        poses = json.load(f)
    static = static_receptacle_types()
    receptacles = [
        Receptacle(key, _receptacle_type(key), (pose[0], pose[1], int(pose[2]), int(pose[3])))
        for key, pose in poses.items()
        if _receptacle_type(key) in static
    ]
    present = {r.type for r in receptacles}
    for type_name in sorted(set(object_types) & static - present):
        receptacles.append(Receptacle(_synthetic_id(type_name, scene_num), type_name, (0, 0, 0, 0)))
    return Scene(
        num=scene_num,
        room=room_of(scene_num),
        receptacles=tuple(sorted(receptacles, key=lambda r: r.id)),
        object_types=tuple(sorted(set(object_types))),
    )


@functools.lru_cache(maxsize=1)
def load_scenes() -> tuple[Scene, ...]:
    """All ALFRED floor plans shipped with alfworld, sorted by number."""
    layout_dir = shipped_path("gen", "layouts")
    numbers = sorted(
        int(m.group(1))
        for path in glob.glob(os.path.join(layout_dir, "FloorPlan*-objects.json"))
        if (m := re.search(r"FloorPlan(\d+)-objects\.json$", path))
    )
    if not numbers:
        raise FileNotFoundError(f"no FloorPlan*-objects.json layouts in {layout_dir}")
    return tuple(_load_scene(layout_dir, n) for n in numbers)
