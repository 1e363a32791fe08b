"""The trainer under faults, on the ChooseWord task: a killed env worker is counted and its
episodes never reach the update; SIGTERM to the whole process group checkpoints the last
complete iteration and exits 75; a damaged newest checkpoint falls back to an intact one and
names the bad file; a full disk is one line; diverged updates stop the run. The tests that run
whole training iterations are marked slow (``pytest -m slow``)."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from hiper_jax.rollout.collector import EnvSpec
from hiper_jax.train import checkpoints
from hiper_jax.train.logger import read_metrics
from tests.word_task import word_config


def small_config(checkpoint, out_dir, iterations=1):
    """The word task with 16 envs in 2 pools of 2 workers (4 envs each)."""
    config = word_config(checkpoint, out_dir, iterations=iterations)
    config.env.num_envs = 16
    config.env.envs_per_worker = 4
    config.train.eval_episodes = 16
    return config


def without_evaluation(monkeypatch, trainer_lib):
    """No eval rollouts and no plots: these tests look at training iterations only (and an eval
    rollout would double their time)."""
    monkeypatch.setattr(trainer_lib.Trainer, "evaluate", lambda self, iteration, collector: {})
    monkeypatch.setattr(trainer_lib, "plot_run", lambda *args, **kwargs: None)


def played_to_the_end(trajectory, max_turns):
    """Ended by the env (done), or by the step limit at exactly ``max_turns`` turns."""
    turns = trajectory.turns
    return bool(turns) and (turns[-1].done or (len(turns) == max_turns and turns[-1].truncated)) and not any(
        t.done or t.truncated for t in turns[:-1])


# Slow (kept out of the default suite): a whole training run, whose XLA compilation alone
# takes about a minute of CPU on 8 simulated devices; the collector tests cover the same
# fault handling in a second.
@pytest.mark.slow
@pytest.mark.parametrize("max_replays", [2, 0])
def test_a_worker_killed_mid_rollout_is_counted_and_never_trained_on(word_checkpoint, tmp_path, monkeypatch,
                                                                     capsys, max_replays):
    from hiper_jax.train import trainer as trainer_lib
    from tests.rollout.faulty_envs import ENV_ID, plan_fault

    config = small_config(word_checkpoint, tmp_path / "run")
    config.env.max_replays = max_replays
    without_evaluation(monkeypatch, trainer_lib)
    trainer = trainer_lib.Trainer(config, progress=False)
    plan_dir = tmp_path / "plan"
    plan_dir.mkdir()
    spec = trainer.data["train"]
    trainer.data["train"] = EnvSpec(f"tests.rollout.faulty_envs:{ENV_ID}", {**spec.kwargs, "plan_dir": str(plan_dir)},
                                    spec.task_option)
    tasks, _ = trainer.schedule.tasks(0)
    plan_fault(plan_dir, task=tasks[5], step=1, kind="die")  # row 5: the worker of rows 4-7
    batches = []
    real_build = trainer_lib.build_ppo_batch

    def spy(trajectories, *args, **kwargs):
        batches.append(list(trajectories))
        return real_build(trajectories, *args, **kwargs)

    monkeypatch.setattr(trainer_lib, "build_ppo_batch", spy)
    history = trainer.run()
    record = next(r for r in history if "train/success" in r)
    assert not os.listdir(plan_dir)  # the fault fired
    assert record["rollout/worker_restarts"] == 1 and record["rollout/lost_episodes"] == 4
    assert record["rollout/replayed_episodes"] == (4 if max_replays else 0)
    assert record["rollout/dropped_episodes"] == (0 if max_replays else 4)
    [batch] = batches
    lost = [i for i, t in enumerate(batch) if t.lost]
    assert lost == ([] if max_replays else [4, 5, 6, 7])
    assert all(batch[i].num_turns == 0 for i in lost)
    assert all(played_to_the_end(t, config.env.max_turns) for i, t in enumerate(batch) if i not in lost)
    assert record["train/episodes"] == 16 - len(lost)
    assert sum(t.num_turns for t in batch) == record["env_turns"]
    assert "1 env worker restart(s); 4 episode(s) cut by env faults" in capsys.readouterr().out


@pytest.mark.slow  # two training iterations: about 45 CPU-s, mostly compilation
def test_too_many_skipped_updates_stop_the_run(word_checkpoint, tmp_path, monkeypatch):
    from hiper_jax.train import trainer as trainer_lib

    config = small_config(word_checkpoint, tmp_path / "run", iterations=3)
    config.train.max_skipped_updates = 2
    without_evaluation(monkeypatch, trainer_lib)
    real_update = trainer_lib.ppo_update

    def all_skipped(state, *args, **kwargs):  # what a diverged update reports
        # The update donates ``state``: keep the state it returns, report every step skipped.
        new_state, update = real_update(state, *args, **kwargs)
        return new_state, {**update, "skipped": 1.0}

    monkeypatch.setattr(trainer_lib, "ppo_update", all_skipped)
    with pytest.raises(trainer_lib.TrainingDivergedError, match=r"last 2 iterations \(0\.\.1\) skipped every step"):
        trainer_lib.Trainer(config, progress=False).run()
    assert [r["iteration"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [0, 1]


# --- SIGTERM to the process group ---------------------------------------------------------------


def group_alive(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return any(_state(pid) not in ("Z", None) for pid in _group_members(pgid))


def _group_members(pgid):
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    members.append(int(entry))
            except ProcessLookupError:
                pass
    return members


def _state(pid):
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


@pytest.mark.slow  # two command-line training runs in subprocesses: about 4 CPU-minutes
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_sigterm_to_the_process_group_checkpoints_the_last_complete_iteration(word_checkpoint, tmp_path):
    config_path = tmp_path / "word_config.py"
    config_path.write_text(
        "from tests.word_task import word_config\n"
        f"def get_config():\n    return word_config({word_checkpoint!r}, 'unused', iterations=3)\n")
    out = tmp_path / "run"
    args = [sys.executable, "-m", "hiper_jax.train", f"--config={config_path}", f"--config.train.out_dir={out}"]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    deadline = time.time() + 900
    while not read_metrics(out / "metrics.jsonl"):  # iteration 0 is logged: 1 is under way
        assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.2)
    time.sleep(0.5)
    os.killpg(process.pid, signal.SIGTERM)  # what timeout, Slurm and systemd send
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 75, output[-3000:]
    assert "SIGTERM: stopped" in output
    deadline = time.time() + 30
    while group_alive(process.pid):  # every env worker is gone too
        assert time.time() < deadline, _group_members(process.pid)
        time.sleep(0.2)
    records = read_metrics(out / "metrics.jsonl")
    done = len(records)
    assert [r["iteration"] for r in records] == list(range(done)) and done in (1, 2)
    steps = sorted(int(name) for name in os.listdir(out / "checkpoints") if name.isdigit())
    assert steps[-1] == done and checkpoints.verify_step(str(out / "checkpoints" / str(done))) is None
    # No episode was cut: workers ignored the signal, the parent stopped between env steps.
    assert all(r["rollout/lost_episodes"] == 0 and r["rollout/worker_restarts"] == 0 for r in records)
    assert all(r["train/mean_turns"] > 1.0 for r in records)

    resumed = subprocess.run(args + ["--config.train.resume=True"], capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    iterations = [r["iteration"] for r in read_metrics(out / "metrics.jsonl") if "final" not in r]
    assert iterations == [0, 1, 2]  # no gap, no duplicate


# --- checkpoints ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trainer(word_checkpoint, tmp_path_factory):
    from hiper_jax.train.trainer import Trainer

    return Trainer(small_config(word_checkpoint, tmp_path_factory.mktemp("ckpt_run")), progress=False)


def use_folder(trainer, out_dir, fallback=True):
    trainer.out_dir = str(out_dir)
    trainer._checkpoints = None  # as a new process would
    trainer.config.train.restore_fallback = fallback


def host(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


def data_file(step_dir):
    files = [os.path.join(root, name) for root, _, names in os.walk(os.path.join(step_dir, "state"))
             for name in names if f"{os.sep}d{os.sep}" in os.path.join(root, name)]
    return max(files, key=os.path.getsize)


def truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    return path


def flip_byte(path):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 3] ^= 0x10
    open(path, "wb").write(bytes(data))
    return path


def without_manifest(step_dir):
    os.remove(os.path.join(step_dir, checkpoints.MANIFEST))
    truncate(data_file(step_dir))
    return step_dir  # only the restore attempt can tell: the message names the step folder


DAMAGE = {
    "truncated data file": lambda d: truncate(data_file(d)),
    "bit-rotted data file": lambda d: flip_byte(data_file(d)),
    "deleted _METADATA": lambda d: (os.remove(os.path.join(d, "state", "_METADATA")), os.path.join(d, "state", "_METADATA"))[1],
    "truncated meta/metadata": lambda d: truncate(os.path.join(d, "meta", "metadata")),
    "truncated data, no manifest": without_manifest,
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_and_names_the_file(trainer, tmp_path, capsys, damage):
    use_folder(trainer, tmp_path)
    original = trainer.state
    trainer.save(2)
    saved = host(trainer.state)
    trainer.state = jax.tree.map(lambda x: x + 1, trainer.state)
    trainer.save(4)
    bad = DAMAGE[damage](str(tmp_path / "checkpoints" / "4"))
    os.makedirs(tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-1733000000" / "state")  # a cut save
    try:
        use_folder(trainer, tmp_path)
        assert trainer.restore() == 2
        out = capsys.readouterr().out
        assert f"checkpoint 4 is damaged: {bad}" in out, out
        assert "moved the damaged one(s) to" in out
        for got, want in zip(jax.tree.leaves(host(trainer.state)), jax.tree.leaves(saved)):
            np.testing.assert_array_equal(got, want)
        assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]  # damaged moved aside, tmp removed
        assert len(os.listdir(tmp_path / "checkpoints_damaged")) == 1
        trainer.save(4)  # that step can be written again
        use_folder(trainer, tmp_path)
        assert trainer.restore() == 4
    finally:
        trainer.state = original


def test_fallback_can_be_forbidden(trainer, tmp_path):
    use_folder(trainer, tmp_path, fallback=False)
    trainer.save(2)
    trainer.save(4)
    bad = truncate(data_file(str(tmp_path / "checkpoints" / "4")))
    try:
        use_folder(trainer, tmp_path, fallback=False)
        with pytest.raises(checkpoints.CheckpointDamagedError,
                           match=rf"checkpoint 4 is damaged: {bad}: .*restore_fallback=False"):
            trainer.restore()
        assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]  # nothing moved
        truncate(data_file(str(tmp_path / "checkpoints" / "2")))
        use_folder(trainer, tmp_path)
        with pytest.raises(checkpoints.CheckpointDamagedError, match="no intact checkpoint .*damaged: 4, 2"):
            trainer.restore()
    finally:
        use_folder(trainer, tmp_path)


@pytest.fixture()
def small_disk(tmp_path):
    """A 64 MB tmpfs (needs root; skipped elsewhere)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount_point)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(disk, leave_bytes):
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(disk / "ballast", "wb") as handle:
        handle.write(b"\0" * max(free - leave_bytes, 0))


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(trainer, small_disk):
    use_folder(trainer, small_disk)
    trainer.save(2)
    fill(small_disk, leave_bytes=256 * 1024)  # less than a checkpoint needs
    with pytest.raises(checkpoints.DiskFullError) as caught:
        trainer.save(4)
    message = caught.value.strerror
    assert "\n" not in message and message.startswith("no space left on device writing checkpoint 4")
    assert "the newest complete checkpoint is 2" in message
    assert sorted(os.listdir(small_disk / "checkpoints")) == ["2"]  # no temp folder, no partial 4
    os.remove(small_disk / "ballast")
    use_folder(trainer, small_disk)
    assert trainer.restore() == 2


@pytest.mark.slow  # a command-line training run in a subprocess: about 2 CPU-minutes
def test_the_command_line_reports_a_full_disk_in_one_line(word_checkpoint, small_disk, tmp_path):
    """The whole run on a disk that fills up after the first checkpoint."""
    config_path = tmp_path / "word_config.py"
    config_path.write_text(
        "from tests.train.test_trainer_faults import small_config\n"
        f"def get_config():\n    return small_config({word_checkpoint!r}, {str(small_disk / 'run')!r}, iterations=4)\n")
    process = subprocess.Popen([sys.executable, "-m", "hiper_jax.train", f"--config={config_path}"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 900
    while not (small_disk / "run" / "checkpoints" / "2" / checkpoints.MANIFEST).exists():
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.2)
    fill(small_disk, leave_bytes=0)
    _, stderr = process.communicate(timeout=900)
    assert process.returncode == 1
    error_lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "no space left on device" in error_lines[0], stderr[-3000:]
    assert "Traceback" not in stderr
    assert not [n for n in os.listdir(small_disk / "run" / "checkpoints") if checkpoints.TMP_MARKER in n]
    assert checkpoints.verify_step(str(small_disk / "run" / "checkpoints" / "2")) is None
