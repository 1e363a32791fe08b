"""Parsing Plan-Execute responses: ``<switch>KEEP|SWITCH</switch><subgoal>..</subgoal><action>..</action>``.

:func:`parse_response` accepts any string and never raises. The first complete block of each tag
counts; tags are matched case-insensitively and surrounding whitespace is ignored.

Validity (the published HiPER rules): a response is valid when all three blocks are present
and the switch word is KEEP or SWITCH. For segmentation a missing or unknown switch word counts
as KEEP, so only an explicit SWITCH (or turn 0) opens a new subgoal segment.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

BLOCKS = ("switch", "subgoal", "action")
SWITCH_WORDS = ("KEEP", "SWITCH")
_FLAGS = re.IGNORECASE | re.DOTALL | re.ASCII
# Opening and closing tags are searched separately: the first opening tag, then the first
# closing tag after it, is the leftmost match of ``<tag>(.*?)</tag>`` and takes linear time,
# where that one pattern rescans the rest of the text from every unclosed opening tag
# (quadratic: 16,000 unclosed "<action>" took 9.6 s).
_TAG_RE = {
    name: (re.compile(rf"<\s*{name}\s*>", _FLAGS), re.compile(rf"<\s*/\s*{name}\s*>", _FLAGS))
    for name in BLOCKS
}
# The same patterns over UTF-8 bytes, so block positions can be found in byte offsets.
_TAG_RE_BYTES = {
    name: tuple(re.compile(pattern.pattern.encode(), _FLAGS) for pattern in pair)
    for name, pair in _TAG_RE.items()
}
_SPACES = re.compile(r"\s+")


@dataclasses.dataclass(frozen=True)
class Block:
    """One ``<tag>text</tag>`` block: its stripped text and character span (tags included)."""

    text: str
    start: int
    end: int


@dataclasses.dataclass(frozen=True)
class ParsedResponse:
    """What a response says.

    Attributes:
      switch_word: the upper-cased switch text, or None when the block is missing.
      is_switch: True only for an explicit SWITCH.
      subgoal: the subgoal text (whitespace collapsed), or None when missing.
      action: the action text (whitespace collapsed), or None when missing.
      valid: all three blocks present and the switch word is KEEP or SWITCH.
      blocks: the located blocks by tag name (for token spans).
    """

    switch_word: Optional[str]
    is_switch: bool
    subgoal: Optional[str]
    action: Optional[str]
    valid: bool
    blocks: dict

    @property
    def errors(self) -> tuple[str, ...]:
        """Human-readable reasons the response is invalid (empty when valid)."""
        missing = tuple(f"missing <{name}> block" for name in BLOCKS if name not in self.blocks)
        if self.switch_word is not None and self.switch_word not in SWITCH_WORDS:
            missing += (f"switch word {self.switch_word!r} is not KEEP or SWITCH",)
        return missing


def _normalise(text: str) -> str:
    return _SPACES.sub(" ", text).strip()


def find_blocks(response) -> dict:
    """Locates the first complete block of each tag: ``{name: Block}`` for those present.

    A block is the first opening tag and the first closing tag after it. Linear in the length
    of ``response``.

    ``response`` is a ``str`` (spans in characters) or UTF-8 ``bytes`` (spans in bytes; the
    block text is then decoded with replacement characters).
    """
    as_bytes = isinstance(response, (bytes, bytearray))
    found = {}
    for name, (opening, closing) in (_TAG_RE_BYTES if as_bytes else _TAG_RE).items():
        start = opening.search(response)
        if start is None:
            continue
        end = closing.search(response, start.end())
        if end is None:
            continue
        text = response[start.end(): end.start()]
        if as_bytes:
            text = bytes(text).decode("utf-8", errors="replace")
        found[name] = Block(_normalise(text), start.start(), end.end())
    return found


def parse_response(response) -> ParsedResponse:
    """Parses one response string; anything that is not a string parses as empty. Never raises."""
    if not isinstance(response, str):
        response = "" if response is None else str(response)
    blocks = find_blocks(response)
    switch_word = blocks["switch"].text.upper() if "switch" in blocks else None
    subgoal = blocks["subgoal"].text if "subgoal" in blocks else None
    action = blocks["action"].text if "action" in blocks else None
    valid = len(blocks) == len(BLOCKS) and switch_word in SWITCH_WORDS
    return ParsedResponse(
        switch_word=switch_word,
        is_switch=switch_word == "SWITCH",
        subgoal=subgoal,
        action=action,
        valid=valid,
        blocks=blocks,
    )


@dataclasses.dataclass(frozen=True)
class TurnDecision:
    """A parsed response resolved against the agent's current subgoal.

    Attributes:
      switch: the policy said SWITCH (the HAE ``switch`` flag; turn 0 opens a segment anyway).
      subgoal: the subgoal in force after this turn: the written one on SWITCH or on the first
        turn, else the current one (KEEP copies it).
      action: the string sent to the environment ("" when the response had no action).
      valid: the response's format was valid.
      keep_changed: not SWITCH, not the first turn, and the written subgoal differs from the
        current one (both non-empty).
    """

    switch: bool
    subgoal: str
    action: str
    valid: bool
    keep_changed: bool


def decide_turn(parsed: ParsedResponse, current_subgoal: Optional[str], first_turn: bool) -> TurnDecision:
    """Applies KEEP/SWITCH to the current subgoal (None before the first subgoal)."""
    written = parsed.subgoal or ""
    current = current_subgoal or ""
    opens_segment = parsed.is_switch or first_turn
    return TurnDecision(
        switch=parsed.is_switch,
        subgoal=(written or current) if opens_segment else current,
        action=parsed.action or "",
        valid=parsed.valid,
        keep_changed=not opens_segment and bool(written) and bool(current) and written != current,
    )


def format_response(switch: bool, subgoal: str, action: str) -> str:
    """The canonical response text, e.g. for demonstrations and scripted policies."""
    word = "SWITCH" if switch else "KEEP"
    return f"<switch>{word}</switch><subgoal>{subgoal}</subgoal><action>{action}</action>"
