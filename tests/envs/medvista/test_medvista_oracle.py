"""Oracle, fixed detector, demonstrations, episode figure, and batched stepping in EnvPool."""

import json
import os

import gymnasium
import numpy as np
import pytest

import hiper_envs  # noqa: F401 - registers the ids
from hiper_envs.medvista import imaging, oracle
from hiper_envs.medvista.figure import episode_figure
from hiper_jax.agent.demos import demo_turns, read_demos
from hiper_jax.agent.prompts import PromptConfig
from hiper_jax.rollout.env_pool import EnvPool, GymFactory


@pytest.fixture()
def env(synth_dir):
    return gymnasium.make("hiper/MedVista-v0", data_dir=synth_dir, split="test").unwrapped


def test_oracle_wins_every_question_within_the_budget(env):
    for index in range(len(env.items)):
        record = oracle.play_oracle_episode(env, index)
        assert record["won"] and record["num_turns"] <= env.tool_budget + 1
        assert record["turns"][-1]["action"].startswith("answer[")


def test_oracle_zooms_reach_every_finding_it_needs(env):
    quadrants = list(imaging.quadrant_boxes().values())
    for item in env.items:
        zooms = [box for box, _ in oracle.oracle_zooms(item, 4)]
        if item.question_type == "count" or (item.question_type == "presence" and not item.regions):
            assert zooms == quadrants
        if item.question_type in ("location", "size"):
            for region in item.regions:
                centre = ((region.box[0] + region.box[2]) / 2, (region.box[1] + region.box[3]) / 2)
                assert any(oracle._inside(centre, box) for box in zooms)
        if item.question_type == "region":
            assert zooms == [item.focus]


def test_demonstrations_follow_the_plan_execute_schema(env, tmp_path):
    path = str(tmp_path / "demos.jsonl")
    summary = oracle.write_demos(env, path, episodes=6, progress=False)
    assert summary["episodes"] == 6 and summary["won"] == 6
    episodes = read_demos(path)
    assert len(episodes) == 6 and all(e["env"] == "medvista" for e in episodes)
    turns = list(demo_turns(episodes, PromptConfig()))
    assert len(turns) == sum(e["num_turns"] for e in episodes)
    first = episodes[0]["turns"]
    assert first[0]["switch"] == "SWITCH" and first[-1]["subgoal"] == oracle.SUBGOAL_ANSWER
    assert all(len(t["image_boxes"]) == k + 1 for k, t in enumerate(first))


def _disc_image(size=512, radius=2.5, x=100.5, y=140.5):
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    image = np.full((size, size), 120.0)
    image += 60 * np.clip(radius + 0.5 - np.hypot(xx - x, yy - y), 0, 1)
    return imaging.as_rgb(np.clip(image, 0, 255).astype(np.uint8))


def test_detector_finds_a_small_finding_only_when_zoomed():
    source = _disc_image()
    full = imaging.letterbox(source, 224)
    zoomed = imaging.letterbox(imaging.crop(source, (0, 0, 500, 500)), 224)
    assert oracle.detect_in_views([(full, (0.0, 0.0, 1000.0, 1000.0))], source.shape[:2]) == []
    found = oracle.detect_in_views([(full, (0.0, 0.0, 1000.0, 1000.0)), (zoomed, (0, 0, 500, 500))], source.shape[:2])
    assert len(found) == 1
    assert found[0].x == pytest.approx(100.5 / 512 * 1000, abs=4) and found[0].y == pytest.approx(140.5 / 512 * 1000, abs=4)
    assert found[0].area == pytest.approx(np.pi * 2.5 ** 2, rel=0.6)


def test_view_to_full_inverts_the_letterbox():
    x, y, px = oracle.view_to_full(112.0, 112.0, (0, 0, 1000, 500), (100, 200), 224)
    assert (x, y) == pytest.approx((500.0, 250.0)) and px == pytest.approx(200 / 224)


def test_episode_figure_is_written(env, tmp_path):
    env.reset(options={"index": 0})
    env.step("zoom[0, 0, 500, 500]")
    path = episode_figure(env.images, ["full", "zoom"], env.item.question, "answer: yes",
                          str(tmp_path / "episode.png"), boxes=env.image_boxes[1:])
    assert os.path.getsize(path) > 1000


def test_env_pool_steps_medvista_with_images(synth_dir):
    factory = GymFactory("hiper_envs:hiper/MedVista-v0", data_dir=synth_dir, split="test", info_images="new")
    local = gymnasium.make("hiper/MedVista-v0", data_dir=synth_dir, split="test").unwrapped
    pool = EnvPool(factory, num_envs=2, envs_per_worker=1)
    try:
        first = pool.reset(seeds=[0, 1], options=[{"index": 0}, {"index": 1}])
        results = pool.step(["zoom[0, 0, 500, 500]", "contrast[low]"])
    finally:
        pool.close()
    for k, ((_, info), result, action) in enumerate(zip(first, results, ["zoom[0, 0, 500, 500]", "contrast[low]"])):
        local.reset(options={"index": k})
        expected = local.step(action)[4]["images"]
        assert np.array_equal(info["new_images"][0], expected[0])
        assert np.array_equal(result.info["new_images"][0], expected[1])
