"""Image operations of the MedVista tools: boxes in 0-1000 coordinates, crops, resizing, windows.

Images are uint8 arrays `[H, W, 3]` (grayscale images are stored with three equal channels, so
every image the env returns has one layout). A box is `(x1, y1, x2, y2)` in 0-1000 coordinates
of the full image (the Qwen-VL grounding convention): x to the right, y down, `x1 < x2`,
`y1 < y2`. Every view the agent sees is letterboxed into a square of the policy's input size
(aspect ratio kept, black bars), so all returned images have shape `[S, S, 3]`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from PIL import Image

COORD_MAX = 1000
MIN_BOX_SIZE = 10  # in 0-1000 units: a zoom of at least 1% of the image side

Box = tuple[float, float, float, float]

# 3x3 grid over the image, row-major, with the names the questions and answers use.
GRID_EDGES = (0, 333, 667, 1000)
ROW_NAMES = ("upper", "middle", "lower")
COL_NAMES = ("left", "middle", "right")
QUADRANT_EDGES = (0, 500, 1000)

# Windows on the 8-bit gray values, (center, width): the official datasets ship 8-bit JPEG/PNG,
# so Hounsfield units are gone and a CT/MR window can only stretch a band of gray levels.
WINDOWS = {"low": (64.0, 128.0), "mid": (128.0, 128.0), "high": (192.0, 128.0), "full": (127.5, 255.0)}


def region_name(row: int, col: int) -> str:
    """Name of grid cell (row, col): "upper left", ..., "center" for the middle cell."""
    if row == 1 and col == 1:
        return "center"
    return f"{ROW_NAMES[row]} {COL_NAMES[col]}"


def grid_boxes() -> dict[str, Box]:
    """The nine 3x3 grid cells as {name: box}, row-major."""
    return {
        region_name(r, c): (GRID_EDGES[c], GRID_EDGES[r], GRID_EDGES[c + 1], GRID_EDGES[r + 1])
        for r in range(3)
        for c in range(3)
    }


def quadrant_boxes() -> dict[str, Box]:
    """The four quadrants as {name: box}: upper left, upper right, lower left, lower right."""
    e = QUADRANT_EDGES
    return {
        f"{ROW_NAMES[2 * r]} {COL_NAMES[2 * c]} quadrant": (e[c], e[r], e[c + 1], e[r + 1])
        for r in range(2)
        for c in range(2)
    }


def region_of(x: float, y: float) -> str:
    """Grid cell name of a point in 0-1000 coordinates."""
    col = min(int(np.searchsorted(GRID_EDGES, x, side="right")) - 1, 2)
    row = min(int(np.searchsorted(GRID_EDGES, y, side="right")) - 1, 2)
    return region_name(max(row, 0), max(col, 0))


def format_box(box: Box) -> str:
    """`zoom[...]` argument text of a box, integers when they are whole."""
    return ", ".join(str(int(v)) if float(v).is_integer() else f"{v:g}" for v in box)


def check_box(box: Box) -> str | None:
    """Why `box` is not a valid zoom box, or None when it is."""
    x1, y1, x2, y2 = box
    if not all(math.isfinite(v) for v in box):
        return "coordinates must be finite numbers"
    if min(box) < 0 or max(box) > COORD_MAX:
        return f"coordinates must lie in 0-{COORD_MAX}"
    if x2 - x1 < MIN_BOX_SIZE or y2 - y1 < MIN_BOX_SIZE:
        return f"need x1 < x2 and y1 < y2, at least {MIN_BOX_SIZE} apart"
    return None


class PixelBox(NamedTuple):
    """A box in pixel indices of an `[H, W]` image: rows `top:bottom`, columns `left:right`."""

    left: int
    top: int
    right: int
    bottom: int


def to_pixels(box: Box, height: int, width: int) -> PixelBox:
    """Pixel box covering a 0-1000 box of an `[height, width]` image (at least 1x1)."""
    x1, y1, x2, y2 = box
    left = min(int(math.floor(x1 / COORD_MAX * width)), width - 1)
    top = min(int(math.floor(y1 / COORD_MAX * height)), height - 1)
    right = max(int(math.ceil(x2 / COORD_MAX * width)), left + 1)
    bottom = max(int(math.ceil(y2 / COORD_MAX * height)), top + 1)
    return PixelBox(left, top, min(right, width), min(bottom, height))


def as_rgb(image: np.ndarray) -> np.ndarray:
    """`[H, W]`, `[H, W, 1]`, `[H, W, 3]` or `[H, W, 4]` -> uint8 `[H, W, 3]`."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"images must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]; got {image.shape}")
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])


def is_gray(image: np.ndarray) -> bool:
    """Whether the three channels of `[H, W, 3]` are equal."""
    return bool((image[:, :, 0] == image[:, :, 1]).all() and (image[:, :, 0] == image[:, :, 2]).all())


def letterbox(image: np.ndarray, size: int, gray: bool = False) -> np.ndarray:
    """Resize `[H, W, 3]` uint8 so its longer side is `size` (antialiased bilinear), centred on
    a black `[size, size, 3]` canvas. `gray=True` (equal channels) resizes one channel only,
    the same result a third of the work."""
    height, width = image.shape[:2]
    scale = size / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    plane = np.ascontiguousarray(image[:, :, 0]) if gray else np.ascontiguousarray(image)
    resized = np.asarray(Image.fromarray(plane).resize((new_w, new_h), resample=Image.Resampling.BILINEAR))
    canvas = np.zeros((size, size, 3), dtype=np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = resized[:, :, None] if gray else resized
    return canvas


def crop(image: np.ndarray, box: Box) -> np.ndarray:
    """The part of `[H, W, 3]` `image` inside the 0-1000 `box` (a view, not a copy)."""
    p = to_pixels(box, image.shape[0], image.shape[1])
    return image[p.top : p.bottom, p.left : p.right]


def apply_window(image: np.ndarray, center: float, width: float) -> np.ndarray:
    """Stretch gray levels `[center - width/2, center + width/2]` to 0-255 (clipped), uint8."""
    low = center - width / 2.0
    out = (image.astype(np.float32) - low) * (255.0 / width)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def magnification(box: Box, height: int, width: int, size: int) -> float:
    """How many times larger the box's pixels appear in the `size` view than in the full view."""
    p = to_pixels(box, height, width)
    return max(height, width) / max(p.bottom - p.top, p.right - p.left)
