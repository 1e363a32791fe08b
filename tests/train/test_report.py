"""The printed run summary."""

from hiper_jax.train.report import summary_table


def test_first_and_last_evaluations_are_compared():
    table = summary_table([{"iteration": 0, "eval/success": 0.25, "eval/episodes": 8},
                           {"iteration": 1, "train/success": 0.5},
                           {"iteration": 4, "eval/success": 0.5, "eval/episodes": 8, "final": 1.0}])
    assert "before (it 0)" in table and "after (it 4)" in table and "+25.0" in table


def test_a_single_evaluation_is_not_compared_with_itself():
    """A run stopped (e.g. by SIGTERM) before its next evaluation."""
    table = summary_table([{"iteration": 0, "eval/success": 0.25, "eval/episodes": 8, "eval/success/a": 0.5},
                           {"iteration": 1, "train/success": 0.5}])
    assert "before (it" not in table and "change" not in table
    assert "it 0" in table and "25.0" in table and "50.0" in table
    assert "training stopped after iteration 1" in table


def test_no_evaluation_no_table():
    assert summary_table([{"iteration": 0, "train/success": 0.1}]) == ""
