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
# The stamp holds the hash of setup.py + this file, and the extras installed with that hash: a
# request for extras already installed (e.g. the main job after the tests) installs nothing.
hash="$(cat "$repo_root/setup.py" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)"
installed=""
if [ -f "$stamp_file" ] && [ "$(head -n1 "$stamp_file")" = "$hash" ]; then
  installed="$(sed -n 2p "$stamp_file")"
fi
missing=""
for extra in ${extras//,/ }; do
  case ",$installed," in *",$extra,"*) ;; *) missing="$missing,$extra" ;; esac
done
if [ -n "$missing" ]; then
  extras="$(printf '%s\n' ${installed//,/ } ${missing//,/ } | sort -u | paste -sd, -)"
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
  printf '%s\n%s\n' "$hash" "$extras" > "$stamp_file"
fi
