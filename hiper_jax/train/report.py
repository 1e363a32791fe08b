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
    """Compares the first and the last evaluation of a run as a text table ("" without evals).

    With a single evaluation (a run stopped before its next one) that one is shown alone, with
    the iteration training stopped at, rather than compared with itself.
    """
    evals = [r for r in records if "eval/success" in r]
    if not evals:
        return ""
    if len(evals) == 1:
        return _single_table(evals[0], last_iteration=max(r.get("iteration", 0) for r in records))
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


def _single_table(record: dict, last_iteration: int) -> str:
    task_types = sorted(k[len("eval/success/"):] for k in record if k.startswith("eval/success/"))
    rows = [(label, scale, f"eval/{key}") for key, label, scale in ROWS]
    rows += [(f"  {t}", 100.0, f"eval/success/{t}") for t in task_types]
    head = f"it {record['iteration']}"
    width = max(len(label) for label, _, _ in rows) + 2
    lines = [f"{'eval metric':<{width}}{head:>16}", "-" * (width + 16)]
    lines += [f"{label:<{width}}{record[key] * scale:>16.1f}" for label, scale, key in rows if key in record]
    lines.append(f"(one evaluation, at iteration {record['iteration']}; training stopped after iteration "
                 f"{last_iteration}, before the next evaluation; eval episodes: "
                 f"{int(record.get('eval/episodes', 0))})")
    return "\n".join(lines)
