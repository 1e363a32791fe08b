"""The transcript view colours exactly the tokens that carry an advantage stream, with the
colour of their advantage, and marks segments; the task-type chart draws the summary."""

import copy

import numpy as np
import pytest
from matplotlib.colors import to_rgba
from matplotlib.patches import Rectangle

from hiper_jax.eval import episode_records, per_turn_advantages, summarize, token_advantages
from hiper_jax.plotting import plot_task_success, plot_transcript, token_stream
from tests.test_eval import hae_like_output, token_trajectories

BOUNDARY = np.array([[True, False, True], [True, False, False]])


@pytest.fixture(scope="module")
def records(tiny_tokenizer):
    trajectories, table = token_trajectories(tiny_tokenizer)
    out = hae_like_output(np.random.default_rng(7), BOUNDARY)
    return episode_records(trajectories, [0], [0, 1], per_turn_advantages(out), None, out.boundary,
                           token_advantages(trajectories, table, out))


def _coloured_boxes(fig):
    ax = fig.axes[0]
    return [p for p in ax.patches if isinstance(p, Rectangle) and p.get_fill() and not p.get_hatch()
            and p.get_height() == pytest.approx(0.84)]


def test_token_stream_rule(records):
    turns = records[0]["turns"]
    streams = [{token_stream(turn, k) for k in range(len(turn["tokens"]["text"]))} for turn in turns]
    assert streams[0] == {"A_low", "A_high", "A_term"}   # a segment start: all three streams
    assert streams[1] == {"A_low", "A_term", ""}         # not a segment start: subgoal tokens get none


def test_transcript_colours_each_stream_token_by_its_advantage(records):
    import matplotlib.pyplot as plt

    record = records[0]
    fig = plot_transcript(record)
    boxes = _coloured_boxes(fig)
    expected = [(turn, k) for turn in record["turns"] for k in range(len(turn["tokens"]["text"]))
                if token_stream(turn, k)]
    assert len(boxes) == len(expected)
    scale = max(abs(turn["tokens"]["adv"][k]) for turn, k in expected)
    cmap = plt.get_cmap("PiYG")
    # boxes are drawn token by token in order
    for box, (turn, k) in zip(boxes, expected):
        value = turn["tokens"]["adv"][k]
        assert box.get_facecolor() == pytest.approx(to_rgba(cmap((value + scale) / (2 * scale))))
        assert box.get_width() == pytest.approx(max(len(turn["tokens"]["text"][k]), 0.4))
    texts = [t.get_text() for t in fig.axes[0].texts]
    headers = [t for t in texts if t.startswith("segment ")]
    assert headers == ["segment 1: find and take the apple", "segment 2: heat the apple with the microwave"]
    hatched = [p for p in fig.axes[0].patches if p.get_hatch()]
    assert len(hatched) == 1  # the one forced token
    plt.close(fig)


def test_transcript_limits_turns_and_needs_tokens(records):
    import matplotlib.pyplot as plt

    fig = plot_transcript(records[0], max_turns=1)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "... 2 more turns" in texts and sum(t.startswith("segment ") for t in texts) == 1
    plt.close(fig)
    plain = {**records[0], "turns": [{k: v for k, v in t.items() if k != "tokens"} for t in records[0]["turns"]]}
    with pytest.raises(ValueError, match="needs turns with 'tokens'"):
        plot_transcript(plain)
    without_adv = {**records[0], "turns": [{**t, "tokens": {k: v for k, v in t["tokens"].items() if k != "adv"}}
                                           for t in records[0]["turns"]]}
    fig = plot_transcript(without_adv)
    assert _coloured_boxes(fig) == []
    plt.close(fig)


def test_task_success_bars(tiny_tokenizer):
    import matplotlib.pyplot as plt

    trajectories, _ = token_trajectories(tiny_tokenizer)   # the first won, the second lost
    won, lost = trajectories
    lost.task_type = "cool"
    won_look, lost_look = copy.deepcopy(won), copy.deepcopy(lost)
    won_look.task_type = lost_look.task_type = "look"
    # 0/3, 1/1 and 1/3: intervals that end at the rate (up to rounding) draw too
    summary = summarize([lost] * 3 + [won] + [won_look, lost_look, lost_look], seeds=[0])
    fig = plot_task_success(summary)
    bars = [p for p in fig.axes[0].patches if isinstance(p, Rectangle)]
    rows = [r for r in summary["rows"] if r["task_type"] != "all"]
    assert [b.get_height() for b in bars] == pytest.approx([100 * r["success"] for r in rows])
    assert sorted(b.get_height() for b in bars) == pytest.approx([0.0, 100 / 3, 100.0])
    plt.close(fig)
