"""Image -> patch preprocessing against transformers' Qwen2-VL image processor (PIL backend)."""

import numpy as np
import pytest

from hiper_jax.models.qwen2_5_vl import VisionConfig
from hiper_jax.models.qwen2_5_vl import processing

# The tiny tower of the tests: 2x2-pixel patches, 2x2 merge (factor 4), two frames.
CONFIG = VisionConfig(depth=1, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=32,
                      patch_size=2, temporal_patch_size=2, spatial_merge_size=2, window_size=8,
                      fullatt_block_indexes=(0,))


def _images(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
            rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)]


@pytest.mark.slow  # ~9 s: importing transformers' image processor on a loaded 2-core CPU
def test_patches_equal_transformers_image_processor():
    transformers = pytest.importorskip("transformers")
    hf = transformers.models.qwen2_vl.image_processing_pil_qwen2_vl.Qwen2VLImageProcessorPil(
        patch_size=2, temporal_patch_size=2, merge_size=2, min_pixels=16, max_pixels=10_000)
    images = _images()
    expected = hf(images=images, return_tensors="np")
    pixels, grid = processing.image_patches(images, CONFIG)
    np.testing.assert_array_equal(grid, expected["image_grid_thw"])
    assert pixels.shape == (64 + 24, CONFIG.patch_dim) and pixels.dtype == np.float32
    np.testing.assert_allclose(pixels, expected["pixel_values"], atol=1e-5, rtol=0)


def test_each_patch_reads_its_own_pixels():
    """Patch 1 of an image is the top-right 2x2 pixels of its first merge block, channel-major,
    each frame repeated; a changed pixel moves exactly one patch."""
    image = _images()[0]
    pixels, grid = processing.image_patches([image], CONFIG)
    assert grid.tolist() == [[1, 8, 8]]
    block = (image[0:2, 2:4].astype(np.float32) / 255 - processing.CLIP_MEAN) / processing.CLIP_STD
    expected = np.stack([block.transpose(2, 0, 1)] * 2, axis=1).reshape(-1)
    np.testing.assert_allclose(pixels[1], expected, atol=1e-6)
    changed = image.copy()
    changed[5, 9, 0] ^= 1
    moved = np.flatnonzero(np.any(processing.image_patches([changed], CONFIG)[0] != pixels, axis=1))
    # pixel (5, 9): patch row 2, column 4 -> merge block (1, 2), inside it (0, 0): 4 * 6 + 0.
    assert moved.tolist() == [24]


def test_bad_images_are_refused_with_a_message():
    with pytest.raises(ValueError, match="multiples of patch_size"):
        processing.image_patches([np.zeros((10, 16, 3), np.uint8)], CONFIG)
    with pytest.raises(ValueError, match="uint8"):
        processing.image_patches([np.zeros((16, 16, 3), np.float32)], CONFIG)
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        processing.image_patches([np.zeros((16, 16), np.uint8)], CONFIG)
    pixels, grid = processing.image_patches([], CONFIG)
    assert pixels.shape == (0, CONFIG.patch_dim) and grid.shape == (0, 3)
