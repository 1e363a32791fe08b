"""A picture of one episode: the images the agent saw (full image, then each tool's output),
the question, the actions and the answer (matplotlib, written as PNG)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np


def episode_figure(images: Sequence[np.ndarray], captions: Sequence[str], question: str,
                   footer: str, path: str, boxes: Sequence[tuple[float, float, float, float]] = ()) -> str:
    """Save a row of `images` (uint8 `[S, S, 3]`) with `captions` under a title (the question)
    and a `footer` line; the 0-1000 `boxes` (one per image after the first) are outlined on
    the first image (drawn as for a square source image). Returns `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    count = len(images)
    fig, axes = plt.subplots(1, count, figsize=(2.6 * count, 3.4), squeeze=False)
    for k, (ax, image, caption) in enumerate(zip(axes[0], images, captions)):
        ax.imshow(image, interpolation="nearest")
        ax.set_title("\n".join(textwrap.wrap(caption, 28)), fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        if k == 0:
            size = image.shape[0]
            for j, (x1, y1, x2, y2) in enumerate(boxes, start=2):
                s = size / 1000.0
                ax.add_patch(Rectangle((x1 * s, y1 * s), (x2 - x1) * s, (y2 - y1) * s, fill=False,
                                       edgecolor="tab:orange", linewidth=1.2))
                ax.text(x1 * s + 2, y1 * s + 10, str(j), color="tab:orange", fontsize=7)
    fig.suptitle(question, fontsize=10)
    fig.text(0.5, 0.02, footer, ha="center", fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 0.92))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
