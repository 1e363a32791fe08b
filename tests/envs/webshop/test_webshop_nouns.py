"""Title nouns: the lexicon fallback, and how the tagger is chosen (spaCy when its model loads)."""

import sys
import types

import pytest

from hiper_envs.webshop import nouns, vocab
from hiper_envs.webshop.catalog import get_catalog


@pytest.fixture(autouse=True)
def fresh_tagger_cache():
    nouns.get_title_noun_tagger.cache_clear()
    yield
    nouns.get_title_noun_tagger.cache_clear()


def test_lexicon_keeps_nouns_and_drops_function_words_numbers_and_adjectives():
    title = "Lumora Sulfate Free Argan Oil Shampoo for Dry Hair, 16 oz (Pack of 2)"
    assert nouns.lexicon_title_nouns(title) == [
        "lumora",
        "sulfate",
        "argan",
        "oil",
        "shampoo",
        "hair",
        "oz",
        "pack",
    ]
    assert nouns.lexicon_title_nouns("Men's Breathable Padded Running Shoes") == ["men", "running", "shoes"]
    assert nouns.lexicon_title_nouns("Adjustable Cable Table") == ["cable", "table"]
    assert nouns.lexicon_title_nouns("") == []


def test_lexicon_finds_the_product_noun_of_every_generated_title():
    catalog = get_catalog(num_products=1000, seed=0)
    head_nouns = {k.query: k.noun.split()[-1].split("-")[-1] for c in vocab.CATEGORIES for k in c.types}
    for product in catalog.products:
        assert head_nouns[product.query] in nouns.lexicon_title_nouns(product.title), product.title


def test_auto_falls_back_to_the_lexicon_without_spacy(monkeypatch):
    monkeypatch.setitem(sys.modules, "spacy", None)  # import spacy -> ImportError
    monkeypatch.delenv(nouns.ENV_VAR, raising=False)
    assert nouns.tagger_name("auto") == "lexicon"
    with pytest.raises(RuntimeError, match="en_core_web_sm"):
        nouns.get_title_noun_tagger("spacy")


def test_spacy_is_used_when_its_model_loads(monkeypatch):
    class Token:
        def __init__(self, text, pos):
            self.text, self.pos_ = text, pos

    def fake_nlp(text):
        return [Token(w, "ADJ" if w == "Red" else "PROPN") for w in text.split()]

    fake = types.SimpleNamespace(load=lambda name: fake_nlp if name == "en_core_web_sm" else None)
    monkeypatch.setitem(sys.modules, "spacy", fake)
    monkeypatch.delenv(nouns.ENV_VAR, raising=False)
    name, tagger = nouns.get_title_noun_tagger("auto")
    assert name == "spacy:en_core_web_sm"
    assert tagger("Red Lipstick Set") == ["lipstick", "set"]
    nouns.get_title_noun_tagger.cache_clear()
    monkeypatch.setenv(nouns.ENV_VAR, "lexicon")
    assert nouns.tagger_name("auto") == "lexicon"


def test_unknown_choice_is_an_error():
    with pytest.raises(ValueError, match="pos tagger"):
        nouns.get_title_noun_tagger("nltk")
