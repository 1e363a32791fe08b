#!/usr/bin/env bash
# Create or update the project's virtual environment (.venv) and install hiper_jax into it.
# Idempotent: it reinstalls only when setup.py or this file changed since the last install.
# Sourced by scripts/main.sh and scripts/test.sh; usage: source scripts/venv.sh [EXTRAS]
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras="${1:-test}"
python_bin="${PYTHON:-python3}"
venv="$repo_root/.venv"

if ! "$python_bin" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "hiper_jax needs Python 3.10 or newer; $python_bin is $("$python_bin" --version 2>&1)" >&2
  exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "[venv] creating $venv"
  "$python_bin" -m venv "$venv"
fi
# Build steps of source-only dependencies run a bare `python` (fast-downward-textworld's does):
# it must be the venv's, so put the venv first on PATH before installing.
export PATH="$venv/bin:$PATH"
stamp_file="$venv/.hiper_jax_install_stamp"
stamp="$(cat "$repo_root/setup.py" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1) $extras"
if [ ! -f "$stamp_file" ] || [ "$(cat "$stamp_file")" != "$stamp" ]; then
  echo "[venv] installing hiper_jax[$extras] (first run takes a few minutes)"
  # --- ALFWorld engine (issue 4): its [alfworld] extra (also in [test]) compiles C++ from source.
  case ",$extras," in
    *,test,*|*,alfworld,*)
      for tool in c++ cmake make; do
        if ! command -v "$tool" >/dev/null 2>&1; then
          echo "[venv] the ALFWorld engine (extras: $extras) compiles from source and needs '$tool';" \
            "install a C++ compiler, cmake and make (e.g. apt-get install build-essential cmake)" >&2
          exit 1
        fi
      done ;;
  esac
  # --- end ALFWorld ---
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -e "$repo_root[$extras]"
  echo "$stamp" > "$stamp_file"
fi
