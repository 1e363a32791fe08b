"""Records shared by the MedVista loaders, generator, env and oracle."""

from __future__ import annotations

import dataclasses

from hiper_envs.medvista.imaging import Box

ANSWER_TYPES = ("closed", "open")
SPLITS = ("train", "validate", "test")


class MedVistaDataError(ValueError):
    """A data file does not follow its dataset's layout; the message names the file and field."""


@dataclasses.dataclass(frozen=True)
class Region:
    """A named box of an image (a planted finding, or an object of SLAKE's detection.json)."""

    name: str
    box: Box  # 0-1000 coordinates of the full image


@dataclasses.dataclass(frozen=True)
class VQAItem:
    """One question about one image, as every loader returns it.

    `answer_type` is "closed" (yes/no or a choice; scored by normalised exact match) or "open"
    (scored by token recall). `candidates` are the answers offered as admissible actions (empty
    when the question has no fixed set). `regions` are known boxes of the image (findings of
    the generated data, SLAKE's detection boxes), `focus` the box a question asks about (if it
    names one); the oracle zooms with them.
    """

    qid: str
    dataset: str
    split: str
    image_id: str
    image_path: str
    question: str
    answer: str
    answer_type: str
    question_type: str = ""
    modality: str = ""
    candidates: tuple[str, ...] = ()
    regions: tuple[Region, ...] = ()
    focus: Box | None = None

    def __post_init__(self) -> None:
        if self.answer_type not in ANSWER_TYPES:
            raise ValueError(f"answer_type must be one of {ANSWER_TYPES}, got {self.answer_type!r}")
