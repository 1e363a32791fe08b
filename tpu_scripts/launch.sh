#!/usr/bin/env bash
# Run hiper_jax training on a Cloud TPU VM or multi-host pod slice with gcloud.
# Every worker runs the same program; jax.distributed finds the other workers by itself.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: tpu_scripts/launch.sh COMMAND --name NAME --zone ZONE [options] [--config.KEY=VALUE ...] [-- TRAINER_ARGS ...]

Commands:
  up        create (or reuse) the TPU VM, copy and install the package, start training,
            then stream the log of worker 0 (Ctrl-C stops streaming, not training)
  create    create the TPU VM, or reuse it if it already exists
  setup     copy this source tree to every worker and install it (tpu_scripts/setup_tpu_vm.sh)
  train     start training on every worker in the background, then stream worker 0's log
  logs      stream the training log of worker 0
  stop      send SIGTERM to training on every worker (it checkpoints, then exits)
  delete    delete the TPU VM

Options:
  --name NAME                 TPU VM name (required)
  --zone ZONE                 zone, e.g. us-central2-b (v4), us-west4-a (v5e), us-east5-a (v5p) (required)
  --project PROJECT           Google Cloud project (default: gcloud's configured project)
  --accelerator-type TYPE     v4-8, v4-32, v5litepod-8, v5p-16, v6e-8, ... (required by up/create)
  --runtime-version VERSION   TPU software version (default from the accelerator type:
                              v4 tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite,
                              v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
  --spot                      create a Spot TPU VM (cheaper; can be preempted at any time)
  --preemptible               create a preemptible TPU VM (older equivalent of --spot)
  --config PATH               trainer config, e.g. configs/alfworld_qwen2_5_1_5b.py (required by up/train)
  --config.KEY=VALUE          config override passed to the trainer (repeatable)
  --extras EXTRAS             pip extras installed on the workers (default: tpu)
  --remote-dir DIR            source directory on the workers, relative to home (default: hiper_jax)
  --dry-run                   print every command, run none
  -h, --help                  show this help
Arguments after `--` go to the trainer unchanged.

Environment: GCLOUD is the gcloud executable to use (default: gcloud on PATH).

Example:
  tpu_scripts/launch.sh up --name hiper-v4 --zone us-central2-b --accelerator-type v4-8 \
      --config configs/alfworld_qwen2_5_1_5b.py --config.ppo.lr=1e-6
EOF
}

die() {
  echo "launch.sh: $*" >&2
  echo "Run tpu_scripts/launch.sh --help for usage." >&2
  exit 2
}

# Quote one word for a POSIX shell: printed commands can be pasted, remote commands survive ssh.
shell_quote() {
  local word="$1"
  if [[ "$word" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
    printf '%s' "$word"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

join_quoted() {
  local word out=""
  for word in "$@"; do
    out+="${out:+ }$(shell_quote "$word")"
  done
  printf '%s' "$out"
}

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
gcloud_bin="${GCLOUD:-gcloud}"
command=""
name=""
zone=""
project=""
accelerator_type=""
runtime_version=""
capacity=""
config=""
extras="tpu"
remote_dir="hiper_jax"
dry_run=false
trainer_args=()

need_value() {
  [ "$#" -ge 2 ] && [ -n "$2" ] && [ "${2#--}" = "$2" ] || die "$1 needs a value"
}

while [ "$#" -gt 0 ]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --name) need_value "$@"; name="$2"; shift 2 ;;
    --zone) need_value "$@"; zone="$2"; shift 2 ;;
    --project) need_value "$@"; project="$2"; shift 2 ;;
    --accelerator-type) need_value "$@"; accelerator_type="$2"; shift 2 ;;
    --runtime-version) need_value "$@"; runtime_version="$2"; shift 2 ;;
    --spot) capacity="--spot"; shift ;;
    --preemptible) capacity="--preemptible"; shift ;;
    --config) need_value "$@"; config="$2"; shift 2 ;;
    --config.*=*) trainer_args+=("$1"); shift ;;
    --extras) need_value "$@"; extras="$2"; shift 2 ;;
    --remote-dir) need_value "$@"; remote_dir="$2"; shift 2 ;;
    --dry-run) dry_run=true; shift ;;
    --) shift; trainer_args+=("$@"); break ;;
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
    -*) die "unknown option: $1" ;;
    *)
      [ -z "$command" ] || die "only one command allowed, got '$command' and '$1'"
      command="$1"; shift ;;
  esac
done

case "$command" in
  up | create | setup | train | logs | stop | delete) ;;
  "") die "missing COMMAND (up, create, setup, train, logs, stop or delete)" ;;
  *) die "unknown command: $command" ;;
esac
[ -n "$name" ] || die "--name is required"
[ -n "$zone" ] || die "--zone is required"
if [ "$command" = up ] || [ "$command" = create ]; then
  [ -n "$accelerator_type" ] || die "--accelerator-type is required by '$command' (e.g. v4-8, v5litepod-8, v5p-16)"
  if [ -z "$runtime_version" ]; then
    case "$accelerator_type" in
      v2-* | v3-* | v4-*) runtime_version="tpu-ubuntu2204-base" ;;
      v5litepod-* | v5e-*) runtime_version="v2-alpha-tpuv5-lite" ;;
      v5p-*) runtime_version="v2-alpha-tpuv5" ;;
      v6e-*) runtime_version="v2-alpha-tpuv6e" ;;
      *) die "no default --runtime-version for accelerator type '$accelerator_type'; pass one" ;;
    esac
  fi
fi
if [ "$command" = up ] || [ "$command" = train ]; then
  [ -n "$config" ] || die "--config is required by '$command' (e.g. configs/alfworld_qwen2_5_1_5b.py)"
  if [ ! -f "$repo_root/$config" ]; then
    echo "launch.sh: warning: $config is not in the local source tree $repo_root" >&2
  fi
fi
if ! $dry_run && ! command -v "$gcloud_bin" >/dev/null 2>&1; then
  die "'$gcloud_bin' not found: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install) or set GCLOUD"
fi

# Prints a command, then runs it unless this is a dry run.
run() {
  echo "+ $(join_quoted "$@")"
  if ! $dry_run; then
    "$@"
  fi
}

# Sets gcloud_command to `gcloud compute tpus tpu-vm VERB ARGS... --zone=... [--project=...]`.
tpu_vm_command() {
  local verb="$1"
  shift
  gcloud_command=("$gcloud_bin" compute tpus tpu-vm "$verb" "$@" --zone="$zone")
  if [ -n "$project" ]; then
    gcloud_command+=(--project="$project")
  fi
}

tpu_vm() {
  tpu_vm_command "$@"
  run "${gcloud_command[@]}"
}

on_workers() {
  local workers="$1" remote_command="$2"
  tpu_vm ssh "$name" --worker="$workers" --command="$remote_command"
}

log_file="$remote_dir/logs/train.log"
pid_file="$remote_dir/logs/train.pid"

create_vm() {
  local state=""
  tpu_vm_command describe "$name" --format='value(state)'
  echo "+ $(join_quoted "${gcloud_command[@]}")"
  if $dry_run; then
    echo "# (dry run: the TPU VM is created only if the describe above finds none)"
  else
    state="$("${gcloud_command[@]}" 2>/dev/null)" || state=""
  fi
  case "$state" in
    READY)
      echo "TPU VM $name is READY: reusing it"
      return ;;
    "") ;;
    *)
      echo "launch.sh: TPU VM $name exists in state $state and cannot be reused; delete it" \
        "(tpu_scripts/launch.sh delete --name $name --zone $zone) and run 'up' again" >&2
      exit 1 ;;
  esac
  local args=(create "$name" --accelerator-type="$accelerator_type" --version="$runtime_version")
  if [ -n "$capacity" ]; then
    args+=("$capacity")
  fi
  tpu_vm "${args[@]}"
}

setup_workers() {
  local archive_dir="${TMPDIR:-/tmp}/hiper_jax_upload.DRY_RUN" archive
  if ! $dry_run; then
    archive_dir="$(mktemp -d)"
  fi
  archive="$archive_dir/hiper_jax.tar.gz"
  # Tracked and untracked-but-not-ignored files: no .venv, caches or run outputs.
  if git -C "$repo_root" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    echo "+ git -C $(shell_quote "$repo_root") ls-files -z -co --exclude-standard | tar -czf $(shell_quote "$archive") -C $(shell_quote "$repo_root") --null -T -"
    if ! $dry_run; then
      git -C "$repo_root" ls-files -z -co --exclude-standard \
        | tar -czf "$archive" -C "$repo_root" --null -T -
    fi
  else
    run tar -czf "$archive" -C "$repo_root" --exclude=.venv --exclude=.git \
      --exclude=__pycache__ --exclude=runs --exclude=outputs .
  fi
  tpu_vm scp "$archive" "$name:hiper_jax.tar.gz" --worker=all
  local dir
  dir="$(shell_quote "$remote_dir")"
  on_workers all "mkdir -p $dir && tar -xzf hiper_jax.tar.gz -C $dir && rm hiper_jax.tar.gz && bash $dir/tpu_scripts/setup_tpu_vm.sh --extras $(shell_quote "$extras")"
  if ! $dry_run; then
    rm -rf "$archive_dir"
  fi
}

start_training() {
  local train_command pid log
  train_command="$(join_quoted .venv/bin/python -m hiper_jax.train --config "$config" ${trainer_args[@]+"${trainer_args[@]}"})"
  pid="$(shell_quote "$pid_file")"
  log="$(shell_quote "$log_file")"
  # setsid + nohup: training outlives the ssh session; the pid file lets `stop` signal it.
  on_workers all "mkdir -p $(shell_quote "$remote_dir/logs") && if [ -f $pid ] && kill -0 \"\$(cat $pid)\" 2>/dev/null; then echo \"training is already running on \$(hostname)\" >&2; exit 1; fi && cd $(shell_quote "$remote_dir") && (setsid nohup $train_command >> logs/train.log 2>&1 < /dev/null & echo \$! > logs/train.pid) && echo \"training started on \$(hostname); log: ~/$log\""
}

stream_logs() {
  echo "Streaming worker 0's log; Ctrl-C stops streaming (training goes on; 'stop' ends it)."
  on_workers 0 "tail -n 200 -F $(shell_quote "$log_file")"
}

stop_training() {
  local pid
  pid="$(shell_quote "$pid_file")"
  on_workers all "if [ -f $pid ] && kill -TERM \"\$(cat $pid)\" 2>/dev/null; then echo \"SIGTERM sent to training on \$(hostname)\"; else echo \"no training running on \$(hostname)\"; fi"
}

case "$command" in
  up) create_vm; setup_workers; start_training; stream_logs ;;
  create) create_vm ;;
  setup) setup_workers ;;
  train) start_training; stream_logs ;;
  logs) stream_logs ;;
  stop) stop_training ;;
  delete) tpu_vm delete "$name" --quiet ;;
esac
