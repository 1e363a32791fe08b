"""Generate ALFWorld games offline from the shipped layouts, for all six task types.

    python -m hiper_envs.alfworld.generate --out DIR --num-games N --seed S \
        [--task-types pick_and_place_simple ...] [--split train|eval] \
        [--max-receptacles 8] [--max-distractors 4] [--workers 2]

Each game is written in ALFWorld's own layout and format,
`DIR/<split>/<task_type>-<Object>-None-<Target>-<scene>/trial_<seed>_<index>/` holding
`game.tw-pddl` (JSON: `pddl_domain`, `grammar` with the task sentence, `pddl_problem`,
`solvable`, `walkthrough`) and `traj_data.json` (`task_type`, `pddl_params`, `scene`), so
`AlfredTWEnv`, the handcoded expert and our env all read them.

How a game is built (reproducible: game `i` depends only on `(seed, i, config)`):
1. task type `i mod len(task_types)`; a (scene, object, target) choice uniform over those that
   ALFRED's rules allow (room types per task, heatable/coolable/cleanable objects, receptacles
   that may hold the object, lamps for look_at, ALFRED's invalid targets) and whose
   (scene, task type, object) triple hashes into the requested split — train and eval never
   share a triple;
2. a small scene: the receptacles the task needs (target, appliance, lamp host, where the
   objects start) plus random others of the floor plan up to `max_receptacles`; the target
   object (1-2 copies, 2-3 for pick_two) and up to `max_distractors` other object types, each
   in a receptacle that ALFRED allows to hold it; openable receptacles start closed; the agent
   starts in the middle of the room;
3. the goal is ALFWorld's goal-library PDDL; the task sentence one of its two templates;
4. solvability is checked on the real engine: not won at reset, and the fast-downward plan
   played step by step ends in a win (that plan is stored as the walkthrough).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import random
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

from hiper_envs.alfworld import scenes as scn
from hiper_envs.alfworld.engine import make_textworld_env, require_engine, shipped_path

TASK_TYPES = (
    "pick_and_place_simple",
    "look_at_obj_in_light",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place",
)
SPLITS = ("train", "eval")
EVAL_PERCENT = 20  # share of (scene, task type, object) triples reserved for the eval split

# ALFRED's task constraints (alfred gen/scripts/generate_trajectories.py).
_APPLIANCE = {
    "pick_heat_then_place_in_recep": "Microwave",
    "pick_cool_then_place_in_recep": "Fridge",
    "pick_clean_then_place_in_recep": "SinkBasin",
}
_OBJECT_PROPERTY = {
    "pick_heat_then_place_in_recep": "Heatable",
    "pick_cool_then_place_in_recep": "Coolable",
    "pick_clean_then_place_in_recep": "Cleanable",
}
_INVALID_TARGETS = {
    "pick_heat_then_place_in_recep": {"Microwave"},
    "pick_cool_then_place_in_recep": {"Fridge"},
    "pick_clean_then_place_in_recep": {"SinkBasin"},
    "pick_two_obj_and_place": {"CoffeeMachine", "ToiletPaperHanger", "HandTowelHolder"},
}
_START_LOCATION = "loc|start"


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
    """Scene size. Defaults keep games small for fast play with short prompts: the intro
    lists at most 8 receptacles and rooms hold the task's objects plus at most 4 other object
    types. A task always gets the receptacles it needs (up to 3), whatever the budget."""

    max_receptacles: int = 8
    max_distractors: int = 4

    def __post_init__(self):
        if self.max_receptacles < 1:
            raise ValueError(f"max_receptacles must be >= 1, got {self.max_receptacles}")
        if self.max_distractors < 0:
            raise ValueError(f"max_distractors must be >= 0, got {self.max_distractors}")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """What a game asks: ALFRED `pddl_params` plus the scene."""

    task_type: str
    scene_num: int
    object_target: str
    parent_target: str = ""
    toggle_target: str = ""

    @property
    def triple(self) -> tuple[int, str, str]:
        return (self.scene_num, self.task_type, self.object_target)

    @property
    def target(self) -> str:
        return self.parent_target or self.toggle_target


def split_of(scene_num: int, task_type: str, object_target: str) -> str:
    """Split of a (scene, task type, object) triple: a fixed hash, so splits never overlap."""
    digest = hashlib.sha256(f"{scene_num}|{task_type}|{object_target}".encode()).digest()
    return "eval" if int.from_bytes(digest[:8], "big") % 100 < EVAL_PERCENT else "train"


def _sources(scene: scn.Scene, spec: TaskSpec) -> list[scn.Receptacle]:
    """Receptacles where the target object may start: any that may hold it except the target
    type and the task's appliance (so each task has distinct find, transform and put steps)."""
    excluded = {spec.parent_target, _APPLIANCE.get(spec.task_type)}
    return [
        r for r in scene.receptacles if scn.can_contain(r.type, spec.object_target) and r.type not in excluded
    ]


def _lamp_hosts(scene: scn.Scene, lamp: str) -> list[scn.Receptacle]:
    return [r for r in scene.receptacles if r.type in scn.LAMP_HOSTS[lamp]]


def _scene_candidates(scene: scn.Scene, task_type: str) -> Iterable[TaskSpec]:
    constants = scn._constants()
    if scene.room not in constants.GOALS_VALID[task_type]:
        return
    objects = sorted(set(scene.object_types) & scn.pickupable_types())
    if task_type == "look_at_obj_in_light":
        for lamp in scene.lamp_types:
            if not _lamp_hosts(scene, lamp):
                continue
            for obj in objects:
                spec = TaskSpec(task_type, scene.num, obj, toggle_target=lamp)
                if _sources(scene, spec):
                    yield spec
        return
    appliance = _APPLIANCE.get(task_type)
    if appliance and appliance not in scene.receptacle_types:
        return
    prop = _OBJECT_PROPERTY.get(task_type)
    invalid = _INVALID_TARGETS.get(task_type, set())
    for obj in objects:
        if prop and not scn.has_property(obj, prop):
            continue
        for parent in sorted(scene.receptacle_types - invalid):
            spec = TaskSpec(task_type, scene.num, obj, parent_target=parent)
            if scn.can_contain(parent, obj) and _sources(scene, spec):
                yield spec


@functools.cache
def task_candidates(task_type: str, split: str) -> tuple[TaskSpec, ...]:
    """Every task ALFRED's rules allow for `task_type` in the shipped scenes, within `split`."""
    if task_type not in TASK_TYPES:
        raise ValueError(f"unknown task type {task_type!r}; expected one of {TASK_TYPES}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return tuple(
        spec
        for scene in scn.load_scenes()
        for spec in _scene_candidates(scene, task_type)
        if split_of(*spec.triple) == split
    )


def _mangle(name: str) -> str:
    """ALFRED ids to PDDL names (`Apple|+01.00|...` -> `Apple_bar__plus_01_dot_00_bar_...`)."""
    for char, code in (("-", "_minus_"), ("|", "_bar_"), ("+", "_plus_"), (".", "_dot_"), (",", "_comma_")):
        name = name.replace(char, code)
    return name


def _location(pose: tuple[float, float, int, int]) -> str:
    x, z, rotation, horizon = pose
    return f"loc|{round(x / 0.25)}|{round(z / 0.25)}|{rotation // 90}|{horizon}"


@dataclasses.dataclass
class _Layout:
    receptacles: list[scn.Receptacle]
    objects: list[tuple[str, str, scn.Receptacle]]  # (object id, type, receptacle)


def _sample_layout(spec: TaskSpec, scene: scn.Scene, rng: random.Random, config: GeneratorConfig) -> _Layout:
    """Pick the receptacles and place the objects of one game (see the module docstring)."""
    chosen: dict[str, scn.Receptacle] = {}

    def add(receptacle: scn.Receptacle) -> scn.Receptacle:
        chosen[receptacle.id] = receptacle
        return receptacle

    def pick_source(candidates: Sequence[scn.Receptacle]) -> scn.Receptacle:
        # Reuse a receptacle already in the scene half the time, and always once the budget is
        # spent, so the task's own receptacles never exceed max(max_receptacles, 3).
        present = [r for r in candidates if r.id in chosen]
        full = len(chosen) >= config.max_receptacles
        return add(rng.choice(present if present and (full or rng.random() < 0.5) else list(candidates)))

    if spec.parent_target:
        add(rng.choice([r for r in scene.receptacles if r.type == spec.parent_target]))
    appliance = _APPLIANCE.get(spec.task_type)
    if appliance:
        add(rng.choice([r for r in scene.receptacles if r.type == appliance]))
    placements: list[tuple[str, scn.Receptacle]] = []  # (object type, receptacle)
    if spec.toggle_target:
        placements.append((spec.toggle_target, add(rng.choice(_lamp_hosts(scene, spec.toggle_target)))))
    copies = rng.randint(2, 3) if spec.task_type == "pick_two_obj_and_place" else rng.randint(1, 2)
    sources = _sources(scene, spec)
    placements += [(spec.object_target, pick_source(sources)) for _ in range(copies)]

    others = [r for r in scene.receptacles if r.id not in chosen]
    rng.shuffle(others)
    for receptacle in others[: max(0, config.max_receptacles - len(chosen))]:
        add(receptacle)

    excluded = {spec.object_target, *scn.LAMP_TYPES}
    distractor_types = sorted(set(scene.object_types) & scn.pickupable_types() - excluded)
    rng.shuffle(distractor_types)
    placed = 0
    for type_name in distractor_types:
        if placed == config.max_distractors:
            break
        hosts = sorted((r for r in chosen.values() if scn.can_contain(r.type, type_name)), key=lambda r: r.id)
        if hosts:
            placements.append((type_name, rng.choice(hosts)))
            placed += 1

    used_ids: set[str] = set()
    objects = []
    for type_name, receptacle in placements:
        object_id = ""
        while not object_id or object_id in used_ids:
            object_id = type_name + "|" + "|".join(f"{rng.uniform(-3, 3):+06.2f}" for _ in range(3))
        used_ids.add(object_id)
        objects.append((object_id, type_name, receptacle))
    return _Layout(sorted(chosen.values(), key=lambda r: r.id), objects)


def _goal_pddl(spec: TaskSpec) -> str:
    from alfworld.gen import goal_library

    template = goal_library.gdict[spec.task_type]["pddl"]
    goal = template.format(
        obj=spec.object_target, recep=spec.parent_target, toggle=spec.toggle_target, mrecep=""
    )
    return goal.replace("#", "-")


def task_sentence(spec: TaskSpec, rng: random.Random) -> str:
    """One of ALFWorld's goal templates for the task, filled with lower-case names."""
    from alfworld.gen import goal_library

    template = rng.choice(goal_library.gdict[spec.task_type]["templates"])
    return template.format(
        obj=spec.object_target.lower(),
        recep=spec.parent_target.lower(),
        toggle=spec.toggle_target.lower(),
        mrecep="",
    )


def build_problem(spec: TaskSpec, layout: _Layout, name: str) -> str:
    """The PDDL problem (ALFWorld's conventions) for a sampled layout."""
    constants = scn._constants()
    m = _mangle
    locations: dict[str, str] = {}
    taken = {_START_LOCATION}
    for receptacle in layout.receptacles:
        base = _location(receptacle.pose)
        loc, k = base, 1
        while loc in taken:  # one receptacle per location, so "go to" names a single receptacle
            loc, k = f"{base}|{k}", k + 1
        taken.add(loc)
        locations[receptacle.id] = loc

    rtypes = sorted({r.type for r in layout.receptacles} | ({spec.parent_target} - {""}))
    otypes = sorted({t for _, t, _ in layout.objects})
    facts = [f"(atLocation agent1 {m(_START_LOCATION)})"]
    for r in layout.receptacles:
        facts.append(f"(receptacleType {m(r.id)} {r.type}Type)")
        facts.append(f"(receptacleAtLocation {m(r.id)} {m(locations[r.id])})")
        if r.type in constants.OPENABLE_CLASS_SET:
            facts.append(f"(openable {m(r.id)})")
    for object_id, type_name, r in layout.objects:
        o = m(object_id)
        facts.append(f"(objectType {o} {type_name}Type)")
        facts.append(f"(inReceptacle {o} {m(r.id)})")
        facts.append(f"(objectAtLocation {o} {m(locations[r.id])})")
        if type_name in scn.LAMP_TYPES:
            facts.append(f"(toggleable {o})")
            continue
        facts.append(f"(pickupable {o})")
        for prop in ("Cleanable", "Heatable", "Coolable", "Sliceable"):
            if scn.has_property(type_name, prop):
                facts.append(f"({prop.lower()} {o})")
        if type_name in constants.MOVABLE_RECEPTACLES_SET:
            facts.append(f"(isReceptacleObject {o})")
    facts += [f"(canContain {rt}Type {ot}Type)" for rt in rtypes for ot in otypes if scn.can_contain(rt, ot)]
    declarations = (
        ["agent1 - agent"]
        + [f"{t}Type - otype" for t in otypes]
        + [f"{t}Type - rtype" for t in rtypes]
        + [f"{m(object_id)} - object" for object_id, _, _ in layout.objects]
        + [f"{m(r.id)} - receptacle" for r in layout.receptacles]
        + [f"{m(loc)} - location" for loc in sorted(taken)]
    )
    return (
        f"(define (problem {name})\n(:domain alfred)\n(:objects\n"
        + "\n".join(declarations)
        + "\n)\n(:init\n"
        + "\n".join(facts)
        + "\n)\n"
        + _goal_pddl(spec)
    )


class UnsolvableGame(RuntimeError):
    pass


def check_solvable(game_path: str) -> list[str]:
    """Play the engine's own plan for the game; return it, or raise UnsolvableGame."""
    env = make_textworld_env(request_walkthrough=True)
    try:
        env.load(game_path)
        state = env.reset()
        if state["won"]:
            raise UnsolvableGame(f"{game_path}: the goal already holds at reset")
        plan = list(state["extra.walkthrough"] or [])
        if not plan:
            raise UnsolvableGame(f"{game_path}: the planner found no plan")
        for command in plan:
            if command not in state["admissible_commands"]:
                raise UnsolvableGame(f"{game_path}: planned command {command!r} is not admissible")
            state, _, _ = env.step(command)
        if not state["won"]:
            raise UnsolvableGame(f"{game_path}: the plan does not reach the goal")
        return plan
    except UnsolvableGame:
        raise
    except Exception as error:  # the engine rejects some impossible problems by failing
        raise UnsolvableGame(f"{game_path}: the engine failed on it: {error!r}") from error
    finally:
        env.close()


def _write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def generate_game(
    out_dir: str, index: int, seed: int, task_types: Sequence[str], split: str, config: GeneratorConfig
) -> str:
    """Generate, check and write game `index` of the run `seed`; return its game.tw-pddl path."""
    task_type = task_types[index % len(task_types)]
    candidates = task_candidates(task_type, split)
    if not candidates:
        raise ValueError(f"no {task_type} task is possible in split {split!r}")
    scenes_by_num = {s.num: s for s in scn.load_scenes()}
    with open(shipped_path("data", "alfred.pddl")) as f:
        domain = f.read()
    with open(shipped_path("data", "alfred.twl2")) as f:
        grammar = f.read()
    for attempt in range(20):
        rng = random.Random(f"{seed}:{index}:{attempt}")
        spec = rng.choice(candidates)
        layout = _sample_layout(spec, scenes_by_num[spec.scene_num], rng, config)
        trial = f"trial_{seed}_{index:06d}"
        game_dir = os.path.join(
            out_dir, split, f"{task_type}-{spec.object_target}-None-{spec.target}-{spec.scene_num}", trial
        )
        os.makedirs(game_dir, exist_ok=True)
        sentence = task_sentence(spec, rng)
        game = {
            "pddl_domain": domain,
            "grammar": grammar.replace("UNKNOWN GOAL", sentence),
            "pddl_problem": build_problem(spec, layout, f"plan_{trial}"),
            "solvable": False,
        }
        game_path = os.path.join(game_dir, "game.tw-pddl")
        _write_json(game_path, game)
        try:
            plan = check_solvable(game_path)
        except UnsolvableGame:
            os.remove(game_path)
            os.rmdir(game_dir)
            continue
        _write_json(game_path, {**game, "solvable": True, "walkthrough": plan})
        _write_json(
            os.path.join(game_dir, "traj_data.json"),
            {
                "task_id": trial,
                "task_type": task_type,
                "pddl_params": {
                    "object_target": spec.object_target,
                    "parent_target": spec.parent_target,
                    "toggle_target": spec.toggle_target,
                    "mrecep_target": "",
                    "object_sliced": False,
                },
                "scene": {
                    "floor_plan": f"FloorPlan{spec.scene_num}",
                    "scene_num": spec.scene_num,
                    "random_seed": seed,
                },
                "turk_annotations": {"anns": [{"task_desc": sentence[0].upper() + sentence[1:] + "."}]},
                "split": split,
                "generator": {"seed": seed, "index": index, "attempt": attempt, **dataclasses.asdict(config)},
            },
        )
        return game_path
    raise UnsolvableGame(f"game {index} (seed {seed}, {task_type}): no solvable layout in 20 attempts")


def _generate_one(args: tuple) -> str:
    return generate_game(*args)


def generate_games(
    out_dir: str,
    num_games: int,
    seed: int = 0,
    task_types: Sequence[str] = TASK_TYPES,
    split: str = "train",
    config: GeneratorConfig = GeneratorConfig(),
    workers: int = 1,
    progress: bool = True,
) -> list[str]:
    """Generate `num_games` games under `out_dir/<split>/`; return their game.tw-pddl paths.

    Task types are used round-robin, so each gets `num_games / len(task_types)` games.
    """
    require_engine()
    task_types = tuple(task_types)
    for task_type in task_types:
        task_candidates(task_type, split)  # validates names and split early
    jobs = [(out_dir, i, seed, task_types, split, config) for i in range(num_games)]
    from tqdm.auto import tqdm

    bar = tqdm(total=num_games, desc=f"generating {split} games", disable=not progress)
    paths = []
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            for path in pool.map(_generate_one, jobs):
                paths.append(path)
                bar.update()
    else:
        for job in jobs:
            paths.append(_generate_one(job))
            bar.update()
    bar.close()
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="output directory (games go to OUT/<split>/...)")
    parser.add_argument("--num-games", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task-types", nargs="+", default=list(TASK_TYPES), choices=TASK_TYPES)
    parser.add_argument("--split", default="train", choices=SPLITS)
    parser.add_argument("--max-receptacles", type=int, default=GeneratorConfig.max_receptacles)
    parser.add_argument("--max-distractors", type=int, default=GeneratorConfig.max_distractors)
    parser.add_argument("--workers", type=int, default=1, help="processes generating in parallel")
    args = parser.parse_args(argv)
    config = GeneratorConfig(args.max_receptacles, args.max_distractors)
    paths = generate_games(
        args.out, args.num_games, args.seed, args.task_types, args.split, config, args.workers
    )
    counts = Counter(path.split(os.sep)[-3].split("-")[0] for path in paths)
    for task_type, count in sorted(counts.items()):
        print(f"{task_type}: {count}")
    print(f"wrote {len(paths)} games to {os.path.join(args.out, args.split)}", file=sys.stderr)


if __name__ == "__main__":
    main()
