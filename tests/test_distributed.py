"""Meshes, placing whole batches on a mesh, sharded HAE, start-up, and a real two-process job."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from hiper_jax import distributed
from hiper_jax.advantages import TurnBatch, get_estimator
from tests.distributed_worker import BATCH_ROWS, HAE_CONFIG, MESHES, turn_batch

REPO_ROOT = Path(__file__).resolve().parents[1]
HAE_FIELDS = ("adv_low", "ret_low", "adv_high", "ret_high", "adv_term", "ret_term", "boundary")


@pytest.fixture(scope="module")
def devices():
    found = jax.devices()
    assert len(found) == 8, "tests/conftest.py should give 8 simulated CPU devices"
    return found


# ---------------------------------------------------------------------------- meshes


@pytest.mark.parametrize(
    "axes, shape",
    [
        ({}, (8, 1, 1)),
        (dict(data=2, fsdp=4), (2, 4, 1)),
        (dict(data=2, fsdp=2, tensor=2), (2, 2, 2)),
        (dict(data=-1, fsdp=2, tensor=2), (2, 2, 2)),
        (dict(data=1, fsdp=-1), (1, 8, 1)),
        (dict(data=1, fsdp=1, tensor=-1), (1, 1, 8)),
    ],
)
def test_make_mesh_shapes(devices, axes, shape):
    mesh = distributed.make_mesh(**axes)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert tuple(mesh.shape.values()) == shape
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)


def test_make_mesh_from_config_mapping_and_one_device(devices):
    mesh = distributed.make_mesh(**{"data": 4, "fsdp": 2, "tensor": 1})
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    one = distributed.make_mesh(devices=devices[:1])
    assert dict(one.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    assert distributed.num_batch_shards(one) == 1


@pytest.mark.parametrize(
    "axes, message",
    [
        (dict(data=3), r"mesh data=3 x fsdp=1 x tensor=1 uses 3 devices but 8"),
        (dict(data=-1, fsdp=3), r"fixed axes use 3 devices.*mesh.data=-1"),
        (dict(data=-1, fsdp=-1), r"at most one mesh axis may be -1"),
        (dict(data=0), r"mesh.data must be a positive int or -1"),
        (dict(fsdp=2.0), r"mesh.fsdp must be a positive int"),
        (dict(tensor=-2), r"mesh.tensor must be a positive int"),
        (dict(data=2, fsdp=2, tensor=4), r"uses 16 devices but 8"),
    ],
)
def test_make_mesh_errors_name_the_field(devices, axes, message):
    with pytest.raises(ValueError, match=message):
        distributed.make_mesh(**axes)


def test_multi_slice_grid_puts_slices_on_data():
    fake = [types.SimpleNamespace(id=i, slice_index=i // 4, process_index=i // 4,
                                  platform="cpu", device_kind="fake") for i in range(8)]
    grid = distributed.device_grid((4, 2, 1), fake)
    assert grid.shape == (4, 2, 1)
    slices = np.vectorize(lambda d: d.slice_index)(grid)
    np.testing.assert_array_equal(slices[:, 0, 0], [0, 0, 1, 1])
    assert (slices == slices[:, :1, :1]).all(), "fsdp and tensor must stay inside a slice"
    with pytest.raises(ValueError, match=r"span 2 TPU slices, so mesh.data=1"):
        distributed.device_grid((1, 8, 1), fake)


# ------------------------------------------------------------ placing batches on a mesh


MESH_SHAPES = [dict(data=8), dict(data=2, fsdp=4), dict(data=2, fsdp=2, tensor=2)]


@pytest.mark.parametrize("axes", MESH_SHAPES)
def test_place_rows_splits_rows_and_gathers_back(devices, axes):
    mesh = distributed.make_mesh(**axes)
    rng = np.random.default_rng(3)
    batch = {"tokens": rng.integers(0, 100, size=(16, 5)).astype(np.int32),
             "rewards": rng.normal(size=(16,)).astype(np.float32)}
    placed = distributed.place_rows(batch, mesh)
    shards = distributed.num_batch_shards(mesh)
    assert placed["tokens"].sharding.spec == P(("data", "fsdp"))
    # Every device holds 16 / shards rows of its own block, tensor replicas hold the same rows.
    for shard in placed["tokens"].addressable_shards:
        assert shard.data.shape == (16 // shards, 5)
        np.testing.assert_array_equal(shard.data, batch["tokens"][shard.index])
    back = distributed.gather_to_all_hosts(placed)
    assert isinstance(back["rewards"], np.ndarray)
    for key in batch:
        np.testing.assert_array_equal(back[key], batch[key])


def test_place_rows_replicates_rows_the_shards_do_not_divide(devices):
    mesh = distributed.make_mesh(data=8)
    placed = distributed.place_rows({"x": np.arange(12.0).reshape(6, 2)}, mesh)
    assert placed["x"].sharding.is_fully_replicated
    assert len(placed["x"].sharding.device_set) == 8
    np.testing.assert_array_equal(distributed.gather_to_all_hosts(placed)["x"], np.arange(12.0).reshape(6, 2))


def test_host_share_and_env_seeds(devices):
    mesh = distributed.make_mesh(data=2, fsdp=4)
    share = distributed.host_share(mesh, 24)
    assert share == distributed.HostShare(global_rows=24, row_indices=tuple(range(24)))
    np.testing.assert_array_equal(share.env_seeds(100), np.arange(100, 124))
    with pytest.raises(ValueError, match=r"20 rows must be a positive multiple of the 8 batch"):
        distributed.host_share(mesh, 20)
    with pytest.raises(ValueError, match="owns no device"):
        distributed.host_share(mesh, 24, process=1)


def test_global_from_host_copy_errors_name_the_leaf(devices):
    mesh = distributed.make_mesh(data=8)
    with pytest.raises(ValueError, match=r"\['rewards'\].*shape \(6, 3\)"):
        distributed.global_from_host_copy({"rewards": np.zeros((6, 3))}, mesh)


# ------------------------------------------------------------------- sharded estimators


@pytest.mark.parametrize("axes", [*MESH_SHAPES, dict(data=1, fsdp=1, tensor=8)])
@pytest.mark.parametrize("name", ["hae", "turn_gae"])
def test_sharded_estimator_matches_unsharded(devices, axes, name):
    mesh = distributed.make_mesh(**axes)
    estimator = get_estimator(name).fn
    batch = turn_batch(seed=5, rows=32, turns=11)
    want = estimator(batch, HAE_CONFIG)
    got = distributed.sharded_estimator(estimator, mesh)(
        distributed.place_rows(batch, mesh), HAE_CONFIG)
    shards = distributed.num_batch_shards(mesh)
    assert len({s.index[0].start for s in got.adv_low.addressable_shards}) == shards
    for field in HAE_FIELDS:
        np.testing.assert_allclose(np.asarray(getattr(got, field)),
                                   np.asarray(getattr(want, field)), atol=1e-6, err_msg=field)


def test_sharded_flat_subgoal_ablation_matches_unsharded(devices):
    """hae_flat_subgoal standardises its subgoal stream over segment starts of every shard."""
    mesh = distributed.make_mesh(data=2, fsdp=4)
    estimator = get_estimator("hae_flat_subgoal").fn
    batch = turn_batch(seed=7, rows=16, turns=9)
    want = estimator(batch, HAE_CONFIG)
    got = distributed.sharded_estimator(estimator, mesh)(distributed.place_rows(batch, mesh), HAE_CONFIG)
    for field in HAE_FIELDS:
        np.testing.assert_allclose(np.asarray(getattr(got, field)), np.asarray(getattr(want, field)),
                                   atol=1e-6, err_msg=field)


def test_sharded_estimator_normalises_over_all_shards(devices):
    """Per-shard statistics would give other advantages: the equality above can catch them."""
    mesh = distributed.make_mesh(data=2, fsdp=4)
    batch = turn_batch(seed=6, rows=16)
    batch = batch._replace(rewards=batch.rewards * np.repeat([1.0, 50.0], 8)[:, None])
    estimator = get_estimator("hae").fn
    want = np.asarray(estimator(batch, HAE_CONFIG).adv_low)
    got = distributed.sharded_estimator(estimator, mesh)(batch, HAE_CONFIG)
    np.testing.assert_allclose(np.asarray(got.adv_low), want, atol=1e-6)
    per_shard = np.concatenate([
        np.asarray(estimator(TurnBatch(*(None if x is None else x[i:i + 2] for x in batch)),
                             HAE_CONFIG).adv_low)
        for i in range(0, 16, 2)
    ])
    assert np.abs(per_shard - want).max() > 0.1


def test_sharded_estimator_on_one_device(devices):
    mesh = distributed.make_mesh(devices=devices[:1])
    estimator = get_estimator("hae").fn
    batch = turn_batch(seed=7, rows=3)
    want = estimator(batch, HAE_CONFIG)
    got = distributed.sharded_estimator(estimator, mesh)(batch, HAE_CONFIG)
    np.testing.assert_allclose(np.asarray(got.adv_high), np.asarray(want.adv_high), atol=1e-6)


def test_sharded_estimator_is_built_and_compiled_once(devices):
    """The batch stage calls the estimator every iteration: one compilation for all of them."""
    from hiper_jax.train.batch import run_estimator
    from tests.sharding_probes import compile_counts, compiles_of

    mesh = distributed.make_mesh(data=2, fsdp=4)
    spec = get_estimator("hae")
    run = distributed.sharded_estimator(spec.fn, mesh)
    assert distributed.sharded_estimator(spec.fn, mesh) is run
    cached = run.jitted._cache_size()  # other tests' shapes on this mesh
    with compile_counts() as counts:
        for seed in range(3):  # new values, same shapes (rows and turns no other test uses)
            batch = turn_batch(seed=seed, rows=24, turns=13)
            got = run_estimator(spec, batch, HAE_CONFIG, mesh)
            np.testing.assert_allclose(got.adv_low, np.asarray(spec.fn(batch, HAE_CONFIG).adv_low), atol=1e-6)
    assert compiles_of(counts, "sharded_estimate") == 1, dict(counts)
    assert run.jitted._cache_size() == cached + 1


def test_sharded_estimator_errors(devices):
    mesh = distributed.make_mesh(data=8)
    batch = turn_batch(seed=8, rows=12)
    run = distributed.sharded_estimator(get_estimator("hae").fn, mesh)
    with pytest.raises(ValueError, match=r"\.rewards has shape \(12, 9\).*multiple of the 8"):
        run(batch, HAE_CONFIG)
    grpo = distributed.sharded_estimator(get_estimator("grpo").fn, mesh)
    grouped = turn_batch(seed=8, rows=16)._replace(group_ids=np.arange(16) // 4)
    with pytest.raises(ValueError, match="need whole groups"):
        grpo(grouped, HAE_CONFIG)


# ------------------------------------------------------------------------- start-up


@pytest.fixture
def fake_jax_distributed(monkeypatch):
    """Records jax.distributed.initialize calls instead of starting a runtime."""
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    for var in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"):
        monkeypatch.delenv(var, raising=False)
    return calls


def test_initialize_single_process_is_a_no_op(fake_jax_distributed, monkeypatch):
    monkeypatch.setattr(distributed, "_tpu_cluster_detected", lambda: None)
    info = distributed.initialize()
    assert (info.process_index, info.process_count, info.device_count) == (0, 1, 8)
    assert info.is_main and distributed.is_main_process()
    assert distributed.initialize("", "", "") == info
    assert distributed.initialize("10.0.0.1:1234", 1, 0) == info
    assert fake_jax_distributed == []


def test_initialize_explicit_and_detected(fake_jax_distributed, monkeypatch):
    distributed.initialize("10.0.0.1:1234", 4, 3, initialization_timeout_s=7)
    assert fake_jax_distributed[-1] == dict(coordinator_address="10.0.0.1:1234", num_processes=4,
                                            process_id=3, initialization_timeout=7)
    monkeypatch.setattr(distributed, "_tpu_cluster_detected", lambda: "Cloud TPU VM")
    distributed.initialize()
    assert fake_jax_distributed[-1] == dict(initialization_timeout=300)
    calls = len(fake_jax_distributed)
    distributed.initialize(auto_detect=False)
    assert len(fake_jax_distributed) == calls


def test_tpu_detection_from_environment(monkeypatch):
    monkeypatch.delenv("TPU_PROCESS_ADDRESSES", raising=False)
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
    assert distributed._tpu_cluster_detected() is None, "this CPU machine is no TPU VM"
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w0,w1")
    assert "GKE" in distributed._tpu_cluster_detected()


@pytest.mark.parametrize(
    "args, message",
    [
        (("10.0.0.1:1234", 2, None), r"\['coordinator_address', 'num_processes'\] given but "
                                     r"\['process_id'\] missing"),
        ((None, 2, 0), r"\['coordinator_address'\] missing"),
        (("10.0.0.1", 2, 0), "coordinator_address must look like HOST:PORT"),
        (("10.0.0.1:99999", 2, 0), "HOST:PORT"),
        (("10.0.0.1:1234", 2, 2), r"process_id must be in \[0, num_processes\)"),
        (("10.0.0.1:1234", "2", 0), "num_processes must be an int"),
    ],
)
def test_initialize_errors(fake_jax_distributed, args, message):
    with pytest.raises(ValueError, match=message):
        distributed.initialize(*args)
    assert fake_jax_distributed == []


def test_initialize_refuses_a_different_layout_once_running(monkeypatch):
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    assert distributed.initialize().process_count == 1
    with pytest.raises(RuntimeError, match="already running as process 0 of 1"):
        distributed.initialize("10.0.0.1:1234", 2, 1)


# ------------------------------------------------------------------ two real processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env(devices_per_process: int) -> dict:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_per_process}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def _run_processes(commands: list[list[str]], env: dict, timeout_s: float) -> list[tuple]:
    """Runs the commands concurrently; kills all of them if any outlives ``timeout_s``."""
    procs = [subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for cmd in commands]
    try:
        return [(p.wait(timeout=timeout_s), p.stdout.read()) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = "\n".join(f"--- process {i}\n{p.communicate()[0]}" for i, p in enumerate(procs))
        pytest.fail(f"processes did not finish within {timeout_s} s\n{logs}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.stdout.close()


def test_two_processes_match_one(tmp_path):
    coordinator = f"127.0.0.1:{_free_port()}"
    commands = [[sys.executable, "-m", "tests.distributed_worker", coordinator, "2", str(i),
                 str(tmp_path)] for i in range(2)]
    results = _run_processes(commands, _child_env(4), timeout_s=150)
    for i, (code, log) in enumerate(results):
        assert code == 0, f"process {i} failed:\n{log}"
    outs = [dict(np.load(tmp_path / f"process_{i}.npz")) for i in range(2)]

    for out in outs:
        assert int(out["device_count"]) == 8 and int(out["local_device_count"]) == 4
        assert float(out["psum_ids"].ravel()[0]) == float(out["device_ids"].sum())
    estimator = get_estimator("hae").fn
    batch = turn_batch()
    want = estimator(batch, HAE_CONFIG)
    halves = [list(range(BATCH_ROWS // 2)), list(range(BATCH_ROWS // 2, BATCH_ROWS))]
    every_other_pair = [[r for r in range(BATCH_ROWS) if r // 2 % 2 == p] for p in range(2)]
    for name in MESHES:
        indices = [out[f"{name}/row_indices"].tolist() for out in outs]
        assert indices == (every_other_pair if name == "interleaved" else halves)
        for out, rows in zip(outs, indices):
            np.testing.assert_array_equal(out[f"{name}/env_seeds"], 1000 + np.array(rows))
        for field in HAE_FIELDS:
            got = np.zeros_like(np.asarray(getattr(want, field)))
            for out, rows in zip(outs, indices):
                got[rows] = out[f"{name}/{field}"]
            np.testing.assert_allclose(got, np.asarray(getattr(want, field)), atol=1e-6,
                                       err_msg=f"{name}/{field}")
        for out in outs:
            np.testing.assert_allclose(out[f"{name}/gathered_adv_low"],
                                       np.asarray(want.adv_low), atol=1e-6)


def test_unreachable_coordinator_fails_with_a_clear_error(tmp_path):
    code = (
        "from hiper_jax import distributed\n"
        f"distributed.initialize('127.0.0.1:{_free_port()}', 2, 1, initialization_timeout_s=1)\n"
    )
    [(returncode, log)] = _run_processes([[sys.executable, "-c", code]], _child_env(1),
                                         timeout_s=60)
    assert returncode != 0
    assert "starting jax.distributed (process 1 of 2, coordinator 127.0.0.1:" in log
    assert "waiting up to 1 s for all processes" in log


def test_initialize_after_jax_started_says_what_to_do(devices):
    with pytest.raises(RuntimeError, match=r"failed \(process 0 of 2.*before any other JAX call"):
        distributed.initialize(f"127.0.0.1:{_free_port()}", 2, 0)
    assert not jax.distributed.is_initialized()
