"""The offline default data: medical images with planted findings, written in the SLAKE layout.

    python -m hiper_envs.medvista.synth --out DIR [--seed 0] [--images 240]

Base images are the real CT and MR slices that ship inside pydicom's wheel (read with pydicom)
and procedural anatomy-like phantoms (chest, head and abdomen cross-sections: body outline,
organs, low-frequency texture, noise). Each case plants 0-3 small round findings ("lesions":
brighter than the tissue around them, radius `radius_px` in pixels of the `image_px` source
image) inside the body, away from the 3x3 grid and quadrant lines so that every finding lies
in one region. Questions per case, closed and open, the way SLAKE asks them:

- presence (closed): "Is there a lesion in this image?" -> yes / no
- region (closed): "Is there a lesion in the upper left of the image?" -> yes / no
- count (open): "How many lesions are in this image?" -> "0" .. "3"
- location (open, exactly one finding): "Where is the lesion in the image?" -> "upper left"
- size (closed, two findings of clearly different size side by side): "Which lesion is
  larger, the left one or the right one?" -> left / right

At the policy's input size (224 for a 512 source) a finding spans a few pixels at most; a
quadrant zoom doubles that. Cases go to train/validate/test by image (no image in two
splits); everything is reproducible from the seed. Layout written (SLAKE's, see `loaders`):

    DIR/train.json, validate.json, test.json       question records (SLAKE fields + extras)
    DIR/imgs/xmlab<N>/source.png                   the image (PNG: lossless, tiny findings)
    DIR/imgs/xmlab<N>/detection.json               [{"lesion": [x, y, w, h]}, ...] pixels
    DIR/medvista.json                              the generator config and counts
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm.auto import tqdm

from hiper_envs.medvista import imaging

DATASET_NAME = "medvista-synth"
# pydicom's bundled uncompressed slices (file, modality, body part) that decode with numpy alone.
DICOM_FILES = (
    ("CT_small.dcm", "CT", "Chest"),
    ("MR_small.dcm", "MR", "Head"),
    ("examples_overlay.dcm", "MR", "Abdomen"),
)
PHANTOM_KINDS = (("chest", "CT", "Chest"), ("head", "MR", "Brain"), ("abdomen", "CT", "Abdomen"))
QUESTION_TYPES = ("presence", "region", "count", "location", "size")
FINDING = "lesion"


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """What `generate` makes. Sizes are pixels of the `image_px` x `image_px` source image."""

    num_images: int = 240
    seed: int = 0
    image_px: int = 512
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train, validate, test
    count_probs: tuple[float, ...] = (0.3, 0.35, 0.2, 0.15)  # P(0..3 findings)
    radius_px: tuple[float, float] = (2.0, 4.5)
    contrast: tuple[float, float] = (0.16, 0.28)  # added to the 0-1 tissue intensity
    noise_std: float = 0.025
    dicom_fraction: float = 0.4  # share of cases on a pydicom slice (the rest on phantoms)

    def __post_init__(self) -> None:
        if self.num_images < 3:
            raise ValueError(f"num_images must be >= 3 (one per split), got {self.num_images}")
        if abs(sum(self.split_fractions) - 1.0) > 1e-6 or min(self.split_fractions) < 0:
            raise ValueError(f"split_fractions must be >= 0 and sum to 1, got {self.split_fractions}")
        if abs(sum(self.count_probs) - 1.0) > 1e-6:
            raise ValueError(f"count_probs must sum to 1, got {self.count_probs}")
        if self.image_px < 64:
            raise ValueError(f"image_px must be >= 64, got {self.image_px}")


@dataclasses.dataclass(frozen=True)
class Lesion:
    """A planted finding: centre (x, y) and radius in source pixels, added intensity."""

    x: float
    y: float
    radius: float
    contrast: float

    def box(self, size: int) -> imaging.Box:
        """Bounding box in 0-1000 coordinates of a `size` x `size` image."""
        s = imaging.COORD_MAX / size
        r = self.radius
        return ((self.x - r) * s, (self.y - r) * s, (self.x + r) * s, (self.y + r) * s)

    def center_1000(self, size: int) -> tuple[float, float]:
        s = imaging.COORD_MAX / size
        return self.x * s, self.y * s


# --- base images ---------------------------------------------------------------------------
def _dicom_dir() -> str:
    import pydicom

    return os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files")


def read_dicom_slice(path: str) -> np.ndarray:
    """A DICOM slice as float32 `[H, W]` in [0, 1]: its own window if it has one (the first),
    else the 1st-99th percentile range."""
    import pydicom

    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array.astype(np.float32)
    if pixels.ndim != 2:
        raise ValueError(f"{path}: expected one grayscale slice, got pixel array {pixels.shape}")
    pixels = pixels * float(getattr(ds, "RescaleSlope", 1)) + float(getattr(ds, "RescaleIntercept", 0))
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        first = lambda v: float(v[0]) if isinstance(v, pydicom.multival.MultiValue) else float(v)  # noqa: E731
        low, high = first(center) - first(width) / 2, first(center) + first(width) / 2
    else:
        low, high = np.percentile(pixels, [1, 99])
    return np.clip((pixels - low) / max(high - low, 1e-6), 0.0, 1.0)


def _resize_float(image: np.ndarray, size: int) -> np.ndarray:
    """`[H, W]` float -> `[size, size]` (bilinear; letterboxed so anatomy keeps its shape)."""
    height, width = image.shape
    scale = size / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    resized = np.asarray(
        Image.fromarray(image.astype(np.float32), mode="F").resize((new_w, new_h), Image.Resampling.BILINEAR)
    )
    canvas = np.zeros((size, size), dtype=np.float32)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = resized
    return canvas


def load_dicom_bases(size: int) -> list[tuple[np.ndarray, str, str, str]]:
    """pydicom's bundled slices as `(image [size, size] float, modality, body part, name)`."""
    directory = _dicom_dir()
    bases = []
    for name, modality, part in DICOM_FILES:
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: pydicom's bundled example is missing (pydicom>=3 ships it)")
        # A median filter removes the slices' own small bright specks (vessels, overlay marks),
        # which would otherwise look just like a planted finding.
        smooth = ndimage.median_filter(_resize_float(read_dicom_slice(path), size), size=9)
        bases.append((smooth, modality, part, name))
    return bases


def _ellipse(size: int, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0


def _texture(rng: np.random.Generator, size: int, sigma: float, amplitude: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), sigma)
    return amplitude * field / (field.std() + 1e-6)


def make_phantom(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A procedural cross-section, float32 `[size, size]` in [0, 1] (before findings/noise)."""
    c = size / 2
    j = lambda scale: 1.0 + scale * rng.uniform(-1, 1)  # noqa: E731 - jitter factor
    image = np.zeros((size, size), np.float32)
    if kind == "chest":
        body = _ellipse(size, c, c * j(0.03), 0.44 * size * j(0.05), 0.34 * size * j(0.05))
        image[body] = 0.5 * j(0.1)
        for side in (-1, 1):  # lungs
            lung = _ellipse(size, c + side * 0.2 * size * j(0.05), c * j(0.03) - 0.02 * size,
                            0.15 * size * j(0.08), 0.24 * size * j(0.06))
            image[lung & body] = 0.12 * j(0.2)
        image[_ellipse(size, c + 0.03 * size * j(1), c + 0.02 * size, 0.09 * size * j(0.1), 0.08 * size * j(0.1))] = 0.58
        image[_ellipse(size, c, c + 0.25 * size * j(0.04), 0.05 * size, 0.045 * size)] = 0.92  # spine
    elif kind == "head":
        skull = _ellipse(size, c, c, 0.36 * size * j(0.05), 0.44 * size * j(0.04))
        brain = _ellipse(size, c, c, 0.33 * size * j(0.03), 0.41 * size * j(0.03))
        image[skull] = 0.95
        image[brain] = 0.48 * j(0.1)
        for side in (-1, 1):  # ventricles
            image[_ellipse(size, c + side * 0.05 * size * j(0.2), c - 0.03 * size * j(1),
                           0.025 * size * j(0.2), 0.1 * size * j(0.15))] = 0.15
        image[brain & ~_ellipse(size, c, c, 0.3 * size, 0.38 * size)] = 0.62  # cortex band
    elif kind == "abdomen":
        body = _ellipse(size, c, c, 0.45 * size * j(0.04), 0.36 * size * j(0.05))
        image[body] = 0.46 * j(0.1)
        image[_ellipse(size, c - 0.16 * size * j(0.1), c - 0.08 * size, 0.18 * size * j(0.1), 0.14 * size * j(0.1)) & body] = 0.58
        for side in (-1, 1):  # kidneys
            image[_ellipse(size, c + side * 0.2 * size * j(0.05), c + 0.12 * size,
                           0.05 * size * j(0.1), 0.08 * size * j(0.1))] = 0.66
        image[_ellipse(size, c, c + 0.2 * size, 0.05 * size, 0.045 * size)] = 0.9  # spine
    else:
        raise ValueError(f"unknown phantom kind {kind!r}; choose from {[k for k, _, _ in PHANTOM_KINDS]}")
    inside = image > 0
    image = image + inside * _texture(rng, size, sigma=size / 40, amplitude=0.04)
    return np.clip(ndimage.gaussian_filter(image, 1.0), 0.0, 1.0)


def _augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random flip/rotation by 90 degrees and a gain, so the few DICOM slices vary per case."""
    image = np.rot90(image, k=int(rng.integers(4)))
    if rng.random() < 0.5:
        image = image[:, ::-1]
    return np.clip(image * rng.uniform(0.9, 1.1), 0.0, 1.0).astype(np.float32)


# --- findings --------------------------------------------------------------------------------
def allowed_centres(image: np.ndarray, margin_px: float) -> np.ndarray:
    """`[size, size]` bool: where a finding of radius <= margin may go: inside the body (not air,
    not bone-bright), >= margin from the body edge and from every grid and quadrant line."""
    size = image.shape[0]
    body = ndimage.binary_fill_holes(image > 0.06)
    tissue = ndimage.binary_erosion(body & (image < 0.8), iterations=int(np.ceil(margin_px)) + 4)
    coords = (np.arange(size) + 0.5) * imaging.COORD_MAX / size
    lines = np.array(sorted(set(imaging.GRID_EDGES[1:-1]) | set(imaging.QUADRANT_EDGES[1:-1])), np.float32)
    gap = (margin_px + 3) * imaging.COORD_MAX / size
    free = np.min(np.abs(coords[:, None] - lines[None, :]), axis=1) > gap
    return tissue & free[:, None] & free[None, :]


def plant_lesions(
    image: np.ndarray, count: int, config: SynthConfig, rng: np.random.Generator
) -> list[Lesion]:
    """Choose `count` non-touching findings in allowed places (fewer if there is no room)."""
    lo, hi = config.radius_px
    allowed = allowed_centres(image, hi)
    ys, xs = np.nonzero(allowed)
    lesions: list[Lesion] = []
    for _ in range(50 * max(count, 1)):
        if len(lesions) == count or len(xs) == 0:
            break
        k = int(rng.integers(len(xs)))
        x, y = float(xs[k]) + 0.5, float(ys[k]) + 0.5
        if any(np.hypot(x - o.x, y - o.y) < 0.12 * image.shape[0] for o in lesions):
            continue
        lesions.append(Lesion(x, y, float(rng.uniform(lo, hi)), float(rng.uniform(*config.contrast))))
    return lesions


def render_case(image: np.ndarray, lesions: Sequence[Lesion], noise_std: float,
                rng: np.random.Generator) -> np.ndarray:
    """Add the findings (soft-edged discs) and noise; uint8 `[size, size]`."""
    size = image.shape[0]
    out = image.astype(np.float32).copy()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    for lesion in lesions:
        distance = np.hypot(xx - lesion.x, yy - lesion.y)
        out += lesion.contrast * np.clip(lesion.radius + 0.5 - distance, 0.0, 1.0)
    out += noise_std * rng.standard_normal(out.shape).astype(np.float32) * (image > 0.02)
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


# --- questions -------------------------------------------------------------------------------
PRESENCE_TEMPLATES = ("Is there a {f} in this image?", "Does this image show a {f}?",
                      "Is any {f} visible in the image?")
REGION_TEMPLATE = "Is there a {f} in the {region} of the image?"
COUNT_TEMPLATE = "How many {f}s are in this image?"
LOCATION_TEMPLATE = "Where is the {f} in the image?"
SIZE_TEMPLATE = "Which {f} is larger, the left one or the right one?"
COUNT_CANDIDATES = ("0", "1", "2", "3", "4")


def make_questions(lesions: Sequence[Lesion], size: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Question records `{question, answer, answer_type, question_type, candidates, focus}` for
    one case (answer types "CLOSED"/"OPEN" as SLAKE writes them; focus: a box or None)."""
    regions = imaging.grid_boxes()
    occupied = {imaging.region_of(*lesion.center_1000(size)) for lesion in lesions}
    yes_no = ["yes", "no"]
    questions = [dict(question=str(rng.choice(PRESENCE_TEMPLATES)).format(f=FINDING),
                      answer="yes" if lesions else "no", answer_type="CLOSED",
                      question_type="presence", candidates=yes_no, focus=None)]
    names = list(regions)
    if occupied and rng.random() < 0.5:
        region = str(rng.choice(sorted(occupied)))
    else:
        region = str(rng.choice([n for n in names if n not in occupied] or names))
    questions.append(dict(question=REGION_TEMPLATE.format(f=FINDING, region=region),
                          answer="yes" if region in occupied else "no", answer_type="CLOSED",
                          question_type="region", candidates=yes_no, focus=list(regions[region])))
    questions.append(dict(question=COUNT_TEMPLATE.format(f=FINDING), answer=str(len(lesions)),
                          answer_type="OPEN", question_type="count",
                          candidates=list(COUNT_CANDIDATES), focus=None))
    if len(lesions) == 1:
        questions.append(dict(question=LOCATION_TEMPLATE.format(f=FINDING), answer=occupied.pop(),
                              answer_type="OPEN", question_type="location", candidates=names, focus=None))
    if len(lesions) == 2:
        left, right = sorted(lesions, key=lambda lesion: lesion.x)
        apart = right.x - left.x > 0.15 * size
        ratio = max(left.radius, right.radius) / min(left.radius, right.radius)
        if apart and ratio >= 1.5:
            questions.append(dict(question=SIZE_TEMPLATE.format(f=FINDING),
                                  answer="left" if left.radius > right.radius else "right",
                                  answer_type="CLOSED", question_type="size",
                                  candidates=["left", "right"], focus=None))
    return questions


# --- the data set ----------------------------------------------------------------------------
def split_of(index: int, num_images: int, fractions: Sequence[float]) -> str:
    """Split of case `index` (cases are shuffled before this, so contiguous ranges are fine)."""
    n_train = int(round(fractions[0] * num_images))
    n_val = max(int(round(fractions[1] * num_images)), 1 if fractions[1] > 0 else 0)
    n_train = min(n_train, num_images - n_val - (1 if fractions[2] > 0 else 0))
    if index < n_train:
        return "train"
    return "validate" if index < n_train + n_val else "test"


def generate(out_dir: str, config: SynthConfig = SynthConfig(), progress: bool = True) -> dict:
    """Write the data set to `out_dir` (made atomically: a temp dir renamed at the end; if
    another process finished first, its identical copy is kept). Returns the summary."""
    if os.path.exists(os.path.join(out_dir, "medvista.json")):
        with open(os.path.join(out_dir, "medvista.json"), encoding="utf-8") as f:
            return json.load(f)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".medvista-", dir=parent)
    try:
        summary = _write(tmp, config, progress)
        try:
            os.rename(tmp, out_dir)
        except OSError:  # another process wrote it first (or a partial dir is in the way)
            if not os.path.exists(os.path.join(out_dir, "medvista.json")):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        return summary
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write(root: str, config: SynthConfig, progress: bool) -> dict:
    size = config.image_px
    dicoms = load_dicom_bases(size)
    records: dict[str, list] = {"train": [], "validate": [], "test": []}
    qid = 0
    for index in tqdm(range(config.num_images), desc="medvista cases", disable=not progress):
        case_rng = np.random.default_rng([config.seed, index])  # a case depends on no other
        if case_rng.random() < config.dicom_fraction:
            base, modality, part, source = dicoms[int(case_rng.integers(len(dicoms)))]
            base = _augment(base, case_rng)
        else:
            kind, modality, part = PHANTOM_KINDS[int(case_rng.integers(len(PHANTOM_KINDS)))]
            base, source = make_phantom(kind, size, case_rng), f"phantom:{kind}"
        count = int(case_rng.choice(len(config.count_probs), p=config.count_probs))
        lesions = plant_lesions(base, count, config, case_rng)
        pixels = render_case(base, lesions, config.noise_std, case_rng)
        split = split_of(index, config.num_images, config.split_fractions)
        img_id = index + 1
        folder = os.path.join(root, "imgs", f"xmlab{img_id}")
        os.makedirs(folder)
        Image.fromarray(pixels).save(os.path.join(folder, "source.png"))
        detection = [{FINDING: [round(l.x - l.radius, 2), round(l.y - l.radius, 2),
                                round(2 * l.radius, 2), round(2 * l.radius, 2)]} for l in lesions]
        with open(os.path.join(folder, "detection.json"), "w", encoding="utf-8") as f:
            json.dump(detection, f)
        for q in make_questions(lesions, size, case_rng):
            qid += 1
            records[split].append({
                "img_id": img_id, "img_name": f"xmlab{img_id}/source.png", "question": q["question"],
                "answer": q["answer"], "q_lang": "en", "location": part, "modality": modality,
                "answer_type": q["answer_type"], "base_type": "vqa", "content_type": q["question_type"],
                "triple": ["vhead", "_", "_"], "qid": qid,
                "medvista": {"candidates": q["candidates"], "focus": q["focus"], "source": source},
            })
    for split, rows in records.items():
        with open(os.path.join(root, f"{split}.json"), "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=0)
    summary = {"dataset": DATASET_NAME, "config": dataclasses.asdict(config),
               "images": config.num_images, "questions": {s: len(r) for s, r in records.items()}}
    with open(os.path.join(root, "medvista.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    return json.loads(json.dumps(summary))  # as read back from medvista.json (lists, not tuples)


def config_key(config: SynthConfig) -> str:
    """A short stable name for a config (the cache folder of the env's default data)."""
    import hashlib

    blob = json.dumps(dataclasses.asdict(config), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def default_data_dir(config: SynthConfig = SynthConfig()) -> str:
    """Where the env keeps generated data: `$HIPER_MEDVISTA_DATA` or `~/.cache/hiper_jax/medvista`,
    one folder per config."""
    root = os.environ.get("HIPER_MEDVISTA_DATA") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hiper_jax", "medvista")
    return os.path.join(root, f"synth-{config_key(config)}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the MedVista default data (SLAKE layout).")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=SynthConfig.num_images)
    parser.add_argument("--image-px", type=int, default=SynthConfig.image_px)
    args = parser.parse_args(argv)
    summary = generate(args.out, SynthConfig(num_images=args.images, seed=args.seed, image_px=args.image_px))
    print(json.dumps(summary["questions"]))


if __name__ == "__main__":
    main()
