#!/usr/bin/env bash
# Prepare a fresh Cloud TPU VM worker: a virtual environment (.venv in the source tree) with
# hiper_jax and JAX for TPU installed. Idempotent; launch.sh runs it on every worker.
# Usage, from the unpacked source tree on the TPU VM:
#   bash tpu_scripts/setup_tpu_vm.sh [--extras tpu] [--python python3]
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras="tpu"
python_bin="python3"

usage() {
  sed -n '2,5p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

while [ "$#" -gt 0 ]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --extras)
      [ "$#" -ge 2 ] || { echo "setup_tpu_vm.sh: --extras needs a value" >&2; exit 2; }
      extras="$2"; shift 2 ;;
    --python)
      [ "$#" -ge 2 ] || { echo "setup_tpu_vm.sh: --python needs a value" >&2; exit 2; }
      python_bin="$2"; shift 2 ;;
    *) echo "setup_tpu_vm.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

host="$(hostname)"
if ! command -v "$python_bin" >/dev/null 2>&1; then
  echo "setup_tpu_vm.sh [$host]: $python_bin not found" >&2
  exit 1
fi
if ! "$python_bin" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "setup_tpu_vm.sh [$host]: hiper_jax needs Python 3.10+, $python_bin is" \
    "$("$python_bin" --version 2>&1)" >&2
  exit 1
fi

venv="$repo_root/.venv"
if [ ! -x "$venv/bin/python" ]; then
  # Ubuntu images ship python3 without ensurepip; the venv package provides it.
  if ! "$python_bin" -c 'import ensurepip' >/dev/null 2>&1; then
    echo "[$host] installing python3-venv"
    sudo apt-get update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
  fi
  echo "[$host] creating $venv"
  "$python_bin" -m venv "$venv"
fi

echo "[$host] installing hiper_jax[$extras] into $venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
if [ -n "$extras" ]; then
  "$venv/bin/python" -m pip install --quiet -e "${repo_root}[${extras}]"
else
  "$venv/bin/python" -m pip install --quiet -e "$repo_root"
fi
# Importing JAX does not start the TPU runtime (that needs every worker of a pod slice at once).
"$venv/bin/python" - <<'PY'
import importlib.util
import jax
print(f"[setup] jax {jax.__version__}; libtpu installed: {importlib.util.find_spec('libtpu') is not None}")
PY
echo "[$host] ready"
