"""The generated default data: SLAKE layout, findings, questions, splits, determinism."""

import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from hiper_envs.medvista import imaging, loaders, synth

SMALL = synth.SynthConfig(num_images=6, seed=9)


def _digest(root):
    """sha256 of every file under `root` (relative path -> hex digest)."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_generated_data_is_in_slake_layout_and_read_by_the_slake_loader(synth_dir):
    assert loaders.detect_layout(synth_dir) == "slake"
    items = {split: loaders.load(synth_dir, split) for split in ("train", "validate", "test")}
    assert all(items.values())
    with open(os.path.join(synth_dir, "train.json"), encoding="utf-8") as f:
        record = json.load(f)[0]
    assert set(record) >= {"img_id", "img_name", "question", "answer", "q_lang", "answer_type", "content_type",
                           "modality", "location", "qid"}
    assert record["img_name"].startswith("xmlab") and record["answer_type"] in ("OPEN", "CLOSED")
    kinds = {i.question_type for split in items.values() for i in split}
    assert {"presence", "region", "count", "location"} <= kinds <= set(synth.QUESTION_TYPES)
    assert {i.answer_type for split in items.values() for i in split} == {"open", "closed"}


def test_answers_agree_with_the_planted_findings(synth_dir):
    for item in loaders.load(synth_dir, "train"):
        centres = [((r.box[0] + r.box[2]) / 2, (r.box[1] + r.box[3]) / 2) for r in item.regions]
        occupied = {imaging.region_of(*c) for c in centres}
        if item.question_type == "presence":
            assert item.answer == ("yes" if centres else "no")
        elif item.question_type == "count":
            assert item.answer == str(len(centres))
        elif item.question_type == "location":
            assert [item.answer] == sorted(occupied)
        elif item.question_type == "region":
            inside = any(item.focus[0] <= x < item.focus[2] and item.focus[1] <= y < item.focus[3] for x, y in centres)
            assert item.answer == ("yes" if inside else "no")
        elif item.question_type == "size":
            left, right = sorted(item.regions, key=lambda r: r.box[0])
            larger = "left" if left.box[2] - left.box[0] > right.box[2] - right.box[0] else "right"
            assert item.answer == larger
        assert item.answer in item.candidates


def test_findings_are_bright_small_and_clear_of_region_lines(synth_dir):
    for item in loaders.load(synth_dir, "train")[:40]:
        image = np.asarray(Image.open(item.image_path)).astype(np.float32)
        for region in item.regions:
            x1, y1, x2, y2 = region.box
            size_px = (x2 - x1) * image.shape[1] / 1000
            assert 2 * SMALL.radius_px[0] - 0.01 <= size_px <= 2 * SMALL.radius_px[1] + 0.01
            for edge in (333, 500, 667):
                assert not (x1 < edge < x2) and not (y1 < edge < y2)
            cx, cy = int((x1 + x2) / 2 * image.shape[1] / 1000), int((y1 + y2) / 2 * image.shape[0] / 1000)
            ring = image[cy - 12 : cy + 13, cx - 12 : cx + 13]
            assert image[cy, cx] > np.median(ring) + 20  # brighter than the tissue around it


def test_splits_are_disjoint_by_image_and_question(synth_dir):
    seen_images, seen_qids, seen_pixels = {}, {}, {}
    for split in ("train", "validate", "test"):
        for item in loaders.load(synth_dir, split):
            assert seen_images.setdefault(item.image_path, split) == split
            assert seen_qids.setdefault(item.qid, split) == split
            with open(item.image_path, "rb") as f:
                pixels = hashlib.sha256(np.asarray(Image.open(f)).tobytes()).hexdigest()
            assert seen_pixels.setdefault(pixels, split) == split


def test_generation_is_reproducible_by_seed(tmp_path):
    first, again = synth.generate(str(tmp_path / "a"), SMALL, progress=False), synth.generate(str(tmp_path / "b"), SMALL, progress=False)
    assert first == again and _digest(tmp_path / "a") == _digest(tmp_path / "b")
    synth.generate(str(tmp_path / "c"), synth.SynthConfig(num_images=6, seed=10), progress=False)
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    assert synth.generate(str(tmp_path / "a"), SMALL, progress=False) == first  # kept, not rewritten


def test_pydicom_slices_are_read(tmp_path):
    bases = synth.load_dicom_bases(128)
    assert [name for *_, name in bases] == [name for name, _, _ in synth.DICOM_FILES]
    for image, modality, _, _ in bases:
        assert image.shape == (128, 128) and 0.0 <= image.min() < image.max() <= 1.0
        assert modality in ("CT", "MR")


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="split_fractions"):
        synth.SynthConfig(split_fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="num_images"):
        synth.SynthConfig(num_images=1)
