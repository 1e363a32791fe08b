#!/usr/bin/env bash
# Run the test suite (installs what it needs into .venv first). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/venv.sh test,webshop
python -m pytest "$@"
