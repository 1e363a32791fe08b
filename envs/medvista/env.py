"""`MedVistaEnv`: tool-integrated medical VQA as a gymnasium env (``hiper/MedVista-v0``).

    import gymnasium, hiper_envs  # importing hiper_envs registers the ids
    env = gymnasium.make("hiper/MedVista-v0", split="train")       # the generated default data
    obs, info = env.reset(seed=0)                  # info["images"][0]: the full image [S, S, 3]
    obs, reward, terminated, truncated, info = env.step("zoom[0, 0, 500, 500]")
    obs, reward, terminated, truncated, info = env.step("answer[yes]")

An episode is one question about one image. Actions are strings:
- ``zoom[x1, y1, x2, y2]``: a box in 0-1000 coordinates of the full image (Qwen-VL's grounding
  convention); returns the crop, letterboxed to the policy's input size `image_size`.
- ``contrast[low|mid|high|full]`` or ``contrast[center, width]``: a window on the 8-bit gray
  levels; returns the current view (the last zoom, else the full image) windowed, and later
  zooms keep the window.
- ``answer[text]``: ends the episode and is scored (see `scoring`).
Tool calls are limited to `tool_budget` (4); an episode that has not answered after
`max_turns` actions (default `tool_budget + 1`; invalid actions count) is truncated. A malformed
or out-of-range action, or a tool call with no budget left, changes nothing, returns an
observation that says what was wrong, and sets ``info["invalid"]``; no action string raises.

Observation: text (the question, then what the last action did). ``info``: ``images`` (uint8
``[S, S, 3]`` arrays: the full image first, then each tool's output; with
``info_images="new"`` only ``new_images`` is sent, the images this step added, so a pool
moves each image across processes once), ``new_images``, ``image_boxes`` (the 0-1000 box each
image shows), ``admissible_actions`` (zooms on the 3x3 grid and the 4 quadrants, the contrast
presets while tool calls are left; ``answer[c]`` for each candidate answer of the question, or
``answer[<your answer>]`` when it has none), ``won``, ``invalid``, ``task`` (the question),
``task_type`` (its question type), ``answer_type`` (closed/open), ``dataset``, ``qid``,
``modality``, ``tool_calls_left``, ``num_turns``; after an answer also ``score``,
``exact_match``, ``token_recall``, ``token_f1`` and ``reference_answer``.

Reward: `correct_reward` x the benchmark score of the answer (closed: exact match; open:
`open_metric`, token recall by default), plus optional shaping, off by default:
`format_bonus` on answering when no action of the episode was invalid, and `tool_bonus` on a
fully correct answer that used at least one tool.

Data: `data_dir` in SLAKE's, VQA-RAD's or PathVQA's official layout (`dataset="auto"` finds
which), or, by default, the generated data (`synth_images` cases from `synth_seed`), written
once per machine into `synth.default_data_dir`.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any

import gymnasium
import numpy as np
from PIL import Image

from hiper_envs.medvista import imaging, loaders, scoring, synth
from hiper_envs.medvista.schema import SPLITS, VQAItem
from hiper_envs.spaces import TextSpace

TOOL_HELP = ("Tools: zoom[x1, y1, x2, y2] magnifies a box given in 0-1000 coordinates of the full "
             "image; contrast[low|mid|high|full] or contrast[center, width] windows the gray levels; "
             "answer[text] answers and ends the episode.")
ANSWER_PLACEHOLDER = "answer[<your answer>]"
FULL_BOX: imaging.Box = (0.0, 0.0, 1000.0, 1000.0)
_ACTION = re.compile(r"^\s*([A-Za-z_]+)\s*\[(.*)\]\s*$", re.DOTALL)
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")
MAX_ACTION_ECHO = 80


@functools.lru_cache(maxsize=16)
def _items(data_dir: str, dataset: str, split: str) -> tuple[VQAItem, ...]:
    return tuple(loaders.load(data_dir, split, dataset))


@functools.lru_cache(maxsize=64)
def _read(path: str) -> tuple[np.ndarray, bool]:
    with Image.open(path) as image:
        array = np.asarray(image.convert("L") if image.mode in ("L", "I", "I;16", "F") else image.convert("RGB"))
    array = imaging.as_rgb(array)
    array.setflags(write=False)
    return array, imaging.is_gray(array)


def read_image(path: str) -> np.ndarray:
    """An image file as uint8 `[H, W, 3]` (read-only; cached per process)."""
    return _read(path)[0]


@functools.lru_cache(maxsize=256)
def _full_view(path: str, size: int) -> np.ndarray:
    """The full image letterboxed to `size` (read-only; every question on an image shares it)."""
    image, gray = _read(path)
    view = imaging.letterbox(image, size, gray)
    view.setflags(write=False)
    return view


def render_view(image_path: str, box: imaging.Box, size: int,
                window: tuple[float, float] | None = None) -> np.ndarray:
    """The image the env shows for the 0-1000 `box` of `image_path` under the gray-level
    `window` (None: none), letterboxed to `size`: uint8 `[size, size, 3]`, read-only. What a
    tool call's output is, so recorded views (a demonstration's `image_boxes`) can be re-made."""
    if tuple(float(v) for v in box) == FULL_BOX and window is None:
        return _full_view(image_path, size)
    source, gray = _read(image_path)
    view = imaging.crop(source, box)
    if window is not None:
        view = imaging.apply_window(view, *window)
    image = imaging.letterbox(view, size, gray)
    image.setflags(write=False)
    return image


def _numbers(text: str) -> list[float] | None:
    parts = [p.strip() for p in text.strip().strip("()[]").split(",")]
    if not all(_NUMBER.match(p) for p in parts):
        return None
    return [float(p) for p in parts]


def _echo(action: str) -> str:
    text = " ".join(action.split())
    return text if len(text) <= MAX_ACTION_ECHO else text[: MAX_ACTION_ECHO - 3] + "..."


def admissible_tools() -> list[str]:
    """The discrete tool calls offered: 3x3 grid zooms, quadrant zooms, contrast presets."""
    boxes = list(imaging.grid_boxes().values()) + list(imaging.quadrant_boxes().values())
    return [f"zoom[{imaging.format_box(b)}]" for b in boxes] + [
        f"contrast[{name}]" for name in imaging.WINDOWS if name != "full"]


class MedVistaEnv(gymnasium.Env[str, str]):
    """See the module docstring for actions, observations, ``info`` and reward."""

    metadata = {"render_modes": ["ansi", "rgb_array"]}

    def __init__(
        self,
        data_dir: str | None = None,
        dataset: str = "auto",
        split: str = "train",
        image_size: int = 224,
        tool_budget: int = 4,
        max_turns: int | None = None,
        open_metric: str = "recall",
        correct_reward: float = 1.0,
        format_bonus: float = 0.0,
        tool_bonus: float = 0.0,
        info_images: str = "all",
        synth_images: int = synth.SynthConfig.num_images,
        synth_seed: int = 0,
        render_mode: str | None = None,
    ):
        if split == "eval":
            split = "test"
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} (or 'eval' for test), got {split!r}")
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {image_size}")
        if tool_budget < 0:
            raise ValueError(f"tool_budget must be >= 0, got {tool_budget}")
        if open_metric not in scoring.OPEN_METRICS:
            raise ValueError(f"open_metric must be one of {scoring.OPEN_METRICS}, got {open_metric!r}")
        if info_images not in ("all", "new"):
            raise ValueError(f"info_images must be 'all' or 'new', got {info_images!r}")
        if render_mode not in (None, "ansi", "rgb_array"):
            raise ValueError(f"render_mode must be None, 'ansi' or 'rgb_array', got {render_mode!r}")
        if data_dir is None:
            config = synth.SynthConfig(num_images=synth_images, seed=synth_seed)
            data_dir = synth.default_data_dir(config)
            synth.generate(data_dir, config, progress=False)
        self.data_dir = data_dir
        self.items = _items(data_dir, dataset, split)
        if not self.items:
            raise ValueError(f"{data_dir}: split {split!r} has no questions")
        self.split = split
        self.image_size = image_size
        self.tool_budget = tool_budget
        self.max_turns = tool_budget + 1 if max_turns is None else max_turns
        if self.max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {self.max_turns}")
        self.open_metric = open_metric
        self.correct_reward = correct_reward
        self.format_bonus = format_bonus
        self.tool_bonus = tool_bonus
        self.info_images = info_images
        self.render_mode = render_mode
        self.observation_space = TextSpace()
        self.action_space = TextSpace()
        self._tools = admissible_tools()
        self.index = 0
        self.item = self.items[0]
        self._start(self.item)

    # --- episode state -----------------------------------------------------------------------
    def _start(self, item: VQAItem) -> None:
        self.item = item
        self.source, self._gray = _read(item.image_path)
        self.images: list[np.ndarray] = []
        self.image_boxes: list[imaging.Box] = []
        self.view_box: imaging.Box = FULL_BOX
        self.window: tuple[float, float] | None = None
        self.tools_used = 0
        self.num_turns = 0
        self.any_invalid = False
        self.done = False
        self.result: dict[str, Any] | None = None
        self._new: list[np.ndarray] = []
        self._observation = ""
        self._show(FULL_BOX)

    def _show(self, box: imaging.Box) -> np.ndarray:
        """Render `box` of the source (with the current window) at the input size; record it."""
        image = render_view(self.item.image_path, box, self.image_size, self.window)
        self.images.append(image)
        self.image_boxes.append(tuple(float(v) for v in box))
        self._new.append(image)
        return image

    @property
    def tool_calls_left(self) -> int:
        return self.tool_budget - self.tools_used

    # --- gymnasium API -------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """A random question of the split, or ``options={"index": i}`` / ``{"qid": "..."}``."""
        super().reset(seed=seed)
        options = options or {}
        if "qid" in options:
            matches = [i for i, item in enumerate(self.items) if item.qid == str(options["qid"])]
            if not matches:
                raise ValueError(f"no question with qid {options['qid']!r} in split {self.split!r}")
            self.index = matches[0]
        elif "index" in options:
            index = int(options["index"])
            if not 0 <= index < len(self.items):
                raise ValueError(f"index must be in [0, {len(self.items)}), got {index}")
            self.index = index
        else:
            self.index = int(self.np_random.integers(len(self.items)))
        self._start(self.items[self.index])
        height, width = self.source.shape[:2]
        observation = (f"Question: {self.item.question}\nImage 1 is the full image ({width}x{height} pixels). "
                       f"{TOOL_HELP} Tool calls left: {self.tool_calls_left}.")
        self._observation = observation
        return observation, self._info(invalid=False)

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        """Apply one action string; see the module docstring. Never raises on any string."""
        self._new = []
        if self.done:
            return (f"The episode is over; call reset(). {self._observation}", 0.0, True, False,
                    self._info(invalid=True))
        self.num_turns += 1
        text = action if isinstance(action, str) else str(action)
        reward, terminated = 0.0, False
        observation, invalid = self._act(text)
        if self.result is not None:
            terminated = True
            reward = self._reward()
        self.any_invalid |= invalid
        truncated = not terminated and self.num_turns >= self.max_turns
        if truncated:
            observation += " No turns left: the episode ends without an answer."
        self.done = terminated or truncated
        self._observation = observation
        return observation, reward, terminated, truncated, self._info(invalid=invalid)

    def _act(self, text: str) -> tuple[str, bool]:
        """(observation, invalid) of one action; updates the episode state."""
        left = f" Tool calls left: {self.tool_calls_left}."
        match = _ACTION.match(text)
        if match is None:
            return (f"Invalid action {_echo(text)!r}: write zoom[x1, y1, x2, y2], contrast[level] "
                    f"or answer[text].{left}", True)
        name, argument = match.group(1).lower(), match.group(2)
        if name == "answer":
            answer = " ".join(argument.split())
            if not answer:
                return f"Invalid action: answer[] needs the answer text.{left}", True
            self.result = scoring.score(answer, self.item.answer, self.item.answer_type, self.open_metric)
            self.result["prediction"] = answer
            verdict = "correct" if self.result["score"] >= 1.0 else (
                f"scored {self.result['score']:.2f}" if self.result["score"] > 0 else "wrong")
            return f"You answered {answer!r}: {verdict}. The reference answer is {self.item.answer!r}.", False
        if name not in ("zoom", "contrast"):
            return f"Invalid action: unknown tool {name!r}; the tools are zoom, contrast and answer.{left}", True
        if self.tool_calls_left <= 0:
            return f"Invalid action: no tool calls left ({self.tool_budget} used); answer now with answer[text].", True
        if name == "zoom":
            numbers = _numbers(argument)
            if numbers is None or len(numbers) != 4:
                return (f"Invalid zoom {_echo(text)!r}: give four numbers x1, y1, x2, y2 in 0-1000, "
                        f"e.g. zoom[0, 0, 500, 500].{left}", True)
            box = tuple(numbers)
            problem = imaging.check_box(box)
            if problem:
                return f"Invalid zoom {_echo(text)!r}: {problem}.{left}", True
            self.view_box = box
            self.tools_used += 1
            self._show(box)
            m = imaging.magnification(box, *self.source.shape[:2], self.image_size)
            return (f"Image {len(self.images)} is zoom[{imaging.format_box(box)}] of the full image, "
                    f"magnified {m:.1f}x. Tool calls left: {self.tool_calls_left}.", False)
        window = self._parse_window(argument)
        if isinstance(window, str):
            return f"Invalid contrast {_echo(text)!r}: {window}.{left}", True
        self.window = None if window == imaging.WINDOWS["full"] else window
        self.tools_used += 1
        self._show(self.view_box)
        where = "the full image" if self.view_box == FULL_BOX else f"zoom[{imaging.format_box(self.view_box)}]"
        return (f"Image {len(self.images)} is {where} with window center {window[0]:g}, width {window[1]:g}. "
                f"Tool calls left: {self.tool_calls_left}.", False)

    @staticmethod
    def _parse_window(argument: str) -> tuple[float, float] | str:
        level = argument.strip().lower()
        if level in imaging.WINDOWS:
            return imaging.WINDOWS[level]
        numbers = _numbers(argument)
        if numbers is None or len(numbers) != 2:
            return f"give a level ({', '.join(imaging.WINDOWS)}) or two numbers center, width"
        center, width = numbers
        if not (math.isfinite(center) and -255 <= center <= 510 and 1 <= width <= 510):
            return "center must lie in -255..510 and width in 1..510 (8-bit gray levels)"
        return center, width

    def _reward(self) -> float:
        value = self.correct_reward * self.result["score"]
        if self.format_bonus and not self.any_invalid:
            value += self.format_bonus
        if self.tool_bonus and self.tools_used > 0 and self.result["score"] >= 1.0:
            value += self.tool_bonus
        return float(value)

    def _admissible(self) -> list[str]:
        answers = [f"answer[{c}]" for c in self.item.candidates] or [ANSWER_PLACEHOLDER]
        return (list(self._tools) if self.tool_calls_left > 0 else []) + answers

    def _info(self, invalid: bool) -> dict[str, Any]:
        item = self.item
        info: dict[str, Any] = {
            "admissible_actions": self._admissible(),
            "invalid": bool(invalid),
            "won": bool(self.result is not None and self.result["score"] >= 1.0),
            "task": item.question,
            "task_type": item.question_type,
            "answer_type": item.answer_type,
            "dataset": item.dataset,
            "qid": item.qid,
            "index": self.index,
            "image_id": item.image_id,
            "modality": item.modality,
            "tool_calls_left": self.tool_calls_left,
            "num_turns": self.num_turns,
            "new_images": list(self._new),
            "image_boxes": list(self.image_boxes),
        }
        if self.info_images == "all":
            info["images"] = list(self.images)
        if self.result is not None:
            info.update(score=self.result["score"], exact_match=self.result["exact_match"],
                        token_recall=self.result["token_recall"], token_f1=self.result["token_f1"],
                        prediction=self.result["prediction"])
        if self.done or self.result is not None:
            info["reference_answer"] = item.answer
        return info

    def render(self) -> str | np.ndarray | None:
        if self.render_mode == "ansi":
            return self._observation
        if self.render_mode == "rgb_array":
            return np.array(self.images[-1])
        return None
