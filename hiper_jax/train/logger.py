"""Metrics out of a run: JSONL (always), TensorBoard (tensorboardX), Weights & Biases (optional).

Only the main process writes. Records are flat dicts of numbers keyed by ``iteration``; on
resume, records past the restored iteration (logged after the last checkpoint by a run that
was killed) are dropped so the file tells one consistent history, and TensorBoard is told to
purge the same steps from the earlier event files (``purge_step``), so no step shows twice.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Optional


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics JSONL file (empty when it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


class MetricsLogger:
    """Writes metric records.

    Args:
      out_dir: the run directory (``metrics.jsonl`` and ``tensorboard/`` go there).
      enabled: False on non-main processes (then every call is a no-op).
      tensorboard: also write TensorBoard event files.
      wandb_project: log to this W&B project when ``wandb`` is importable ("" = off).
      resume_from: keep only records of iterations before this one, the iterations a resumed
        run does not repeat (None = start afresh).
    """

    def __init__(self, out_dir: str, enabled: bool = True, tensorboard: bool = True,
                 wandb_project: str = "", resume_from: Optional[int] = None,
                 config: Optional[dict] = None):
        self.enabled = enabled
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        kept = [r for r in read_metrics(self.path)
                if resume_from is not None and r.get("iteration", 0) < resume_from]
        with open(self.path, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in kept)
        if tensorboard:
            from tensorboardX import SummaryWriter

            # tensorboardX names event files by the second: a resume within the same second
            # would overwrite the earlier file, so a nanosecond suffix keeps them apart (and
            # in the order TensorBoard reads, which the purge relies on).
            self._tb = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=resume_from,
                                     filename_suffix=f".{time.time_ns()}")
        if wandb_project:
            try:
                import wandb
            except ImportError:
                print(f"wandb is not installed; not logging to W&B project {wandb_project!r}")
            else:
                self._wandb = wandb.init(project=wandb_project, config=config, dir=out_dir,
                                         resume="allow")

    def log(self, record: dict[str, Any]) -> None:
        """Appends one record (must hold ``iteration``)."""
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                 for k, v in record.items()}
        clean["iteration"] = int(record["iteration"])
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(clean) + "\n")
        step = clean["iteration"]
        if self._tb is not None:
            for key, value in clean.items():
                if isinstance(value, float):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in clean.items() if isinstance(v, float)}, step=step)

    def history(self) -> list[dict]:
        return read_metrics(self.path)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
