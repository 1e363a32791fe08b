#!/usr/bin/env bash
# The main job on the small embedded default, on CPU. Until the training loop lands this runs
# the HAE demo: advantages for a hand-made Plan-Execute trajectory, printed and plotted.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/venv.sh test
python -m hiper_jax.demo "$@"
