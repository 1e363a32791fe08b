"""Prompts with images for a vision-language policy, and the turns they make, ready to re-score.

    prompter = ImagePrompter(config, tokenizer)              # a Qwen2.5-VL config
    prompt = prompter(render_prompt(view, cfg, tokenizer), images)
    prompt.token_ids    # the chat prompt, the user message opened by one image block per image
    prompt.images       # the uint8 images [S, S, 3] (not copied), prompt.grid [n, 3]
    sequence = turn_sequence(turn, config.vision)           # scoring.VisionSequence of a turn

An image block is ``<|vision_start|>``, ``t*h*w / merge**2`` ``<|image_pad|>`` placeholders,
``<|vision_end|>``, the tokens Qwen2.5-VL's chat template writes for an image; the blocks open
the last user message (the images in the order the env sent them: the full image, then each
tool's output), as the template places images given before the text. The records keep the
uint8 images and the grid, not the float patches: :func:`turn_sequence` makes the patches again
with the same pure function the policy used, so a re-scored turn sees exactly what was sampled.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from hiper_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig, VisionConfig
from hiper_jax.models.qwen2_5_vl.processing import image_grid, image_patches
from hiper_jax.tokenization import IM_START


class ImagePrompt(NamedTuple):
    """One turn's prompt with its images.

    Attributes:
        token_ids: the prompt tokens, one placeholder run per image.
        images: the uint8 images ``[H, W, C]`` the runs stand for, in order.
        grid: ``[n, 3]`` int64 ``(t, h, w)`` in patches of each image.
    """

    token_ids: list[int]
    images: tuple
    grid: np.ndarray


def image_block(grid: tuple[int, int, int], config: Qwen2_5_VLConfig) -> list[int]:
    """The tokens of one image: vision start, its placeholders, vision end."""
    t, h, w = grid
    count = t * h * w // config.vision.merge_unit
    return [config.vision_start_token_id] + [config.image_token_id] * count + [config.vision_end_token_id]


def insert_images(prompt_ids: Sequence[int], at: int, grid: np.ndarray,
                  config: Qwen2_5_VLConfig) -> list[int]:
    """``prompt_ids`` with one :func:`image_block` per row of ``grid [n, 3]`` inserted before
    position ``at``."""
    if not 0 <= at <= len(prompt_ids):
        raise ValueError(f"insert position {at} lies outside the prompt of {len(prompt_ids)} tokens")
    blocks = [token for row in np.asarray(grid).reshape(-1, 3) for token in
              image_block(tuple(int(v) for v in row), config)]
    return list(prompt_ids[:at]) + blocks + list(prompt_ids[at:])


def find_last(tokens: Sequence[int], pattern: Sequence[int]) -> int:
    """Start of the last occurrence of ``pattern`` in ``tokens``, or -1 (vectorised)."""
    tokens, pattern = np.asarray(tokens), np.asarray(pattern)
    if not len(pattern) or len(pattern) > len(tokens):
        return -1
    windows = np.lib.stride_tricks.sliding_window_view(tokens, len(pattern))
    hits = np.flatnonzero(np.all(windows == pattern, axis=1))
    return int(hits[-1]) if len(hits) else -1


class ImagePrompter:
    """Opens the last user message of a chat prompt with the blocks of its images.

    Args:
        config: the Qwen2.5-VL config (its vision tower and image token ids).
        tokenizer: the chat tokenizer the prompts were rendered with (ChatML: each message opens
            with ``<|im_start|>role\\n``).
    """

    def __init__(self, config: Qwen2_5_VLConfig, tokenizer):
        self.config = config
        self.user_header = list(tokenizer.encode(f"{IM_START}user\n", add_special_tokens=False))

    def grid(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """``[n, 3]`` int64 grid of ``images`` (checks their sides, see
        :func:`~hiper_jax.models.qwen2_5_vl.processing.image_grid`)."""
        return np.asarray([image_grid(*np.shape(image)[:2], self.config.vision) for image in images],
                          np.int64).reshape(-1, 3)

    def __call__(self, prompt_ids: Sequence[int], images: Sequence[np.ndarray]) -> ImagePrompt:
        """The :class:`ImagePrompt` of a rendered text prompt and its images.

        Raises:
            ValueError: the prompt holds no user message header, already holds vision tokens,
                or an image has sides the tower cannot cut (see ``grid``).
        """
        vision_ids = (self.config.image_token_id, self.config.vision_start_token_id,
                      self.config.vision_end_token_id, self.config.video_token_id)
        if np.isin(np.asarray(prompt_ids), vision_ids).any():
            raise ValueError("the text prompt already holds vision tokens; render it without images")
        grid = self.grid(images)
        start = find_last(prompt_ids, self.user_header)
        if start < 0:
            raise ValueError(f"the prompt has no user message header {self.user_header} "
                             "(<|im_start|>user\\n) to put its images in")
        at = start + len(self.user_header)
        return ImagePrompt(insert_images(prompt_ids, at, grid, self.config), tuple(images), grid)


def turn_sequence(turn, vision: VisionConfig):
    """The :class:`~hiper_jax.models.qwen2_5_vl.scoring.VisionSequence` (prompt + response
    tokens, patches, grid) of a recorded :class:`~hiper_jax.rollout.types.TurnRecord`."""
    from hiper_jax.models.qwen2_5_vl.scoring import VisionSequence

    tokens = np.concatenate([turn.prompt_ids, turn.response_ids]).astype(np.int32)
    if not turn.images:
        return VisionSequence(tokens)
    pixels, grid = image_patches(turn.images, vision)
    if turn.image_grid is not None and not np.array_equal(grid, turn.image_grid):
        raise ValueError(f"the turn's images have grid {grid.tolist()}, but it records "
                         f"{np.asarray(turn.image_grid).tolist()}")
    return VisionSequence(tokens, pixels, [tuple(int(v) for v in g) for g in grid])
