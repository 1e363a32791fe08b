"""Gymnasium spaces shared by the text environments."""

from __future__ import annotations

from typing import Any

import gymnasium


class TextSpace(gymnasium.spaces.Space[str]):
    """Any string (pages hold arbitrary product text, actions are free text)."""

    def __init__(self) -> None:
        super().__init__(shape=None, dtype=None)

    def contains(self, x: Any) -> bool:
        return isinstance(x, str)

    def sample(self, mask: Any = None, probability: Any = None) -> str:
        return ""

    @property
    def is_np_flattenable(self) -> bool:
        return False
