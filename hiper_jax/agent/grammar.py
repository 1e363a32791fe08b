"""The response grammar of constrained decoding: which token sequences a response may take.

A constrained response follows the prompt style's format and names one of *this turn's*
admissible actions::

    plan_execute: <switch>KEEP|SWITCH</switch><subgoal>TEXT</subgoal><action>ACTION</action><stop>
    flat:         <action>ACTION</action><stop>

Each turn, :meth:`ResponseGrammar.tables` writes every response the grammar admits for a row
as one *alternative*: a token sequence in which :data:`WILD` stands for free text (the subgoal
of a SWITCH, or the filler of a template slot such as WebShop's ``search[<your query>]``).
The sampler (:mod:`hiper_jax.sampling`) walks all alternatives of a row at once and only emits
tokens that keep at least one alive, so no host round trip is needed per token. Free text is
drawn from :attr:`ResponseGrammar.text_mask` (printable ASCII tokens without ``< > [ ]``, so
text can never run into the closing tag) and bounded by a per-row token budget.

On KEEP the subgoal is copied, not written: when a subgoal is in force, the KEEP alternative
spells it out literally (those tokens are then forced, log-prob 0), which is what the parser
does with a KEEP anyway (:func:`hiper_jax.agent.parsing.decide_turn`). When the env names the
task's subgoals (``AgentView.admissible_subgoals``, e.g. ALFWorld's ``subgoals=True``), a new
subgoal is one of those instead of free text: the planner chooses, as the actor does.

Tokenisation is piecewise: each literal piece (``"<switch>SWITCH</switch><subgoal>"``,
``"</subgoal><action>go to desk 1</action>"``, ...) is encoded on its own and cached, and free
text between pieces is encoded on its own. The sampler can therefore only produce that
tokenisation, and :meth:`ResponseGrammar.response_ids` gives the same tokens for a supervised
target, so a warm start learns exactly the token sequences it will be asked to sample.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple, Optional, Union

import numpy as np

from hiper_jax.agent.prompts import STYLES, AgentView
from hiper_jax.agent.spans import TokenBytes
from hiper_jax.rollout.packing import bucket_size

PAD = -1    # no entry (after an alternative's last token)
# How the allowed set of a response position is described (:func:`allowed_sets`):
ALL, SET, TEXT = 0, 1, 2  # the whole vocabulary; listed ids; text_mask plus listed ids
WILD = -2   # free text: text tokens until the entry that follows it
SLOT = re.compile(r"<[A-Za-z][A-Za-z _-]*>")  # a template slot in an admissible action: <your query>
TEXT_BYTES = frozenset(range(0x20, 0x7F)) - frozenset(b"<>[]")

Piece = Union[str, None]  # a literal string, or None for free text


class GrammarTables(NamedTuple):
    """One turn's alternatives for a batch of rows (host arrays, static bucketed shapes).

    Attributes:
      alternatives: ``[B, M, D]`` int32 token ids, :data:`WILD` and :data:`PAD`; a row with no
        alternative (all :data:`PAD`) is sampled without a constraint.
      text_budget: ``[B]`` int32, tokens per stretch of free text at most (at least 1).
    """

    alternatives: np.ndarray
    text_budget: np.ndarray


class ResponseGrammar:
    """Builds constraint tables and supervised targets for one tokenizer and prompt style.

    Args:
      tokenizer: the chat tokenizer (``encode(text, add_special_tokens=False)``).
      token_bytes: its :class:`~hiper_jax.agent.spans.TokenBytes` table (for the text mask).
      style: ``"plan_execute"`` or ``"flat"``.
      stop_id: the token that ends every response.
      max_text_tokens: tokens per stretch of free text at most (the subgoal, a slot filler).
    """

    def __init__(self, tokenizer, token_bytes: TokenBytes, style: str, stop_id: int,
                 max_text_tokens: int = 24):
        if style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {style!r}")
        if max_text_tokens < 1:
            raise ValueError(f"max_text_tokens must be >= 1, got {max_text_tokens}")
        self.tokenizer = tokenizer
        self.style = style
        self.stop_id = int(stop_id)
        self.max_text_tokens = int(max_text_tokens)
        self.text_mask = text_token_mask(token_bytes, special_ids=_special_ids(tokenizer))
        self._cache: dict[str, tuple[int, ...]] = {}

    # tokens -------------------------------------------------------------------------------

    def encode(self, text: str) -> tuple[int, ...]:
        """Token ids of one piece of text (cached: each distinct piece is tokenised once)."""
        ids = self._cache.get(text)
        if ids is None:
            ids = tuple(self.tokenizer.encode(text, add_special_tokens=False))
            self._cache[text] = ids
        return ids

    def _pieces(self, view: AgentView) -> list[list[Piece]]:
        """Every response the grammar admits for ``view``, as lists of pieces."""
        tails = [_action_pieces(action, "</subgoal><action>" if self.style == "plan_execute"
                                else "<action>") for action in dict.fromkeys(view.admissible_actions)]
        if self.style == "flat":
            return tails
        words = ["SWITCH"] if view.subgoal else ["KEEP", "SWITCH"]
        heads: list[list[Piece]] = []
        if view.subgoal:  # KEEP copies the subgoal in force
            heads.append(["<switch>KEEP</switch><subgoal>" + view.subgoal])
        for word in words:
            if view.admissible_subgoals:
                heads.extend([f"<switch>{word}</switch><subgoal>" + subgoal]
                             for subgoal in dict.fromkeys(view.admissible_subgoals))
            else:
                heads.append([f"<switch>{word}</switch><subgoal>", None])
        return [head + tail for head in heads for tail in tails]

    def _sequence(self, pieces: Sequence[Piece]) -> list[int]:
        ids: list[int] = []
        for piece in pieces:
            ids.extend([WILD] if piece is None else self.encode(piece))
        ids.append(self.stop_id)
        return ids

    def tables(self, views: Sequence[AgentView], max_new_tokens: int) -> GrammarTables:
        """The alternatives of each view's turn, padded to ``[B, M, D]`` (bucketed sizes).

        An alternative that cannot fit in ``max_new_tokens`` (e.g. KEEP copying a long
        subgoal) is left out; a row left with none raises ValueError (the responses of that
        turn cannot fit: raise ``sampling.max_new_tokens``). Each row's text budget is the
        largest that lets every alternative with free text fit.
        """
        rows, budgets = [], []
        for view in views:
            kept, budget = [], self.max_text_tokens
            for pieces in self._pieces(view):
                seq = self._sequence(pieces)
                stretches = seq.count(WILD)
                literal = len(seq) - stretches
                if literal + stretches > max_new_tokens:
                    continue
                kept.append(seq)
                if stretches:  # every stretch may use the budget and the response still fits
                    budget = min(budget, (max_new_tokens - literal) // stretches)
            if view.admissible_actions and not kept:
                raise ValueError(
                    f"no constrained response fits in sampling.max_new_tokens={max_new_tokens} "
                    f"(admissible actions {list(view.admissible_actions)[:5]}...)")
            rows.append(kept)
            budgets.append(budget)
        num_alts = bucket_size(max((len(r) for r in rows), default=1))
        depth = bucket_size(max((len(seq) for r in rows for seq in r), default=1), 8)
        alternatives = np.full((len(views), num_alts, depth), PAD, np.int32)
        for b, row in enumerate(rows):
            for m, seq in enumerate(row):
                alternatives[b, m, : len(seq)] = seq
        return GrammarTables(alternatives, np.asarray(budgets, np.int32))

    def response_ids(self, view: AgentView, switch: bool, subgoal: str, action: str) -> list[int]:
        """The tokens of the response ``(switch, subgoal, action)`` as the grammar writes it
        (for supervised targets); the stop token included.

        The action is matched against ``view.admissible_actions`` (a template slot takes the
        filler from ``action``); an action that matches none is tokenised as if admissible.
        On KEEP with a subgoal in force, the copied subgoal is the one in force.
        """
        tail_prefix = "</subgoal><action>" if self.style == "plan_execute" else "<action>"
        tail = _fill(_action_pieces(action, tail_prefix), [])
        for template in view.admissible_actions:
            fillers = _match_template(template, action)
            if fillers is not None:
                tail = _fill(_action_pieces(template, tail_prefix), fillers)
                break
        word = "SWITCH" if switch else "KEEP"
        if self.style == "flat":
            pieces = tail
        elif not switch and view.subgoal:
            pieces = [("<switch>KEEP</switch><subgoal>" + view.subgoal, False)] + tail
        elif subgoal in view.admissible_subgoals:
            pieces = [(f"<switch>{word}</switch><subgoal>" + subgoal, False)] + tail
        else:
            pieces = [(f"<switch>{word}</switch><subgoal>", False), (subgoal, True)] + tail
        ids: list[int] = []
        for text, free in pieces:
            ids.extend(self.tokenizer.encode(text, add_special_tokens=False) if free else self.encode(text))
        return ids + [self.stop_id]


def pad_tables(alternatives: np.ndarray, num_alternatives: int, depth: int) -> np.ndarray:
    """``alternatives [B, M, D]`` padded with :data:`PAD` to ``[B, num_alternatives, depth]``."""
    batch, have_m, have_d = alternatives.shape
    if (have_m, have_d) == (num_alternatives, depth):
        return alternatives
    out = np.full((batch, num_alternatives, depth), PAD, alternatives.dtype)
    out[:, :have_m, :have_d] = alternatives
    return out


def _action_pieces(action: str, prefix: str) -> list[Piece]:
    """``prefix + action + "</action>"`` as pieces, each template slot a free-text piece."""
    parts = SLOT.split(action)
    pieces: list[Piece] = [prefix + parts[0]]
    for part in parts[1:]:
        pieces.extend([None, part])
    pieces[-1] = pieces[-1] + "</action>"
    return pieces


def _match_template(template: str, action: str) -> Optional[list[str]]:
    """The slot fillers when ``action`` is an instance of ``template`` (None if it is not)."""
    parts = SLOT.split(template)
    if len(parts) == 1:
        return [] if template == action else None
    pattern = re.escape(parts[0]) + "".join("(.+?)" + re.escape(part) for part in parts[1:])
    match = re.fullmatch(pattern, action, re.DOTALL)
    return list(match.groups()) if match else None


def _fill(pieces: list[Piece], fillers: list[str]) -> list[tuple[str, bool]]:
    """Pieces with free-text slots replaced by fillers: ``[(text, is_free_text)]``."""
    out, k = [], 0
    for piece in pieces:
        if piece is None:
            out.append((fillers[k] if k < len(fillers) else "", True))
            k += 1
        else:
            out.append((piece, False))
    return out


def _special_ids(tokenizer) -> set[int]:
    return {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}


def text_token_mask(token_bytes: TokenBytes, special_ids: set[int] = frozenset()) -> np.ndarray:
    """``[V]`` bool: tokens that free text may use (non-empty, printable ASCII without
    ``< > [ ]``, not special)."""
    mask = np.zeros(len(token_bytes.pieces), bool)
    for token_id, piece in enumerate(token_bytes.pieces):
        mask[token_id] = bool(piece) and token_id not in special_ids and all(b in TEXT_BYTES for b in piece)
    return mask


def allowed_sets(allowed: np.ndarray, text_on: np.ndarray, text_mask: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Compact allowed sets of one response from the sampler's per-step output.

    Args:
      allowed: ``[R, C]`` int allowed ids per position (repeats; ``V = len(text_mask)`` unused).
      text_on: ``[R]`` bool, text tokens were allowed too.
      text_mask: ``[V]`` bool.

    Returns:
      ``mode [R]`` int8 (:data:`ALL` where nothing was listed: an unconstrained row, :data:`SET`,
      :data:`TEXT`) and ``ids [R, K]`` int32 distinct listed ids (-1 padding), without the ids
      that ``text_mask`` already covers where the mode is :data:`TEXT`, so each allowed token
      is counted once.
    """
    vocab = len(text_mask)
    allowed = np.asarray(allowed)
    text_on = np.asarray(text_on, bool)
    ids = np.sort(allowed, axis=1)
    drop = ids >= vocab
    drop[:, 1:] |= ids[:, 1:] == ids[:, :-1]
    drop |= text_on[:, None] & text_mask[np.minimum(ids, vocab - 1)]
    ids = np.sort(np.where(drop, vocab, ids), axis=1)
    count = np.sum(ids < vocab, axis=1)
    width = max(int(count.max(initial=0)), 1)
    ids = np.where(ids[:, :width] < vocab, ids[:, :width], -1).astype(np.int32)
    mode = np.where(text_on, TEXT, np.where(count > 0, SET, ALL)).astype(np.int8)
    return mode, ids


def forced_tokens(mode: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``[...]`` bool: positions whose allowed set (:func:`allowed_sets`) has a single token."""
    return (np.asarray(mode) == SET) & (np.sum(np.asarray(ids) >= 0, axis=-1) == 1)
