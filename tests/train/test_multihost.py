"""Training across processes: two local processes (4 simulated CPU devices each, gloo
collectives) give the same metrics as one process with 8 devices, and the checkpoint the
two-process run writes restores in one process onto another mesh shape.

Sampling is greedy here: with temperature > 0 each host draws from its own key, so a split run
plays other (equally valid) episodes than a single process.
"""

import math

import jax
import numpy as np
import pytest

from hiper_jax.train.logger import read_metrics
from tests.test_distributed import _child_env, _free_port, _run_processes

SKIP_PREFIXES = ("time/", "throughput/")  # seconds and rates differ run to run


def write_config(tmp_path, checkpoint):
    path = tmp_path / "multihost_config.py"
    path.write_text(
        "from tests.word_task import word_config\n"
        "def get_config():\n"
        f"    c = word_config({checkpoint!r}, 'unused', iterations=2)\n"
        "    c.sampling.temperature = 0.0\n"
        "    c.sampling.eval_temperature = 0.0\n"
        "    c.train.checkpoint_every = 1\n"
        # Greedy episodes of this toy task are alike across envs, so standardising their
        # near-constant advantages would blow float rounding (summation order differs across
        # 2 processes vs 1) up to 1e-2; the cross-process statistics are checked on a random
        # batch in tests/test_distributed.py.
        "    c.advantage.normalize = False\n"
        "    return c\n")
    return path


def cli(config_path, out_dir, extra=()):
    import sys

    return [sys.executable, "-m", "hiper_jax.train", f"--config={config_path}",
            f"--config.train.out_dir={out_dir}", *extra]


def compare_records(single, multi):
    assert [r["iteration"] for r in single] == [r["iteration"] for r in multi]
    for a, b in zip(single, multi):
        keys = {k for k in a if not k.startswith(SKIP_PREFIXES)}
        assert keys == {k for k in b if not k.startswith(SKIP_PREFIXES)}
        for key in sorted(keys):
            if isinstance(a[key], float) and not math.isnan(a[key]):
                assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-4), (a["iteration"], key)


@pytest.fixture(scope="module")
def single_run(word_checkpoint, tmp_path_factory):
    """The one-process run (8 devices, sampling with the default placement): config, output."""
    tmp_path = tmp_path_factory.mktemp("multihost")
    config_path = write_config(tmp_path, word_checkpoint)
    single = tmp_path / "single"
    ((code, log),) = _run_processes([cli(config_path, single)], _child_env(8), timeout_s=400)
    assert code == 0, log[-3000:]
    return config_path, single


def run_two_processes(config_path, out_dir, extra=()):
    coordinator = f"127.0.0.1:{_free_port()}"
    commands = [cli(config_path, out_dir, [f"--config.distributed.coordinator_address={coordinator}",
                                           "--config.distributed.num_processes=2",
                                           f"--config.distributed.process_id={i}", *extra])
                for i in range(2)]
    results = _run_processes(commands, _child_env(4), timeout_s=500)
    for i, (code, log) in enumerate(results):
        assert code == 0, f"process {i} failed:\n{log[-4000:]}"


@pytest.mark.slow
def test_two_processes_train_like_one_and_restore_on_another_mesh(word_checkpoint, single_run, tmp_path):
    config_path, single = single_run
    multi = tmp_path / "multi"
    run_two_processes(config_path, multi)

    single_records = read_metrics(str(single / "metrics.jsonl"))
    multi_records = read_metrics(str(multi / "metrics.jsonl"))
    assert single_records[0]["train/episodes"] == 32
    assert any(r.get("update/steps", 0) > 0 for r in single_records)
    compare_records(single_records, multi_records)

    # The two-process checkpoint restores in this (single) process on two other mesh shapes
    # and equals the one-process run's.
    from hiper_jax.train.trainer import Trainer
    from tests.word_task import word_config

    restored = {}
    for name, source, mesh in (("single", single, dict(data=-1)), ("multi", multi, dict(data=2, fsdp=4)),
                               ("multi_fsdp8", multi, dict(data=1, fsdp=8))):
        config = word_config(word_checkpoint, tmp_path / f"restore_{name}", iterations=2)
        config.mesh.update(mesh)
        trainer = Trainer(config, progress=False)
        assert trainer.restore(str(source / "checkpoints")) == 2
        assert trainer.restored_env_turns == multi_records[-1]["env_turns_total"]
        embedding = trainer.state.actor["embed_tokens"]["embedding"]
        assert embedding.sharding.mesh.shape == trainer.mesh.shape
        assert embedding.sharding.is_fully_replicated == (name == "single")  # fsdp shards it
        restored[name] = jax.tree.map(np.asarray, trainer.state)
    for name in ("multi", "multi_fsdp8"):
        diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))) if x.size else 0.0,
                             restored["single"], restored[name])
        assert max(jax.tree.leaves(diffs)) < 1e-4, name
    moved = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))) if x.size else 0.0,
                         restored["single"].actor, Trainer(word_config(word_checkpoint, tmp_path / "fresh"),
                                                           progress=False).state.actor)
    assert max(jax.tree.leaves(jax.tree.map(np.asarray, moved))) > 0  # training changed the params


@pytest.mark.slow
def test_two_processes_sampling_on_their_own_chips_train_like_one(single_run, tmp_path):
    """sampling.host_mesh: each process samples on a (2, 1, 2) mesh over its 4 devices (tensor
    over the 2 KV heads) with its own copy of the weights; the run matches the one-process run
    that samples with the training mesh's arrays."""
    config_path, single = single_run
    multi = tmp_path / "multi_host_mesh"
    run_two_processes(config_path, multi, ["--config.sampling.host_mesh=True"])
    import json

    assert json.loads((multi / "config.json").read_text())["sampling"]["host_mesh"] is True
    compare_records(read_metrics(str(single / "metrics.jsonl")), read_metrics(str(multi / "metrics.jsonl")))
