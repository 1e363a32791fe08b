"""Train a Plan-Execute agent with HiPER: ``python -m hiper_jax.train --config configs/NAME.py``.

Any config field can be overridden on the command line, e.g.
``--config.ppo.actor_lr=1e-6 --config.train.out_dir=runs/exp1 --config.train.resume=True``.

Exit status: 0 when the run finished; 75 (:data:`~hiper_jax.train.trainer.EXIT_INTERRUPTED`)
when SIGTERM or SIGINT stopped it after checkpointing the last complete iteration (resume with
``--config.train.resume=True``); 2 for a bad config; 1 for any other error. Errors about the
inputs (config, checkpoint, tokenizer or demonstration files), too many env faults, diverged
updates, a damaged checkpoint or a full disk are printed as one line.
"""

import sys
import time

from absl import app
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "path to a config file under configs/",
                                          lock_config=True)


def _fail(message: str, status: int = 1) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def _main(argv) -> None:
    del argv
    from absl import logging

    from hiper_jax.agent.demos import DemoFormatError
    from hiper_jax.models.qwen2 import CheckpointError, ConfigFileError
    from hiper_jax.rollout.collector import RolloutFaultError
    from hiper_jax.tokenization import TokenizerFileError
    from hiper_jax.train import checkpoints
    from hiper_jax.train.config import ConfigError
    from hiper_jax.train.report import summary_table
    from hiper_jax.train.throughput import summary_line
    from hiper_jax.train.trainer import EXIT_INTERRUPTED, Trainer, TrainingDivergedError

    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO

    start = time.perf_counter()
    config = _CONFIG.value
    try:
        trainer = Trainer(config)
        history = trainer.run()
    except ConfigError as error:
        _fail(str(error), status=2)
    except checkpoints.DiskFullError as error:
        _fail(error.strerror)
    except (CheckpointError, ConfigFileError, TokenizerFileError, DemoFormatError, FileNotFoundError,
            checkpoints.CheckpointDamagedError, RolloutFaultError, TrainingDivergedError) as error:
        _fail(str(error))
    except Exception as error:  # noqa: BLE001 - a full disk anywhere (metrics, config.json) is one line
        if not checkpoints.is_disk_full(error):
            raise
        _fail(f"no space left on device ({checkpoints.short_error(error)}); the checkpoints already "
              f"in {config.train.out_dir}/checkpoints are kept: free space and resume with "
              "--config.train.resume=True")
    table = summary_table(history)
    if table:
        print("\n" + table)
    line = summary_line(history, trainer.peak.source)
    if line:
        print("\n" + line)
    print(f"\nrun directory: {config.train.out_dir} (metrics.jsonl, plots/, checkpoints/, "
          f"config.json); wall time {(time.perf_counter() - start) / 60:.1f} min")
    if trainer.stop_signal is not None:
        sys.exit(EXIT_INTERRUPTED)


def main() -> None:
    from hiper_jax.train.config import ConfigError, check_override_paths

    try:  # an unknown --config.a.b would otherwise be a long traceback from the flag parser
        check_override_paths(sys.argv[1:])
    except ConfigError as error:
        _fail(str(error), status=2)
    app.run(_main)


if __name__ == "__main__":
    main()
