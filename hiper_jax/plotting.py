"""Plots people look at instead of reading numbers: HAE segments and advantage streams."""

from __future__ import annotations

import textwrap
from typing import Optional, Sequence

import numpy as np


def pyplot():
    """``matplotlib.pyplot``; headless (Agg) unless a notebook's inline backend is active."""
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_hae_trajectory(
    rewards: Sequence[float],
    hae,
    row: int = 0,
    subgoals: Optional[Sequence[str]] = None,
    title: str = "HAE on one trajectory",
):
    """Draws one trajectory's segments, rewards and the three advantage streams.

    Args:
      rewards: ``[T]`` rewards of the trajectory (as fed to HAE, before shaping).
      hae: an :class:`~hiper_jax.hae.HAEOutput` holding the trajectory at ``row``.
      subgoals: optional ``[T]`` subgoal text, written on each segment.
    Returns:
      The matplotlib Figure (two stacked axes sharing the turn axis).
    """
    plt = pyplot()
    boundary = np.asarray(hae.boundary[row], bool)
    num_turns = len(rewards)
    turns = np.arange(num_turns)
    starts = [int(t) for t in np.flatnonzero(boundary[:num_turns])]
    ends = starts[1:] + [num_turns]

    fig, (ax_r, ax_a) = plt.subplots(2, 1, figsize=(10, 6), sharex=True,
                                     gridspec_kw={"height_ratios": [1, 2]})
    colours = plt.cm.Pastel1(np.linspace(0, 1, 9))
    for k, (s, e) in enumerate(zip(starts, ends)):
        for ax in (ax_r, ax_a):
            ax.axvspan(s - 0.5, e - 0.5, color=colours[k % 9], alpha=0.6, lw=0)
        if subgoals is not None:
            ax_r.text((s + e - 1) / 2, 1.02, subgoals[s], transform=ax_r.get_xaxis_transform(),
                      ha="center", va="bottom", fontsize=8)
    ax_r.bar(turns, rewards, color="black", width=0.4)
    ax_r.set_ylabel("reward")
    ax_a.plot(turns, np.asarray(hae.adv_low[row])[:num_turns], "o-", label="A_low (action)")
    ax_a.plot(starts, np.asarray(hae.adv_high[row])[starts], "s", ms=10,
              label="A_high (subgoal, segment starts)")
    ax_a.plot(turns, np.asarray(hae.adv_term[row])[:num_turns], "^--", label="A_term (switch)")
    ax_a.axhline(0, color="grey", lw=0.8)
    ax_a.set_xlabel("turn")
    ax_a.set_ylabel("advantage")
    ax_a.legend(loc="best", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# --- transcripts with token-level advantages --------------------------------------------------

STREAM_OF_BLOCK = {"action": "A_low", "subgoal": "A_high", "switch": "A_term"}
STREAM_COLOURS = {"A_low": "#1f5fb4", "A_high": "#e08000", "A_term": "#7b2fa8"}
_FONT = dict(family="DejaVu Sans Mono", size=8.0)
_LINE_IN = 0.17   # inches per text line


# DejaVu Sans Mono's advance is 1233/2048 em. Each token is drawn as its own text at its column
# (the renderer rounds advances to whole pixels, so a long line would drift off its boxes).
_CHAR_IN = 1233 / 2048 * _FONT["size"] / 72


def token_stream(turn: dict, k: int) -> str:
    """The advantage stream of token ``k`` of a transcript turn (``"A_low"``, ``"A_high"``,
    ``"A_term"``) or ``""``: subgoal tokens carry A_high only at segment starts."""
    stream = STREAM_OF_BLOCK.get(turn["tokens"]["block"][k], "")
    if stream == "A_high" and not turn.get("segment_start", False):
        return ""
    return stream


def _wrap(texts: Sequence[str], width: int) -> list[list[tuple[int, int]]]:
    """Token ``(index, column)`` placements per line, breaking before a token that would pass
    ``width`` characters."""
    lines, line, column = [], [], 0
    for k, text in enumerate(texts):
        if line and column + len(text) > width:
            lines.append(line)
            line, column = [], 0
        line.append((k, column))
        column += len(text)
    lines.append(line)
    return lines


def _shown(text: str) -> str:
    return text.replace("\n", "\u21b5").replace("\t", " ").replace("\r", "")


def plot_transcript(record: dict, max_turns: Optional[int] = None, width_chars: int = 96,
                    scale: Optional[float] = None, title: Optional[str] = None):
    """One episode turn by turn, each response token coloured by its advantage stream.

    Action tokens are coloured by A_low, the subgoal tokens of segment starts by A_high and the
    switch tokens by A_term (diverging colour map, symmetric around 0; a line under each token
    names its stream); tokens the grammar forced (no gradient) are hatched. Segments are
    marked by a band on the left and a header with their subgoal.

    Args:
      record: a transcript of ``episodes.jsonl`` written with token advantages
        (``python -m hiper_jax.eval --checkpoint RUN_DIR --tokens``; see
        :func:`hiper_jax.eval.token_advantages`).
      max_turns: draw at most this many turns (None = all).
      width_chars: characters per response line before wrapping.
      scale: |advantage| at full colour (None = the largest among the drawn tokens).
    Returns:
      The matplotlib Figure.
    """
    plt = pyplot()
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    turns = record["turns"] if max_turns is None else record["turns"][:max_turns]
    if not turns or any("tokens" not in t for t in turns):
        raise ValueError("plot_transcript needs turns with 'tokens' (evaluate a run directory "
                         "with tokens=True / --tokens)")
    with_adv = all("adv" in t["tokens"] for t in turns)
    coloured = [abs(t["tokens"]["adv"][k]) for t in turns if with_adv
                for k in range(len(t["tokens"]["text"])) if token_stream(t, k)]
    scale = scale or max(coloured, default=0.0) or 1.0
    norm, cmap = Normalize(-scale, scale), plt.get_cmap("PiYG")

    left, right = 8, 46                       # gutter (segment band, turn, K/S); A columns
    total = left + width_chars + right
    # Lay out first (line numbers), then size the figure so that 1 data unit = 1 character.
    items, y, segment = [], 2.0, -1           # two header lines
    for t, turn in enumerate(turns):
        start = turn.get("segment_start", t == 0)
        if start:
            segment += 1
            items.append(("segment", y, segment, turn))
            y += 1
        texts = [_shown(x) for x in turn["tokens"]["text"]]
        lines = _wrap(texts, width_chars)
        items.append(("turn", y, segment, (t, turn, texts, lines)))
        y += 1 + len(lines)
    more = len(record["turns"]) - len(turns)
    height_lines = y + (1 if more else 0) + 3.5   # colour bar below
    fig = plt.figure(figsize=(total * _CHAR_IN, height_lines * _LINE_IN), dpi=110)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, total)
    ax.set_ylim(height_lines, 0)
    ax.axis("off")
    font = dict(fontfamily=_FONT["family"], fontsize=_FONT["size"], va="center", ha="left")
    outcome = "won" if record.get("won") else "lost"
    ax.text(0.5, 0.5, title or record.get("task", ""), fontweight="bold", **font)
    ax.text(0.5, 1.5, f"{record.get('task_type', '')} · {outcome} in {record.get('num_turns', len(turns))} "
            f"turns · return {record.get('return', 0):g} · seed {record.get('seed', 0)} · "
            f"task {record.get('task_index', '')}", color="#555", **font)
    bands = ("#dfe8f5", "#f5e9d8")
    segment_rows: dict[int, list[float]] = {}
    for kind, y0, seg, payload in items:
        segment_rows.setdefault(seg, [y0, y0])
        if kind == "segment":
            if seg > 0:
                ax.plot([0, total], [y0 - 0.05, y0 - 0.05], color="#999", lw=0.6, ls="--")
            ax.text(left, y0 + 0.5, f"segment {seg + 1}: {payload['subgoal'] or '(no subgoal)'}",
                    fontweight="bold", color="#333", **font)
            continue
        t, turn, texts, lines = payload
        segment_rows[seg][1] = y0 + 1 + len(lines)
        observation = _shown(turn.get("observation", ""))
        if len(observation) > width_chars:
            observation = observation[:width_chars - 3] + "..."
        ax.text(2, y0 + 0.5, f"{t:>2}", color="#333", **font)
        ax.text(5, y0 + 0.5, "S" if turn["switch"] else "K", fontweight="bold",
                color="#1a5fb4" if turn["switch"] else "#777", **font)
        ax.text(left, y0 + 0.5, observation, color="#666", fontsize=_FONT["size"] - 0.5,
                **{k: v for k, v in font.items() if k != "fontsize"})
        for row, line in enumerate(lines):
            yl = y0 + 1 + row
            for k, column in line:
                x = left + column
                stream = token_stream(turn, k)
                width = max(len(texts[k]), 0.4)
                dark = False
                if stream and with_adv:
                    level = norm(turn["tokens"]["adv"][k])
                    dark = abs(level - 0.5) > 0.36
                    ax.add_patch(Rectangle((x, yl + 0.08), width, 0.84, lw=0, facecolor=cmap(level)))
                if stream:
                    ax.plot([x + 0.1, x + width - 0.1], [yl + 0.95, yl + 0.95],
                            color=STREAM_COLOURS[stream], lw=1.2, solid_capstyle="butt")
                if turn["tokens"]["forced"][k]:
                    ax.add_patch(Rectangle((x, yl + 0.08), width, 0.84, fill=False, lw=0,
                                           hatch="//", edgecolor="#0000002a"))
                invalid = turn.get("invalid") and turn["tokens"]["block"][k] == "action"
                colour = "white" if dark else "#b33" if invalid else "#111"
                ax.text(x, yl + 0.5, texts[k], color=colour, **font)
        adv = turn.get("adv")
        if adv is not None:
            high = f"{adv[1]:+.2f}" if turn.get("segment_start", t == 0) else "  -  "
            summary = f"r {turn['reward']:g}  low {adv[0]:+.2f} high {high} term {adv[2]:+.2f}"
        else:
            summary = f"r {turn['reward']:g}"
        if turn.get("invalid"):
            summary += "  invalid"
        ax.text(left + width_chars + 2, y0 + 1.5, summary, color="#333", **font)
    for seg, (y0, y1) in segment_rows.items():
        ax.add_patch(Rectangle((0.2, y0), 1.2, y1 - y0, lw=0, facecolor=bands[seg % 2],
                               edgecolor="none"))
        ax.add_patch(Rectangle((0.2, y0), 1.2, y1 - y0, fill=False, lw=0.6, edgecolor="#888"))
    if more:
        ax.text(left, y + 0.5, f"... {more} more turns", color="#666", **font)
    # The colour bar and the legend, in the bottom lines.
    bar = fig.add_axes([left / total, 1.2 / height_lines, 0.3, 0.9 / height_lines])
    gradient = np.linspace(-scale, scale, 256)[None]
    bar.imshow(gradient, aspect="auto", cmap=cmap, norm=norm, extent=(-scale, scale, 0, 1))
    bar.set_yticks([])
    bar.tick_params(labelsize=7)
    x_legend = left + 0.3 * total + 2
    ax.text(x_legend, height_lines - 2.6, "advantage" + ("" if with_adv else " (none recorded)")
            + "; hatched: forced by the grammar (no gradient)", color="#333", **font)
    x = x_legend
    ax.text(x, height_lines - 1.5, "underline:", color="#333", **font)
    x += 11
    for name, where in (("A_low", "action"), ("A_high", "subgoal at segment starts"),
                        ("A_term", "switch")):
        label = f"{name} ({where})"
        ax.plot([x, x + len(label)], [height_lines - 1.05] * 2, color=STREAM_COLOURS[name], lw=1.2)
        ax.text(x, height_lines - 1.5, label, color="#333", **font)
        x += len(label) + 2
    return fig


def plot_task_success(summary: dict, title: str = "success per task type"):
    """Bars of success per task type with their 95% Wilson intervals (from
    :func:`hiper_jax.eval.summarize`), the overall rate as a line. Returns the Figure."""
    plt = pyplot()
    rows = [r for r in summary["rows"] if r["task_type"] != "all"]
    overall = next(r for r in summary["rows"] if r["task_type"] == "all")
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(rows) + 2), 3.6))
    x = np.arange(len(rows))
    success = np.array([100 * r["success"] for r in rows])
    # Clipped at 0: at 0% or 100% the interval's end equals the rate up to rounding.
    low = np.maximum(success - np.array([100 * r["ci_low"] for r in rows]), 0.0)
    high = np.maximum(np.array([100 * r["ci_high"] for r in rows]) - success, 0.0)
    ax.bar(x, success, color="#4c8c5a", width=0.6)
    ax.errorbar(x, success, yerr=[low, high], fmt="none", ecolor="#222", capsize=4, lw=1)
    ax.axhline(100 * overall["success"], color="#b33", lw=1, ls="--",
               label=f"all: {100 * overall['success']:.0f}% of {overall['episodes']}")
    labels = [textwrap.fill(r["task_type"].replace("_", " "), 16) + f"\n{r['successes']}/{r['episodes']}"
              for r in rows]
    ax.set_xticks(x, labels, fontsize=7)
    ax.set(ylabel="success (%)", ylim=(0, 105), title=title)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig
