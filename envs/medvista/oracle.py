"""The MedVista oracle, a fixed threshold detector, and Plan-Execute demonstrations (JSONL).

    python -m hiper_envs.medvista.oracle --out demos.jsonl [--split train] [--data-dir DIR]

The oracle knows the findings (the item's regions) and the answer. It zooms where the answer
is to be seen, then answers:
- a question about one region ("... in the upper left of the image?"): zoom that region;
- presence, location, size on the generated data: scan the quadrants in reading order until
  every finding the answer depends on has been seen (all four when there is none);
- count: scan all four quadrants;
- a question naming a region of SLAKE's detection boxes ("... the liver ..."): zoom it;
- anything else: answer at once.

Each demonstration line follows the schema of `hiper_jax.agent.demos` (and adds
``image_path``, ``dataset`` and per turn ``image_boxes``, the 0-1000 box of every image the
agent had seen, so a vision-language warm start can re-render the views):

    {"env": "medvista", "game": qid, "task_type": ..., "task": question, "won": bool,
     "num_turns": N, "image_path": ..., "dataset": ..., "answer_type": ...,
     "turns": [{"observation": ..., "admissible_actions": [...], "switch": "SWITCH"|"KEEP",
                "subgoal": "scan the quadrants for lesions", "action": "zoom[0, 0, 500, 500]",
                "reward": 0.0, "done": false, "image_boxes": [[0, 0, 1000, 1000]]}, ...]}

The subgoal of a zoom is what it inspects ("scan the quadrants for lesions", "inspect the
upper left of the image"); the last turn's is "answer the question". A turn is SWITCH when
its subgoal differs from the previous turn's (the first turn always is).

`detect_pixels` / `detect_in_views` are the fixed detector of the with/without-zoom
measurement: a white top-hat (the image minus its grey opening) thresholded, connected
components kept when compact and of a size in pixels of the image it looks at.
`detector_answer` answers the generated questions from its detections.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from hiper_envs.medvista import imaging
from hiper_envs.medvista.schema import VQAItem

SWITCH, KEEP = "SWITCH", "KEEP"
SUBGOAL_SCAN = "scan the quadrants for lesions"
SUBGOAL_ANSWER = "answer the question"
SCAN_TYPES = ("presence", "location", "size")


# --- the oracle's plan -----------------------------------------------------------------------
def _inside(point: tuple[float, float], box: imaging.Box) -> bool:
    return box[0] <= point[0] < box[2] and box[1] <= point[1] < box[3]


def _center(box: imaging.Box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def _region_label(box: imaging.Box) -> str:
    for name, cell in {**imaging.grid_boxes(), **imaging.quadrant_boxes()}.items():
        if tuple(float(v) for v in cell) == tuple(float(v) for v in box):
            return f"the {name} of the image"
    return f"zoom[{imaging.format_box(box)}]"


def oracle_zooms(item: VQAItem, budget: int) -> list[tuple[imaging.Box, str]]:
    """The oracle's zooms `[(box, subgoal)]` for `item` (at most `budget`), in order."""
    if item.focus is not None:
        return [(item.focus, f"inspect {_region_label(item.focus)}")][:budget]
    quadrants = list(imaging.quadrant_boxes().values())
    centers = [_center(r.box) for r in item.regions]
    if item.dataset == "medvista-synth" and item.question_type in SCAN_TYPES + ("count",):
        needed = [max((k for k, q in enumerate(quadrants) if _inside(c, q)), default=3) for c in centers]
        last = 3 if item.question_type == "count" or not needed else (
            min(needed) if item.question_type == "presence" else max(needed))
        return [(q, SUBGOAL_SCAN) for q in quadrants[: last + 1]][:budget]
    question = item.question.lower()
    named = [r for r in item.regions if r.name.lower() in question]
    return [(_padded(r.box), f"inspect the {r.name.lower()}") for r in named][:budget]


def _padded(box: imaging.Box, pad: float = 0.15) -> imaging.Box:
    """`box` grown by `pad` of its size on each side (kept inside 0-1000, at least 10 wide)."""
    w, h = box[2] - box[0], box[3] - box[1]
    x1, y1 = max(0.0, box[0] - pad * w), max(0.0, box[1] - pad * h)
    x2, y2 = min(1000.0, box[2] + pad * w), min(1000.0, box[3] + pad * h)
    return (round(x1), round(y1), max(round(x2), round(x1) + 10), max(round(y2), round(y1) + 10))


def zoom_action(box: imaging.Box) -> str:
    return f"zoom[{imaging.format_box(box)}]"


def answer_action(answer: str) -> str:
    return f"answer[{answer}]"


# --- episodes --------------------------------------------------------------------------------
def play_oracle_episode(env: Any, index: int) -> dict:
    """One oracle episode on question `index` of the env's split: the demonstration record."""
    env = env.unwrapped
    observation, info = env.reset(options={"index": index})
    item = env.item
    plan = [(zoom_action(box), subgoal) for box, subgoal in oracle_zooms(item, env.tool_budget)]
    plan.append((answer_action(item.answer), SUBGOAL_ANSWER))
    turns: list[dict] = []
    for action, subgoal in plan:
        boxes = [list(b) for b in info["image_boxes"]]
        next_observation, reward, terminated, truncated, next_info = env.step(action)
        turns.append({"observation": observation, "admissible_actions": info["admissible_actions"],
                      "switch": SWITCH if not turns or turns[-1]["subgoal"] != subgoal else KEEP,
                      "subgoal": subgoal, "action": action, "reward": float(reward),
                      "done": bool(terminated or truncated), "image_boxes": boxes})
        observation, info = next_observation, next_info
        if terminated or truncated:
            break
    return {"env": "medvista", "game": item.qid, "task_type": item.question_type, "task": item.question,
            "won": bool(info["won"]), "num_turns": len(turns), "image_path": item.image_path,
            "dataset": item.dataset, "answer_type": item.answer_type, "turns": turns}


def write_demos(env: Any, path: str, episodes: int | None = None, progress: bool = True) -> dict:
    """Oracle demonstrations of the env's split (the first `episodes` questions, or all)."""
    env = env.unwrapped
    count = len(env.items) if episodes is None else min(episodes, len(env.items))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    won, turns = 0, 0
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for index in tqdm(range(count), desc="oracle demos", disable=not progress):
            record = play_oracle_episode(env, index)
            won += record["won"]
            turns += record["num_turns"]
            f.write(json.dumps(record) + "\n")
    os.replace(path + ".tmp", path)
    return {"episodes": count, "won": won, "mean_turns": turns / max(count, 1)}


# --- the fixed detector ----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DetectorConfig:
    """Thresholds in 8-bit gray levels and pixels of the image the detector looks at."""

    threshold: float = 30.0  # top-hat response a pixel needs
    opening_px: int = 7  # grey-opening window: brighter structures narrower than this respond
    min_area_px: int = 8
    max_area_px: int = 80
    max_aspect: float = 2.0  # bounding box long/short side
    min_fill: float = 0.5  # component area / bounding box area


@dataclasses.dataclass(frozen=True)
class Detection:
    """A detected blob: centre in 0-1000 full-image coordinates, area in source pixels."""

    x: float
    y: float
    area: float


def detect_pixels(view: np.ndarray, config: DetectorConfig = DetectorConfig()) -> list[tuple[float, float, float]]:
    """Blobs of a `[S, S, 3]` uint8 view: `[(u, v, area)]` in its pixels (u right, v down)."""
    gray = view[:, :, 0].astype(np.float32)
    size = config.opening_px
    tophat = gray - ndimage.grey_opening(gray, size=(size, size))
    labels, _ = ndimage.label(tophat > config.threshold)
    found = []
    for k, window in enumerate(ndimage.find_objects(labels), start=1):
        mask = labels[window] == k
        area = int(mask.sum())
        h, w = mask.shape
        if not config.min_area_px <= area <= config.max_area_px:
            continue
        if max(h, w) > config.max_aspect * min(h, w) or area < config.min_fill * h * w:
            continue
        rows, cols = np.nonzero(mask)
        found.append((window[1].start + cols.mean() + 0.5, window[0].start + rows.mean() + 0.5, float(area)))
    return found


def view_to_full(u: float, v: float, box: imaging.Box, source_hw: tuple[int, int], size: int) -> tuple[float, float, float]:
    """Map a view pixel (u, v) of the letterboxed `box` view back to 0-1000 full-image
    coordinates; also returns source pixels per view pixel."""
    height, width = source_hw
    p = imaging.to_pixels(box, height, width)
    crop_w, crop_h = p.right - p.left, p.bottom - p.top
    scale = size / max(crop_w, crop_h)
    new_w, new_h = max(1, round(crop_w * scale)), max(1, round(crop_h * scale))
    left, top = (size - new_w) // 2, (size - new_h) // 2
    x_px = p.left + (u - left) * crop_w / new_w
    y_px = p.top + (v - top) * crop_h / new_h
    return x_px / width * imaging.COORD_MAX, y_px / height * imaging.COORD_MAX, crop_w / new_w


def detect_in_views(views: Sequence[tuple[np.ndarray, imaging.Box]], source_hw: tuple[int, int],
                    config: DetectorConfig = DetectorConfig()) -> list[Detection]:
    """Detections over views `[(image [S, S, 3], box)]`: each zoom's own, plus the full view's
    outside every zoomed box; duplicates closer than 2% of the image merged."""
    zoom_boxes = [box for _, box in views if tuple(box) != (0.0, 0.0, 1000.0, 1000.0)]
    found: list[Detection] = []
    for image, box in views:
        is_full = tuple(box) == (0.0, 0.0, 1000.0, 1000.0)
        for u, v, area in detect_pixels(image, config):
            x, y, px = view_to_full(u, v, box, source_hw, image.shape[0])
            if is_full and any(_inside((x, y), z) for z in zoom_boxes):
                continue
            if any(np.hypot(x - d.x, y - d.y) < 20 for d in found):
                continue
            found.append(Detection(x, y, area * px * px))
    return found


def detector_answer(item: VQAItem, detections: Sequence[Detection]) -> str:
    """The answer to a generated question (`synth.QUESTION_TYPES`) the detections imply."""
    kind = item.question_type
    if kind == "presence":
        return "yes" if detections else "no"
    if kind == "region":
        return "yes" if any(_inside((d.x, d.y), item.focus) for d in detections) else "no"
    if kind == "count":
        return str(len(detections))
    if kind == "location":
        if not detections:
            return "center"
        best = max(detections, key=lambda d: d.area)
        return imaging.region_of(best.x, best.y)
    if kind == "size":
        if len(detections) < 2:
            return "left"
        a, b = sorted(sorted(detections, key=lambda d: d.area)[-2:], key=lambda d: d.x)
        return "left" if a.area > b.area else "right"
    raise ValueError(f"the detector answers only generated questions, not {kind!r} ({item.qid})")


def play_detector_episode(env: Any, index: int, zoom: bool,
                          config: DetectorConfig = DetectorConfig()) -> dict:
    """The detector answers question `index`, from the full view alone or after the oracle's
    zooms; `{"score", "won", "question_type", "tools"}`."""
    env = env.unwrapped
    _, info = env.reset(options={"index": index})
    tools = 0
    if zoom:
        for box, _ in oracle_zooms(env.item, env.tool_budget):
            _, _, _, _, info = env.step(zoom_action(box))
            tools += 1
    views = list(zip(env.images, env.image_boxes))
    detections = detect_in_views(views, env.source.shape[:2], config)
    _, reward, _, _, info = env.step(answer_action(detector_answer(env.item, detections)))
    return {"score": info["score"], "won": info["won"], "question_type": env.item.question_type, "tools": tools}


def detector_accuracy(env: Any, indices: Iterable[int], config: DetectorConfig = DetectorConfig(),
                      progress: bool = False) -> dict[str, dict[str, float]]:
    """Mean score per question type (and "all") without and with the oracle's zooms."""
    out: dict[str, dict[str, float]] = {}
    indices = list(indices)
    for zoom in (False, True):
        scores: dict[str, list[float]] = {}
        for index in tqdm(indices, desc=f"detector zoom={zoom}", disable=not progress):
            result = play_detector_episode(env, index, zoom, config)
            scores.setdefault(result["question_type"], []).append(result["score"])
            scores.setdefault("all", []).append(result["score"])
        out["zoom" if zoom else "no_zoom"] = {k: float(np.mean(v)) for k, v in scores.items()}
        out["count"] = {k: float(len(v)) for k, v in scores.items()}
    return out


def main(argv: Sequence[str] | None = None) -> None:
    import gymnasium

    import hiper_envs  # noqa: F401 - registers the ids

    parser = argparse.ArgumentParser(description="Write MedVista oracle demonstrations (JSONL).")
    parser.add_argument("--out", required=True)
    parser.add_argument("--split", default="train", choices=("train", "validate", "test"))
    parser.add_argument("--data-dir", default=None, help="official or generated data (default: generated)")
    parser.add_argument("--episodes", type=int, default=None)
    args = parser.parse_args(argv)
    env = gymnasium.make("hiper/MedVista-v0", data_dir=args.data_dir, split=args.split)
    print(json.dumps(write_demos(env, args.out, args.episodes)))


if __name__ == "__main__":
    main()
