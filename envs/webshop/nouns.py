"""Title nouns for WebShop's type reward: spaCy when its English model is installed, else a lexicon.

WebShop's type reward compares the nouns (spaCy POS ``NOUN``/``PROPN``) of the purchased and
the goal product titles. spaCy's ``en_core_web_sm`` cannot be installed from PyPI, so when it is
missing we fall back to a tagger that needs no download: a product title is mostly a noun
phrase (brand, materials, product nouns, all tagged ``PROPN``/``NOUN`` by spaCy in title case),
so every word counts as a noun except function words, numbers, words in a list of adjectives
common in product titles, and words with adjective or participle endings. `tagger_name()` says
which one runs; the environment reports it in ``info["pos_tagger"]``.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from typing import Literal

TaggerChoice = Literal["auto", "spacy", "lexicon"]
SPACY_NOUN_TAGS = ("PNOUN", "NOUN", "PROPN")
SPACY_MODEL = "en_core_web_sm"
ENV_VAR = "HIPER_WEBSHOP_POS_TAGGER"

_FUNCTION_WORDS = frozenset(
    """a an the and or nor but so yet for of in on at to from by with without into onto upon
    over under about above below between among through during before after against within
    per via vs as than then that this these those there here which who whom whose what when
    where why how i me my mine you your yours he him his she her hers it its we us our ours
    they them their theirs is are was were be been being am do does did done have has had
    can could will would shall should may might must not no nor only also too very just
    more most less least all any both each either neither every few many much several some
    such other another own same up down out off again further once s t""".split()
)

# Adjectives that title-case product names use as modifiers (spaCy tags them ADJ).
_ADJECTIVES = frozenset(
    """new old best great good better top premium deluxe classic modern vintage retro
    elegant cute pretty beautiful lovely fancy chic stylish casual formal sexy cool
    small large big little mini huge tiny tall short long wide narrow thin thick slim
    heavy light lightweight soft hard smooth rough warm cold hot dry wet fresh pure raw
    natural organic real true whole full empty open clean clear bright dark deep
    high low extra super ultra multi non anti free easy simple quick fast slow
    strong gentle mild sweet sour salty spicy bitter rich creamy crunchy crispy tasty
    healthy safe secure quiet loud smart electric electronic digital wireless cordless
    portable durable waterproof windproof shockproof dustproof rustproof nonstick
    adjustable foldable washable reusable rechargeable breathable comfortable
    compatible flexible stretchy stretch sturdy solid hollow round square flat oval
    black white red blue green yellow orange purple pink brown gray grey beige ivory
    navy teal olive maroon tan gold golden silver bronze cream khaki nude coral
    plum berry burgundy lavender mint turquoise multicolor colorful transparent
    male female unisex adult kids baby junior senior professional personal private
    original authentic genuine official perfect ideal ready daily
    universal standard regular plus petite
    dual double triple single quad ergonomic ergonomical magnetic mechanical
    acrylic ceramic metallic plastic wooden woolen faux
    sleeveless strapless seamless""".split()
)

_ADJECTIVE_SUFFIXES = ("ous", "ful", "less", "able", "ible", "ive", "ish")
_NOUN_EXCEPTIONS = frozenset(
    "table cable vegetable bible olive drive knife life wife hive dish fish wish polish "
    "radish relish bed shed sled seed speed need bread thread".split()
)
_TOKEN = re.compile(r"[A-Za-z0-9]+(?:[.'’][A-Za-z0-9]+)*")
_NUMBER = re.compile(r"^\d+(?:[.,]\d+)*(?:st|nd|rd|th)?$")


def _is_lexicon_noun(word: str) -> bool:
    if word in _FUNCTION_WORDS or word in _ADJECTIVES or _NUMBER.match(word):
        return False
    if word in _NOUN_EXCEPTIONS:
        return True
    if len(word) > 4 and word.endswith("ed") and not word.endswith("eed"):
        return False
    return not (len(word) > 5 and word.endswith(_ADJECTIVE_SUFFIXES))


def lexicon_title_nouns(title: str) -> list[str]:
    """Lower-cased nouns of a product title by the lexicon rule (duplicates kept, in order)."""
    nouns = []
    for token in _TOKEN.findall(title):
        word = token.lower()
        for possessive in ("'s", "’s"):
            if word.endswith(possessive):
                word = word[: -len(possessive)]
        if word and _is_lexicon_noun(word):
            nouns.append(word)
    return nouns


def _load_spacy() -> Callable[[str], list[str]] | None:
    try:
        import spacy  # noqa: PLC0415 - optional dependency

        nlp = spacy.load(SPACY_MODEL)
    except Exception:  # spaCy missing, model missing, or an incompatible install
        return None

    def spacy_title_nouns(title: str) -> list[str]:
        return [t.text.lower() for t in nlp(title) if t.pos_ in SPACY_NOUN_TAGS]

    return spacy_title_nouns


@functools.cache
def get_title_noun_tagger(choice: TaggerChoice = "auto") -> tuple[str, Callable[[str], list[str]]]:
    """(name, tagger): ``"spacy:en_core_web_sm"`` when requested/available, else ``"lexicon"``.

    `choice` ``"auto"`` reads $HIPER_WEBSHOP_POS_TAGGER (``spacy``/``lexicon``) and otherwise
    uses spaCy when its model loads. ``"spacy"`` raises when the model is missing.
    """
    if choice == "auto":
        choice = os.environ.get(ENV_VAR, "auto")  # type: ignore[assignment]
    if choice not in ("auto", "spacy", "lexicon"):
        raise ValueError(f"pos tagger must be 'auto', 'spacy' or 'lexicon', got {choice!r}")
    if choice in ("auto", "spacy"):
        tagger = _load_spacy()
        if tagger is not None:
            return f"spacy:{SPACY_MODEL}", tagger
        if choice == "spacy":
            raise RuntimeError(f"spaCy's {SPACY_MODEL} is not installed; use pos_tagger='lexicon' or 'auto'")
    return "lexicon", lexicon_title_nouns


def tagger_name(choice: TaggerChoice = "auto") -> str:
    """Which title-noun tagger `choice` resolves to on this machine."""
    return get_title_noun_tagger(choice)[0]
