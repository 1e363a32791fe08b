"""Benchmark scoring: normalisation, closed exact match, open token recall / F1."""

import pytest

from hiper_envs.medvista import scoring


def test_normalisation_drops_case_punctuation_articles_and_writes_numbers_as_digits():
    assert scoring.normalize("  The Left  Lung. ") == "left lung"
    assert scoring.normalize("Two") == "2"
    assert scoring.tokens("an X-ray, a CT") == ["x", "ray", "ct"]


@pytest.mark.parametrize("prediction, reference, expected", [
    ("Yes", "yes", 1.0), ("yes.", "Yes", 1.0), ("no", "yes", 0.0), ("yes, it is", "yes", 0.0)])
def test_closed_questions_are_scored_by_exact_match(prediction, reference, expected):
    assert scoring.score(prediction, reference, "closed")["score"] == expected


def test_open_questions_are_scored_by_token_recall_with_exact_match_beside_it():
    result = scoring.score("the right lung", "left lung", "open")
    assert result["token_recall"] == 0.5 and result["score"] == 0.5
    assert result["exact_match"] is False
    assert result["token_f1"] == pytest.approx(0.5)  # precision 1/2, recall 1/2
    assert scoring.score("left lung and heart", "left lung", "open")["score"] == 1.0
    assert scoring.score("left lung and heart", "left lung", "open", open_metric="exact")["score"] == 0.0
    f1 = scoring.score("left lung and heart", "left lung", "open", open_metric="f1")["score"]
    assert f1 == pytest.approx(2 * (2 / 4) * 1.0 / (2 / 4 + 1.0))


def test_recall_counts_repeated_reference_tokens_once_each():
    assert scoring.token_recall("lung", "lung lung") == 0.5
    assert scoring.token_recall("", "") == 1.0 and scoring.token_recall("x", "") == 0.0


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="answer_type"):
        scoring.score("a", "b", "free")
    with pytest.raises(ValueError, match="open_metric"):
        scoring.score("a", "b", "open", open_metric="bleu")
