"""Images to the patches the vision tower reads, as HF's Qwen2-VL image processor makes them.

    from hiper_jax.models.qwen2_5_vl import processing
    pixels, grid = processing.image_patches(images, config.vision)   # [N, C*T*P*P], [n, 3]

The processor's steps after its resize: scale uint8 values to [0, 1], normalise each channel
with the CLIP mean and std, repeat the (single) frame ``temporal_patch_size`` times, and cut
``patch_size`` x ``patch_size`` patches in block-major order over ``spatial_merge_size`` x
``spatial_merge_size`` blocks. There is no resize here: an image's height and width must
already be multiples of ``patch_size * spatial_merge_size`` (MedVista letterboxes every view
to its ``image_size``, e.g. 224), which is what the processor's ``smart_resize`` keeps as it is
while the pixel count lies within its ``min_pixels``..``max_pixels``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from hiper_jax.models.qwen2_5_vl.config import VisionConfig

# OpenAI CLIP's per-channel statistics: Qwen2-VL's processor defaults.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def image_grid(height: int, width: int, config: VisionConfig) -> tuple[int, int, int]:
    """``(t, h, w)`` in patches of one ``[height, width]`` image (one frame).

    Raises:
        ValueError: a side that is not a positive multiple of ``patch_size * spatial_merge_size``.
    """
    factor = config.patch_size * config.spatial_merge_size
    if height <= 0 or width <= 0 or height % factor or width % factor:
        raise ValueError(f"image of {height}x{width} pixels: height and width must be positive "
                         f"multiples of patch_size * spatial_merge_size = {factor} (resize first)")
    return 1, height // config.patch_size, width // config.patch_size


def single_image_patches(image: np.ndarray, config: VisionConfig, mean: Sequence[float] = CLIP_MEAN,
                         std: Sequence[float] = CLIP_STD) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One uint8 image ``[H, W, C]`` -> ``(pixel_values [h*w, C*T*P*P] float32, (1, h, w))``.

    Raises:
        ValueError: not ``[H, W, in_channels]`` uint8, or sides that do not divide (see
            :func:`image_grid`).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != config.in_channels or image.dtype != np.uint8:
        raise ValueError(f"an image must be uint8 [H, W, {config.in_channels}], got shape "
                         f"{image.shape} dtype {image.dtype}")
    t, h, w = image_grid(image.shape[0], image.shape[1], config)
    p, m, frames = config.patch_size, config.spatial_merge_size, config.temporal_patch_size
    scaled = image.astype(np.float32) * np.float32(1 / 255)
    normal = (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    channels_first = np.broadcast_to(normal.transpose(2, 0, 1)[None],
                                     (frames, config.in_channels) + image.shape[:2])
    blocks = channels_first.reshape(frames, config.in_channels, h // m, m, p, w // m, m, p)
    # -> [h/m, w/m, m, m, C, T, P, P]: merge blocks row-major, channel-major inside a patch.
    patches = blocks.transpose(2, 5, 3, 6, 1, 0, 4, 7)
    return np.ascontiguousarray(patches.reshape(t * h * w, config.patch_dim)), (t, h, w)


def image_patches(images: Sequence[np.ndarray], config: VisionConfig,
                  mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8 ``[H_i, W_i, C]``) -> ``(pixel_values [N, C*T*P*P] float32, grid [n, 3]
    int64)``, the images' patches one after another: HF's ``pixel_values`` and
    ``image_grid_thw`` of the same images."""
    if not len(images):
        return np.zeros((0, config.patch_dim), np.float32), np.zeros((0, 3), np.int64)
    pieces = [single_image_patches(image, config, mean, std) for image in images]
    return (np.concatenate([pixels for pixels, _ in pieces]),
            np.asarray([grid for _, grid in pieces], np.int64))
