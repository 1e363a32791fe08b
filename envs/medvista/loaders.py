"""Loaders for the official layouts of SLAKE, VQA-RAD and PathVQA (and the generated default,
which is written in SLAKE's).

- SLAKE: `DIR/{train,validate,test}.json` (lists of records with `img_id`, `img_name`,
  `question`, `answer`, `q_lang`, `answer_type` OPEN/CLOSED, `content_type`, `modality`,
  `location`, `qid`) and `DIR/imgs/<img_name>` (`xmlab<N>/source.jpg`); each image folder may
  hold SLAKE's `detection.json` (`[{"name": [x, y, w, h]}, ...]`, pixels), read as regions.
  English questions only (`q_lang == "en"`). Records of the generated data carry an extra
  `medvista` object (`candidates`, `focus` box, `source`).
- VQA-RAD: `DIR/VQA_RAD Dataset Public.json` (records with `qid`, `image_name`, `question`,
  `answer`, `answer_type`, `question_type`, `phrase_type`, `image_organ`) and
  `DIR/VQA_RAD Image Folder/<image_name>`. The test split is the records whose `phrase_type`
  is `test_freeform` or `test_para`, train the rest; VQA-RAD has no validation split.
- PathVQA: `DIR/qas/{train,val,test}/{split}_qa.pkl` (lists of `{"image", "question",
  "answer"}`) and `DIR/images/{split}/<image>.jpg`; "validate" reads `val`. Questions
  answered yes/no are closed, the rest open (PathVQA's own division). The pickles are read
  with an unpickler that only builds lists, dicts and strings.

Every layout error raises `MedVistaDataError` naming the file and the field.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from collections.abc import Callable
from typing import Any

from PIL import Image

from hiper_envs.medvista import imaging
from hiper_envs.medvista.schema import SPLITS, MedVistaDataError, Region, VQAItem

VQA_RAD_JSON = "VQA_RAD Dataset Public.json"
VQA_RAD_IMAGES = "VQA_RAD Image Folder"
YES_NO = ("yes", "no")


def read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise MedVistaDataError(f"{path}: file not found") from None
    except json.JSONDecodeError as error:
        raise MedVistaDataError(f"{path}: not valid JSON ({error})") from None


def _field(record: Any, name: str, where: str, kinds: tuple = (str,), default: Any = ...) -> Any:
    if not isinstance(record, dict):
        raise MedVistaDataError(f"{where}: must be an object, got {type(record).__name__}")
    if name not in record:
        if default is not ...:
            return default
        raise MedVistaDataError(f"{where}: missing field {name!r}")
    value = record[name]
    if not isinstance(value, kinds) or isinstance(value, bool):
        expected = " or ".join(k.__name__ for k in kinds)
        raise MedVistaDataError(f"{where}: field {name!r} must be {expected}, got {type(value).__name__} {value!r:.60}")
    return value


def _answer_type(value: str, where: str) -> str:
    kind = value.strip().lower()
    if kind not in ("open", "closed"):
        raise MedVistaDataError(f"{where}: field 'answer_type' must be OPEN or CLOSED, got {value!r}")
    return kind


def _candidates(answer: str, answer_type: str) -> tuple[str, ...]:
    return YES_NO if answer_type == "closed" and answer.strip().lower() in YES_NO else ()


def _check_images(items: list[VQAItem], source: str) -> None:
    for path in sorted({item.image_path for item in items}):
        if not os.path.isfile(path):
            raise MedVistaDataError(f"{source}: image file not found: {path}")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


# --- SLAKE -----------------------------------------------------------------------------------
def _slake_regions(folder: str, image_path: str) -> tuple[Region, ...]:
    path = os.path.join(folder, "detection.json")
    if not os.path.isfile(path):
        return ()
    boxes = read_json(path)
    if not isinstance(boxes, list):
        raise MedVistaDataError(f"{path}: must be a list of {{name: [x, y, w, h]}} objects")
    width, height = Image.open(image_path).size
    regions = []
    for k, entry in enumerate(boxes):
        if not isinstance(entry, dict):
            raise MedVistaDataError(f"{path}: entry {k} must be an object {{name: [x, y, w, h]}}")
        for name, box in entry.items():
            if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
                raise MedVistaDataError(f"{path}: entry {k} field {name!r} must be [x, y, w, h], got {box!r:.60}")
            x, y, w, h = box
            s_x, s_y = imaging.COORD_MAX / width, imaging.COORD_MAX / height
            regions.append(Region(str(name), (x * s_x, y * s_y, (x + w) * s_x, (y + h) * s_y)))
    return tuple(regions)


def load_slake(data_dir: str, split: str, dataset: str = "slake") -> list[VQAItem]:
    """English questions of one SLAKE split (layout in the module docstring)."""
    _check_split(split)
    path = os.path.join(data_dir, f"{split}.json")
    records = read_json(path)
    if not isinstance(records, list):
        raise MedVistaDataError(f"{path}: must be a JSON list of question records")
    items, regions_of = [], {}
    for k, record in enumerate(records):
        where = f"{path}: record {k}"
        if _field(record, "q_lang", where, default="en") != "en":
            continue
        img_name = _field(record, "img_name", where)
        image_path = os.path.join(data_dir, "imgs", img_name)
        folder = os.path.dirname(image_path)
        if image_path not in regions_of:
            if not os.path.isfile(image_path):
                raise MedVistaDataError(f"{where}: field 'img_name' names a missing image {image_path}")
            regions_of[image_path] = _slake_regions(folder, image_path)
        answer = str(_field(record, "answer", where, (str, int, float)))
        answer_type = _answer_type(_field(record, "answer_type", where), where)
        extra = _field(record, "medvista", where, (dict,), default={})
        candidates = tuple(str(c) for c in extra.get("candidates", ())) or _candidates(answer, answer_type)
        focus = extra.get("focus")
        if focus is not None and (not isinstance(focus, list) or len(focus) != 4):
            raise MedVistaDataError(f"{where}: field 'medvista.focus' must be [x1, y1, x2, y2] or null")
        items.append(VQAItem(
            qid=str(_field(record, "qid", where, (str, int))), dataset=dataset, split=split,
            image_id=str(_field(record, "img_id", where, (str, int), default=img_name)),
            image_path=image_path, question=_field(record, "question", where), answer=answer,
            answer_type=answer_type, question_type=str(record.get("content_type", "")),
            modality=str(record.get("modality", "")), candidates=candidates,
            regions=regions_of[image_path], focus=tuple(float(v) for v in focus) if focus else None))
    return items


# --- VQA-RAD ---------------------------------------------------------------------------------
def vqa_rad_split(phrase_type: str) -> str:
    return "test" if phrase_type.startswith("test") else "train"


def load_vqa_rad(data_dir: str, split: str) -> list[VQAItem]:
    """One VQA-RAD split (train or test; validate is empty)."""
    _check_split(split)
    path = os.path.join(data_dir, VQA_RAD_JSON)
    records = read_json(path)
    if not isinstance(records, list):
        raise MedVistaDataError(f"{path}: must be a JSON list of question records")
    items = []
    for k, record in enumerate(records):
        where = f"{path}: record {k}"
        if vqa_rad_split(_field(record, "phrase_type", where)) != split:
            continue
        answer = str(_field(record, "answer", where, (str, int, float)))
        answer_type = _answer_type(_field(record, "answer_type", where), where)
        image_name = _field(record, "image_name", where)
        items.append(VQAItem(
            qid=str(_field(record, "qid", where, (str, int))), dataset="vqa-rad", split=split,
            image_id=image_name, image_path=os.path.join(data_dir, VQA_RAD_IMAGES, image_name),
            question=_field(record, "question", where), answer=answer, answer_type=answer_type,
            question_type=str(record.get("question_type", "")),
            modality=str(record.get("image_organ", "")), candidates=_candidates(answer, answer_type)))
    _check_images(items, path)
    return items


# --- PathVQA ---------------------------------------------------------------------------------
class _PlainUnpickler(pickle.Unpickler):
    """Builds only plain containers and scalars: a data file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain data is allowed")


def read_plain_pickle(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            return _PlainUnpickler(io.BytesIO(f.read())).load()
    except FileNotFoundError:
        raise MedVistaDataError(f"{path}: file not found") from None
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise MedVistaDataError(f"{path}: not a plain-data pickle ({error})") from None


def load_pathvqa(data_dir: str, split: str) -> list[VQAItem]:
    """One PathVQA split from its released pickles."""
    _check_split(split)
    name = "val" if split == "validate" else split
    path = os.path.join(data_dir, "qas", name, f"{name}_qa.pkl")
    records = read_plain_pickle(path)
    if not isinstance(records, list):
        raise MedVistaDataError(f"{path}: must hold a list of question records")
    items = []
    for k, record in enumerate(records):
        where = f"{path}: record {k}"
        image = _field(record, "image", where)
        answer = str(_field(record, "answer", where, (str, int, float)))
        answer_type = "closed" if answer.strip().lower() in YES_NO else "open"
        items.append(VQAItem(
            qid=f"{name}-{k}", dataset="pathvqa", split=split, image_id=image,
            image_path=os.path.join(data_dir, "images", name, f"{image}.jpg"),
            question=_field(record, "question", where), answer=answer, answer_type=answer_type,
            question_type="yes/no" if answer_type == "closed" else "open",
            modality="pathology", candidates=_candidates(answer, answer_type)))
    _check_images(items, path)
    return items


LOADERS: dict[str, Callable[[str, str], list[VQAItem]]] = {
    "slake": load_slake, "vqa-rad": load_vqa_rad, "pathvqa": load_pathvqa}


def detect_layout(data_dir: str) -> str:
    """Which official layout `data_dir` holds: "slake", "vqa-rad" or "pathvqa"."""
    if os.path.isfile(os.path.join(data_dir, VQA_RAD_JSON)):
        return "vqa-rad"
    if os.path.isdir(os.path.join(data_dir, "qas")):
        return "pathvqa"
    if any(os.path.isfile(os.path.join(data_dir, f"{s}.json")) for s in SPLITS):
        return "slake"
    raise MedVistaDataError(
        f"{data_dir}: no known layout (SLAKE's train/validate/test.json, {VQA_RAD_JSON!r}, or PathVQA's qas/)")


def load(data_dir: str, split: str, dataset: str = "auto") -> list[VQAItem]:
    """Items of `split` from `data_dir` in the layout `dataset` (or the one found there)."""
    if not os.path.isdir(data_dir):
        raise MedVistaDataError(f"{data_dir}: data directory not found")
    layout = detect_layout(data_dir) if dataset == "auto" else dataset
    if layout not in LOADERS:
        raise ValueError(f"dataset must be 'auto' or one of {sorted(LOADERS)}, got {dataset!r}")
    if layout == "slake" and os.path.isfile(os.path.join(data_dir, "medvista.json")):
        return load_slake(data_dir, split, dataset="medvista-synth")
    return LOADERS[layout](data_dir, split)
