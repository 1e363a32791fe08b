"""Token spans of Plan-Execute responses: which response tokens belong to which block.

For byte-level BPE tokenizers (Qwen2/2.5 and the project's tiny tokenizer) every token id maps
to a fixed byte string, so a response's byte offsets are a cumulative sum over a per-vocabulary
table built once (:class:`TokenBytes`); the blocks are then located by regex over the response
bytes. One pass per response, no decoding token by token.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from hiper_jax.agent.parsing import find_blocks


def _byte_to_unicode_table() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (GPT-2's alphabet)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class TokenBytes:
    """Per-token byte strings of a byte-level BPE tokenizer, built once.

    Args:
      tokenizer: a ``transformers`` fast tokenizer whose decoder is ByteLevel.
      vocab_size: model vocabulary size, if larger than the tokenizer's (padded embedding rows
        decode to no bytes).
    """

    def __init__(self, tokenizer, vocab_size: int | None = None):
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        if decoder is None or "ByteLevel" not in type(decoder).__name__ + repr(decoder):
            raise ValueError(
                "TokenBytes needs a byte-level BPE tokenizer (decoder ByteLevel); got decoder "
                f"{decoder!r}"
            )
        byte_of_char = {c: b for b, c in _byte_to_unicode_table().items()}
        num_tokens = len(tokenizer)
        size = max(num_tokens, vocab_size or 0)
        added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
        tokens = tokenizer.convert_ids_to_tokens(list(range(num_tokens)))
        pieces = []
        for token_id, token in enumerate(tokens):
            if token_id in added or token is None:
                pieces.append((added.get(token_id) or "").encode())
            elif all(c in byte_of_char for c in token):
                pieces.append(bytes(byte_of_char[c] for c in token))
            else:
                pieces.append(token.encode())
        pieces.extend(b"" for _ in range(size - num_tokens))
        self.pieces: list[bytes] = pieces
        self.lengths = np.array([len(p) for p in pieces], np.int64)

    def join(self, ids: Sequence[int]) -> bytes:
        """The UTF-8 bytes of a token sequence."""
        pieces = self.pieces
        return b"".join(pieces[i] for i in ids)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of a token sequence (invalid UTF-8 replaced), as the tokenizer decodes it."""
        return self.join(ids).decode("utf-8", errors="replace")

    def byte_ends(self, ids: Sequence[int]) -> np.ndarray:
        """``[L]`` end byte offset of each token in the joined bytes."""
        return np.cumsum(self.lengths[np.asarray(ids, np.int64)])


@dataclasses.dataclass(frozen=True)
class ResponseSpans:
    """Where one response's blocks are, over its ``L`` tokens.

    Attributes:
      switch, subgoal, action: ``[L]`` bool, tokens overlapping the block (tags included);
        a token straddling two blocks counts for the first, so the masks are disjoint.
      v_high_pos, v_term_pos: token index where the high / termination values are read (0).
      v_low_pos: first token after ``</subgoal>`` (else after ``</switch>``, else 0; the last
        token when the block ends the response).
    """

    switch: np.ndarray
    subgoal: np.ndarray
    action: np.ndarray
    v_high_pos: int
    v_low_pos: int
    v_term_pos: int


def response_spans(ids: Sequence[int], table: TokenBytes) -> ResponseSpans:
    """Block masks and value-read positions of one response given as token ids ``[L]``."""
    ids = np.asarray(ids, np.int64)
    num_tokens = len(ids)
    ends = table.byte_ends(ids)
    starts = ends - table.lengths[ids]
    blocks = find_blocks(table.join(ids))

    # A token overlapping a block belongs to it (tags included); a token straddling two blocks
    # (e.g. "><") belongs to the earlier one, so the masks never overlap.
    taken = np.zeros(num_tokens, bool)
    masks = {}
    for name in ("switch", "subgoal", "action"):
        mask = np.zeros(num_tokens, bool)
        if name in blocks:
            mask = (starts < blocks[name].end) & (ends > blocks[name].start) & ~taken
        taken |= mask
        masks[name] = mask

    def first_token_from(byte: int) -> int:
        after = np.flatnonzero(starts >= byte)
        return int(after[0]) if after.size else max(num_tokens - 1, 0)

    if "subgoal" in blocks:
        v_low_pos = first_token_from(blocks["subgoal"].end)
    elif "switch" in blocks:
        v_low_pos = first_token_from(blocks["switch"].end)
    else:
        v_low_pos = 0
    return ResponseSpans(
        switch=masks["switch"],
        subgoal=masks["subgoal"],
        action=masks["action"],
        v_high_pos=0,
        v_low_pos=v_low_pos,
        v_term_pos=0,
    )
