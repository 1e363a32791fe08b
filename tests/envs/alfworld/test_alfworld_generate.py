"""Game generator: every task type, ALFRED's rules, reproducibility, disjoint splits, solvability."""

import collections
import filecmp
import json
import os
import re

import alfworld.gen.constants as constants
import pytest
from alfworld.gen import goal_library
from hiper_envs.alfworld import generate as gen
from hiper_envs.alfworld.games import find_games, read_game_info


def _facts(problem: str) -> list[tuple[str, ...]]:
    init = problem.split("(:init", 1)[1].split("(:goal", 1)[0]
    return [tuple([name.lower()] + args.split()) for name, args in re.findall(r"\((\w+) ([^()]*)\)", init)]


def _type_of(facts, predicate: str) -> dict[str, str]:
    return {args[0]: args[1][: -len("type")] for name, *args in facts if name == predicate}


def _load(gamefile):
    with open(gamefile) as f:
        return json.load(f)


def test_every_task_type_is_generated_and_loads(train_games):
    by_type = collections.Counter(read_game_info(g).task_type for g in train_games)
    assert by_type == {t: 2 for t in gen.TASK_TYPES}
    for gamefile in train_games:
        game = _load(gamefile)
        assert set(game) == {"pddl_domain", "grammar", "pddl_problem", "solvable", "walkthrough"}
        assert game["solvable"] is True and game["walkthrough"]
        assert "UNKNOWN GOAL" not in game["grammar"]
        traj = _load(os.path.join(os.path.dirname(gamefile), "traj_data.json"))
        assert traj["pddl_params"]["mrecep_target"] == "" and traj["pddl_params"]["object_sliced"] is False
        assert traj["scene"]["floor_plan"] == f"FloorPlan{traj['scene']['scene_num']}"


def test_games_follow_alfred_rules(train_games):
    heatable, coolable, cleanable = (
        constants.VAL_ACTION_OBJECTS[k] for k in ("Heatable", "Coolable", "Cleanable")
    )
    for gamefile in train_games:
        info = read_game_info(gamefile)
        params, task_type = info.pddl_params, info.task_type
        problem = _load(gamefile)["pddl_problem"]
        facts = _facts(problem)
        object_types = _type_of(facts, "objecttype")
        receptacle_types = _type_of(facts, "receptacletype")
        type_names = {t.lower(): t for t in constants.OBJECTS}
        for _, obj, receptacle in (f for f in facts if f[0] == "inreceptacle"):
            otype, rtype = (
                type_names[object_types[obj].lower()],
                type_names[receptacle_types[receptacle].lower()],
            )
            if otype in ("DeskLamp", "FloorLamp"):
                continue
            assert otype in constants.VAL_RECEPTACLE_OBJECTS[rtype], (gamefile, otype, rtype)
            if otype == params["object_target"]:
                assert rtype != params["parent_target"], "the target must not start in place"
        assert {f[1] for f in facts if f[0] == "openable"} == {
            r for r, t in receptacle_types.items() if type_names[t.lower()] in constants.OPENABLE_CLASS_SET
        }
        assert not [
            f for f in facts if f[0] in ("opened", "holds", "isclean", "ishot", "iscool", "istoggled")
        ]
        start = next(f[2] for f in facts if f[0] == "atlocation")
        assert not [f for f in facts if f[0] == "receptacleatlocation" and f[2] == start]
        locations = [f[2] for f in facts if f[0] == "receptacleatlocation"]
        assert len(locations) == len(set(locations)), "one receptacle per location"
        obj = params["object_target"]
        assert {
            "pick_heat_then_place_in_recep": heatable,
            "pick_cool_then_place_in_recep": coolable,
            "pick_clean_then_place_in_recep": cleanable,
        }.get(task_type, {obj}) >= {obj}
        goal = goal_library.gdict[task_type]["pddl"].format(
            obj=obj, recep=params["parent_target"], toggle=params["toggle_target"], mrecep=""
        )
        assert problem.endswith(goal.replace("#", "-"))
        sentence = re.search(r"Your task is to: (.*?)\.\"", _load(gamefile)["grammar"]).group(1)
        templates = goal_library.gdict[task_type]["templates"]
        fills = dict(
            obj=obj.lower(),
            recep=params["parent_target"].lower(),
            toggle=params["toggle_target"].lower(),
            mrecep="",
        )
        assert sentence in [t.format(**fills) for t in templates]


@pytest.mark.parametrize("max_receptacles, max_distractors, most", [(4, 1, 4), (1, 0, 3)])
def test_scene_size_is_configurable(tmp_path, max_receptacles, max_distractors, most):
    config = gen.GeneratorConfig(max_receptacles=max_receptacles, max_distractors=max_distractors)
    paths = gen.generate_games(str(tmp_path), 6, seed=3, config=config, progress=False)
    for gamefile in paths:
        facts = _facts(_load(gamefile)["pddl_problem"])
        target = read_game_info(gamefile).pddl_params["object_target"].lower()
        assert len(_type_of(facts, "receptacletype")) <= most  # the task's own need up to 3
        types = {t.lower() for t in _type_of(facts, "objecttype").values()}
        assert len(types - {target, "desklamp", "floorlamp"}) <= max_distractors
    with pytest.raises(ValueError, match="max_receptacles"):
        gen.GeneratorConfig(max_receptacles=0)


def test_generation_is_reproducible_by_seed(tmp_path):
    first = gen.generate_games(str(tmp_path / "a"), 3, seed=21, progress=False)
    again = gen.generate_games(str(tmp_path / "b"), 3, seed=21, progress=False)
    other = gen.generate_games(str(tmp_path / "c"), 3, seed=22, progress=False)
    for a, b in zip(first, again):
        assert os.path.relpath(a, tmp_path / "a") == os.path.relpath(b, tmp_path / "b")
        for name in ("game.tw-pddl", "traj_data.json"):
            assert filecmp.cmp(
                os.path.join(os.path.dirname(a), name), os.path.join(os.path.dirname(b), name), shallow=False
            )
    assert [_load(a)["pddl_problem"] for a in first] != [_load(c)["pddl_problem"] for c in other]


def test_train_and_eval_splits_share_no_triple(games_root):
    for task_type in gen.TASK_TYPES:
        train = {spec.triple for spec in gen.task_candidates(task_type, "train")}
        evals = {spec.triple for spec in gen.task_candidates(task_type, "eval")}
        assert train and evals and not train & evals
    for gamefile in find_games(str(games_root / "eval")):
        traj = _load(os.path.join(os.path.dirname(gamefile), "traj_data.json"))
        triple = (traj["scene"]["scene_num"], traj["task_type"], traj["pddl_params"]["object_target"])
        assert traj["split"] == "eval" and gen.split_of(*triple) == "eval"


def test_all_rooms_and_task_rules_are_covered():
    rooms = collections.defaultdict(set)
    for task_type in gen.TASK_TYPES:
        for spec in gen.task_candidates(task_type, "train"):
            rooms[task_type].add(gen.scn.room_of(spec.scene_num))
    assert rooms == {t: set(constants.GOALS_VALID[t]) for t in gen.TASK_TYPES}
    heat_targets = {
        spec.parent_target for spec in gen.task_candidates("pick_heat_then_place_in_recep", "train")
    }
    assert "Microwave" not in heat_targets and "CounterTop" in heat_targets
    lamps = {spec.toggle_target for spec in gen.task_candidates("look_at_obj_in_light", "train")}
    assert lamps == {"DeskLamp", "FloorLamp"}


def test_solvability_check_rejects_a_game_without_a_solution(train_games, tmp_path):
    game = _load(train_games[0])
    target = read_game_info(train_games[0]).pddl_params["object_target"].lower()
    lines = game["pddl_problem"].split("\n")
    # Nothing of the target type can be picked up any more.
    broken = [line for line in lines if not line.lower().startswith(f"(pickupable {target}_bar_")]
    assert len(broken) < len(lines)
    os.makedirs(tmp_path / "t")
    path = tmp_path / "t" / "game.tw-pddl"
    path.write_text(json.dumps({**game, "pddl_problem": "\n".join(broken)}))
    with pytest.raises(gen.UnsolvableGame):
        gen.check_solvable(str(path))


def test_cli_writes_games(tmp_path, capsys):
    gen.main(
        [
            "--out",
            str(tmp_path),
            "--num-games",
            "2",
            "--seed",
            "4",
            "--task-types",
            "pick_two_obj_and_place",
            "--split",
            "eval",
        ]
    )
    assert len(find_games(str(tmp_path / "eval"))) == 2
    assert "pick_two_obj_and_place: 2" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        gen.main(["--out", str(tmp_path), "--num-games", "1", "--task-types", "no_such_task"])
