"""HAE vs flat turn-level GAE, GRPO, GiGPO and HAE's ablations on ALFWorld: same warm start,
same games and task groups, same env-turn budget, several seeds.

    python benchmarks/compare_estimators.py --config configs/study_alfworld_cpu.py
    python benchmarks/compare_estimators.py --config configs/study_alfworld_cpu.py --report_only
    python benchmarks/compare_estimators.py --config configs/study_alfworld_smoke.py   # toy budget

Trains every (estimator, seed) run of the study config that has not finished (an interrupted
run resumes from its last checkpoint), measures the policy-gradient variance of each estimator
on the same fixed-policy episodes, then prints the tables (per arm; paired differences
against ``study.reference`` with bootstrap 95% intervals) and writes ``summary.md``,
``summary.json`` and PNG plots into ``study.out_dir``. Any field can be overridden, e.g.
``--config.study.seeds='(0,)' --config.run.train.max_env_turns=800``.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

_CONFIG = config_flags.DEFINE_config_file("config", None, "a study config under configs/",
                                          lock_config=True)
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "only summarise the finished runs")
_NO_VARIANCE = flags.DEFINE_bool("no_variance", False, "skip the gradient-variance measurement")


def _main(argv) -> None:
    del argv
    from absl import logging

    from hiper_jax.experiments.study import run_study, summarize

    logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    result = summarize(config) if _REPORT_ONLY.value else run_study(config, variance=not _NO_VARIANCE.value)
    print("\n" + result["table"])
    for path in result["plots"]:
        print(f"plot: {path}")


if __name__ == "__main__":
    app.run(_main)
