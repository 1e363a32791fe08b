"""Boxes, crops, letterboxing and windows of the MedVista tools."""

import numpy as np
import pytest
from PIL import Image

from hiper_envs.medvista import imaging


def test_grid_and_quadrants_tile_the_image():
    grid, quads = imaging.grid_boxes(), imaging.quadrant_boxes()
    assert len(grid) == 9 and len(quads) == 4
    for boxes in (grid, quads):
        area = sum((b[2] - b[0]) * (b[3] - b[1]) for b in boxes.values())
        assert area == 1000 * 1000
    assert imaging.region_of(100, 100) == "upper left" and imaging.region_of(500, 500) == "center"
    assert imaging.region_of(999, 700) == "lower right" and imaging.region_of(1000, 1000) == "lower right"


def test_crop_maps_0_1000_boxes_to_pixels():
    image = np.arange(10 * 20 * 3, dtype=np.uint8).reshape(10, 20, 3)
    part = imaging.crop(image, (0, 0, 500, 500))
    assert part.shape == (5, 10, 3) and np.array_equal(part, image[:5, :10])
    assert imaging.crop(image, (999, 999, 1000, 1000)).shape == (1, 1, 3)


@pytest.mark.parametrize("box, problem", [
    ((0, 0, 1001, 10), "0-1000"), ((10, 0, 5, 100), "x1 < x2"), ((0, 0, 5, 100), "x1 < x2"),
    ((float("nan"), 0, 10, 10), "finite")])
def test_bad_boxes_are_explained(box, problem):
    assert problem in imaging.check_box(box)


def test_letterbox_keeps_aspect_ratio_and_matches_pil():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (30, 60, 3), dtype=np.uint8)
    out = imaging.letterbox(image, 40)
    assert out.shape == (40, 40, 3) and out.dtype == np.uint8
    reference = np.asarray(Image.fromarray(image).resize((40, 20), Image.Resampling.BILINEAR))
    assert np.array_equal(out[10:30], reference)
    assert not out[:10].any() and not out[30:].any()


def test_window_stretches_a_band_of_gray_levels():
    values = np.array([[0, 64, 128, 192, 255]], np.uint8)
    out = imaging.apply_window(values, 128.0, 128.0)
    assert out.tolist() == [[0, 0, 128, 255, 255]]
