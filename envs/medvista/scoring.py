"""The benchmarks' own scoring of an answer.

Closed questions (yes/no, a choice) count as correct on normalised exact match, the accuracy
VQA-RAD, SLAKE and PathVQA report. Open questions are scored by token recall, the share of
the reference's tokens found in the prediction (the open-question metric of the LLaVA-Med
evaluations of these three data sets); exact match and token F1 are reported beside it.
Normalisation: lower case, punctuation to spaces, the articles a/an/the dropped, whitespace
collapsed, and number words zero..ten written as digits ("two" -> "2").

Recall alone rewards listing many words ("left right upper lower ..." recalls most locations);
`score(..., open_metric="f1")` or `"exact"` is available for training where that matters.
"""

from __future__ import annotations

import collections
import re
import string

ARTICLES = frozenset({"a", "an", "the"})
NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"))}
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
OPEN_METRICS = ("recall", "f1", "exact")


def tokens(text: str) -> list[str]:
    """Normalised tokens of `text` (see the module docstring)."""
    words = _PUNCTUATION.sub(" ", str(text).lower()).split()
    return [NUMBER_WORDS.get(w, w) for w in words if w not in ARTICLES]


def normalize(text: str) -> str:
    """Normalised answer text: its tokens joined by single spaces."""
    return " ".join(tokens(text))


def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


def token_recall(prediction: str, reference: str) -> float:
    """|reference tokens found in the prediction| / |reference tokens| (multiset; 1.0 for an
    empty reference only when the prediction is empty too)."""
    ref, pred = collections.Counter(tokens(reference)), collections.Counter(tokens(prediction))
    total = sum(ref.values())
    if total == 0:
        return float(not pred)
    return sum((ref & pred).values()) / total


def token_f1(prediction: str, reference: str) -> float:
    ref, pred = collections.Counter(tokens(reference)), collections.Counter(tokens(prediction))
    common = sum((ref & pred).values())
    if common == 0:
        return float(not ref and not pred)
    precision, recall = common / sum(pred.values()), common / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


def score(prediction: str, reference: str, answer_type: str, open_metric: str = "recall") -> dict:
    """`{"score", "exact_match", "token_recall", "token_f1"}`; score in [0, 1]: exact match for
    closed questions, `open_metric` for open ones."""
    if answer_type not in ("closed", "open"):
        raise ValueError(f"answer_type must be 'closed' or 'open', got {answer_type!r}")
    if open_metric not in OPEN_METRICS:
        raise ValueError(f"open_metric must be one of {OPEN_METRICS}, got {open_metric!r}")
    exact = exact_match(prediction, reference)
    recall, f1 = token_recall(prediction, reference), token_f1(prediction, reference)
    if answer_type == "closed":
        value = float(exact)
    else:
        value = {"recall": recall, "f1": f1, "exact": float(exact)}[open_metric]
    return {"score": value, "exact_match": exact, "token_recall": recall, "token_f1": f1}
