#!/usr/bin/env bash
# The main job on the small embedded default, on CPU: generate ALFWorld games, evaluate the
# shipped warm-started tiny model, run a few PPO iterations (GiGPO credit), evaluate again, write
# plots and print a summary table. Extra arguments override config fields, e.g.
#   bash scripts/main.sh --config.train.iterations=10 --config.train.out_dir=runs/longer
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/venv.sh alfworld
python -m hiper_jax.train --config configs/alfworld_tiny.py "$@"
