"""Train a Plan-Execute agent with HiPER: ``python -m hiper_jax.train --config configs/NAME.py``.

Any config field can be overridden on the command line, e.g.
``--config.ppo.actor_lr=1e-6 --config.train.out_dir=runs/exp1 --config.train.resume=True``.
"""

import time

from absl import app
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "path to a config file under configs/",
                                          lock_config=True)


def _main(argv) -> None:
    del argv
    from absl import logging

    from hiper_jax.train.report import summary_table
    from hiper_jax.train.trainer import Trainer

    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO

    start = time.perf_counter()
    config = _CONFIG.value
    history = Trainer(config).run()
    table = summary_table(history)
    if table:
        print("\n" + table)
    print(f"\nrun directory: {config.train.out_dir} (metrics.jsonl, plots/, checkpoints/, "
          f"config.json); wall time {(time.perf_counter() - start) / 60:.1f} min")


def main() -> None:
    app.run(_main)


if __name__ == "__main__":
    main()
