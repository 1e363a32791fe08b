"""The gymnasium env: contract, tools, budget, scoring, robustness to any action string."""

import random
import string

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import hiper_envs  # noqa: F401 - registers the ids
from hiper_envs.medvista import imaging
from hiper_envs.medvista.env import ANSWER_PLACEHOLDER, read_image

INFO_KEYS = {"admissible_actions", "invalid", "won", "task", "task_type", "answer_type", "dataset",
             "qid", "images", "new_images", "image_boxes", "tool_calls_left", "num_turns"}


@pytest.fixture()
def env(synth_dir):
    return gymnasium.make("hiper/MedVista-v0", data_dir=synth_dir, split="train").unwrapped


def test_reset_shows_the_question_and_the_full_image(env):
    observation, info = env.reset(options={"index": 0})
    assert set(info) >= INFO_KEYS
    assert env.item.question in observation and info["task"] == env.item.question
    assert info["dataset"] == "medvista-synth" and info["answer_type"] in ("closed", "open")
    assert len(info["images"]) == 1 and info["images"][0].shape == (224, 224, 3)
    assert info["images"][0].dtype == np.uint8 and info["image_boxes"] == [(0.0, 0.0, 1000.0, 1000.0)]
    expected = imaging.letterbox(read_image(env.item.image_path), 224)
    assert np.array_equal(info["images"][0], expected)
    assert "reference_answer" not in info and not info["won"] and not info["invalid"]
    zooms = [a for a in info["admissible_actions"] if a.startswith("zoom[")]
    assert len(zooms) == 13 and "zoom[0, 0, 333, 333]" in zooms and "zoom[500, 500, 1000, 1000]" in zooms
    answers = [a for a in info["admissible_actions"] if a.startswith("answer[")]
    assert answers == [f"answer[{c}]" for c in env.item.candidates]


def test_zoom_returns_the_crop_at_the_input_size(env):
    env.reset(options={"index": 0})
    _, reward, terminated, truncated, info = env.step("zoom[250, 100, 750, 600]")
    assert (reward, terminated, truncated, info["invalid"]) == (0.0, False, False, False)
    source = read_image(env.item.image_path)
    expected = imaging.letterbox(np.ascontiguousarray(source[51:308, 128:384]), 224)
    assert np.array_equal(info["images"][1], expected)
    assert len(info["new_images"]) == 1 and info["new_images"][0] is info["images"][1]
    assert info["image_boxes"][1] == (250.0, 100.0, 750.0, 600.0) and info["tool_calls_left"] == 3


def test_contrast_windows_the_current_view_and_later_zooms(env):
    env.reset(options={"index": 0})
    env.step("zoom[0, 0, 500, 500]")
    _, _, _, _, info = env.step("contrast[high]")
    source = read_image(env.item.image_path)
    windowed = imaging.apply_window(source[:256, :256], *imaging.WINDOWS["high"])
    assert np.array_equal(info["images"][2], imaging.letterbox(windowed, 224))
    _, _, _, _, info = env.step("contrast[100, 50]")
    assert np.array_equal(info["images"][3], imaging.letterbox(imaging.apply_window(source[:256, :256], 100, 50), 224))
    _, _, _, _, info = env.step("zoom[500, 500, 1000, 1000]")
    assert np.array_equal(info["images"][4], imaging.letterbox(imaging.apply_window(source[256:, 256:], 100, 50), 224))


def test_correct_and_wrong_answers(env):
    _, info = env.reset(options={"index": 0})
    _, reward, terminated, truncated, info = env.step(f"answer[ {env.item.answer.upper()} ]")
    assert (reward, terminated, truncated, info["won"], info["score"]) == (1.0, True, False, True, 1.0)
    assert info["reference_answer"] == env.item.answer
    observation, reward, terminated, _, info = env.step("answer[yes]")
    assert info["invalid"] and terminated and reward == 0.0 and "over" in observation
    env.reset(options={"index": 0})
    wrong = next(c for c in env.item.candidates if c != env.item.answer)
    _, reward, terminated, _, info = env.step(f"answer[{wrong}]")
    assert reward == 0.0 and terminated and not info["won"] and info["exact_match"] is False


def test_budget_and_truncation(env):
    env.reset(options={"index": 0})
    for k in range(4):
        _, _, _, truncated, info = env.step("zoom[0, 0, 500, 500]")
        assert not info["invalid"] and not truncated
    assert not any(a.startswith(("zoom", "contrast")) for a in info["admissible_actions"])
    observation, reward, terminated, truncated, info = env.step("zoom[0, 0, 500, 500]")
    assert info["invalid"] and "no tool calls left" in observation
    assert truncated and not terminated and reward == 0.0 and info["reference_answer"] == env.item.answer


def test_shaping_is_off_by_default_and_adds_when_asked(synth_dir):
    env = gymnasium.make("hiper/MedVista-v0", data_dir=synth_dir, format_bonus=0.1, tool_bonus=0.2).unwrapped
    env.reset(options={"index": 0})
    env.step("zoom[0, 0, 500, 500]")
    _, reward, _, _, _ = env.step(f"answer[{env.item.answer}]")
    assert reward == pytest.approx(1.3)
    env.reset(options={"index": 0})
    env.step("zoom[0, 0]")
    _, reward, _, _, _ = env.step(f"answer[{env.item.answer}]")
    assert reward == pytest.approx(1.0)


def test_open_questions_without_candidates_offer_a_placeholder(env):
    env.reset(options={"index": 0})
    env.item = type(env.item)(**{**env.item.__dict__, "candidates": ()})
    assert env._admissible()[-1] == ANSWER_PLACEHOLDER


@pytest.mark.parametrize("action, fragment", [
    ("zoom[0, 0, 2000, 500]", "0-1000"), ("zoom[a, b, c, d]", "four numbers"), ("zoom[500, 0, 400, 10]", "x1 < x2"),
    ("contrast[purple]", "level"), ("contrast[100, 0]", "width"), ("answer[  ]", "answer text"),
    ("look[1]", "unknown tool"), ("say yes", "Invalid action")])
def test_invalid_actions_explain_and_change_nothing(env, action, fragment):
    env.reset(options={"index": 0})
    observation, reward, terminated, truncated, info = env.step(action)
    assert fragment in observation and info["invalid"] and reward == 0.0 and not terminated
    assert len(info["images"]) == 1 and info["tool_calls_left"] == 4


def test_info_images_new_sends_each_image_once(synth_dir):
    full = gymnasium.make("hiper/MedVista-v0", data_dir=synth_dir).unwrapped
    lean = gymnasium.make("hiper/MedVista-v0", data_dir=synth_dir, info_images="new").unwrapped
    _, a = full.reset(options={"index": 1})
    _, b = lean.reset(options={"index": 1})
    assert "images" not in b
    rebuilt = list(b["new_images"])
    for action in ("zoom[0, 0, 500, 500]", "bad", "contrast[low]"):
        a = full.step(action)[4]
        rebuilt += lean.step(action)[4]["new_images"]
    assert len(rebuilt) == len(a["images"]) == 3
    assert all(np.array_equal(x, y) for x, y in zip(rebuilt, a["images"]))


def test_reset_is_reproducible_by_seed(env):
    first = [env.reset(seed=5)[1]["qid"]] + [env.reset()[1]["qid"] for _ in range(5)]
    second = [env.reset(seed=5)[1]["qid"]] + [env.reset()[1]["qid"] for _ in range(5)]
    assert first == second and len(set(first)) > 1
    assert env.reset(options={"qid": first[3]})[1]["qid"] == first[3]


def test_gymnasium_env_checker_passes(synth_dir):
    check_env(gymnasium.make("hiper/MedVista-v0", data_dir=synth_dir).unwrapped, skip_render_check=True)


def test_bad_constructor_arguments_are_rejected(synth_dir):
    with pytest.raises(ValueError, match="split"):
        gymnasium.make("hiper/MedVista-v0", data_dir=synth_dir, split="dev")
    with pytest.raises(ValueError, match="info_images"):
        gymnasium.make("hiper/MedVista-v0", data_dir=synth_dir, info_images="some")


def _fuzzed_actions(rng: random.Random, count: int):
    """Action strings: valid calls, their mutations, odd numbers, random text and bytes."""
    numbers = ["0", "1000", "500", "-1", "1e309", "nan", "inf", "3.5", ".5", "1001", "", " ", "0x10", "１"]
    tools = ["zoom", "contrast", "answer", "ZOOM", "Zoom ", "zoom_", "", "answer ", "contrast[", "["]
    for _ in range(count):
        kind = rng.random()
        if kind < 0.4:
            args = ", ".join(rng.choice(numbers) for _ in range(rng.randint(0, 6)))
            text = f"{rng.choice(tools)}[{args}]"
        elif kind < 0.6:
            text = f"{rng.choice(tools)}[{rng.choice(['low', 'mid', 'high', 'full', 'yes', 'no', '2', 'upper left'])}]"
        elif kind < 0.8:
            text = "".join(rng.choice(string.printable) for _ in range(rng.randint(0, 40)))
        else:
            text = "".join(chr(rng.randint(0, 0x2FFF)) for _ in range(rng.randint(0, 20)))
        if rng.random() < 0.2:
            position = rng.randint(0, len(text))
            text = text[:position] + rng.choice(["]", "[", ",", "\n", "\x00", "]]"]) + text[position:]
        yield text


def test_ten_thousand_fuzzed_actions_never_raise(env):
    rng = random.Random(0)
    env.reset(seed=0)
    ends = 0
    for action in _fuzzed_actions(rng, 10_000):
        observation, reward, terminated, truncated, info = env.step(action)
        assert isinstance(observation, str) and isinstance(reward, float)
        if terminated or truncated:
            ends += 1
            env.reset()
    assert ends > 100
    assert env.step(None)[4]["invalid"]  # not even a string: still an answer, never a crash
