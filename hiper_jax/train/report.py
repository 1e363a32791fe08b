"""A printed summary of a run: evaluation before and after training, per task type."""

from __future__ import annotations

from typing import Sequence

ROWS = (
    ("success", "success (%)", 100.0),
    ("mean_return", "mean return", 1.0),
    ("mean_turns", "mean turns", 1.0),
    ("invalid_rate", "invalid actions (%)", 100.0),
    ("format_error_rate", "format errors (%)", 100.0),
    ("switch_rate", "SWITCH per turn (%)", 100.0),
    ("mean_segment_turns", "turns per subgoal", 1.0),
)


def summary_table(records: Sequence[dict]) -> str:
    """Compares the first and the last evaluation of a run as a text table ("" without evals)."""
    evals = [r for r in records if "eval/success" in r]
    if not evals:
        return ""
    first, last = evals[0], evals[-1]
    task_types = sorted({k[len("eval/success/"):] for r in (first, last) for k in r
                         if k.startswith("eval/success/")})
    rows = [(label, scale, f"eval/{key}") for key, label, scale in ROWS]
    rows += [(f"  {t}", 100.0, f"eval/success/{t}") for t in task_types]
    head_before = f"before (it {first['iteration']})"
    head_after = f"after (it {last['iteration']})"
    width = max(len(label) for label, _, _ in rows) + 2
    lines = [f"{'eval metric':<{width}}{head_before:>16}{head_after:>16}{'change':>10}",
             "-" * (width + 42)]
    for label, scale, key in rows:
        if key not in first and key not in last:
            continue
        before, after = first.get(key, float("nan")) * scale, last.get(key, float("nan")) * scale
        lines.append(f"{label:<{width}}{before:>16.1f}{after:>16.1f}{after - before:>+10.1f}")
    lines.append(f"(eval episodes: {int(last.get('eval/episodes', 0))}; success per task type in %)")
    return "\n".join(lines)
