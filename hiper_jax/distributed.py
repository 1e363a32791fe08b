"""Multi-host start-up, device meshes, and moving batches between hosts and global arrays.

JAX's multi-controller runtime is the distributed engine: every host runs the same program on
its own slice of the batch, and jitted functions run over one global mesh. This module holds the
pieces every such program needs, and nothing model-specific (parameter sharding comes from the
logical axis rules of ``hiper_jax.models.sharding``):

* :func:`initialize` starts ``jax.distributed`` from explicit settings or on a multi-host Cloud
  TPU slice, and does nothing on one process. Call it first, before any other JAX call.
* :func:`make_mesh` builds the ``(data, fsdp, tensor)`` mesh (``-1`` = the remaining devices),
  with a device order that follows the TPU topology and ``Auto`` axis types.
* :func:`host_share` says which rows of a global batch this host plays (its envs, and which env
  seeds it uses).
* One placement path for one and many processes: every process holds the whole batch (the
  trajectories are gathered, :func:`gather_objects`); :func:`place_rows` puts it on the mesh
  with its rows split over the batch axes (each process placing only its devices' shards),
  :func:`gather_to_all_hosts` brings results back whole, and jitted code runs inside
  :func:`on_mesh`, so the model's activation sharding hints apply.
* :func:`host_sampling_mesh` builds a mesh over one host's devices for sampling (weights and
  KV cache split over the host's chips, prompt rows over the rest), and
  :func:`copy_to_host_mesh` lays the sampling copy of the (cross-host) training parameters out
  on it, one host-mesh copy per host, without gathering the model onto one chip. Rollouts on it
  never wait on another host.
* :func:`sharded_estimator` runs an advantage estimator under ``jax.shard_map`` with the
  trajectories split over the batch axes and normalisation statistics reduced across devices
  (built once per estimator and mesh).

Batch rows are split over :data:`BATCH_AXES` = ``("data", "fsdp")`` together (data-major), the
same mapping as the ``batch`` logical axis of the model's rules. Everything here works unchanged
on a one-device mesh and in a single process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import importlib.util
import logging
import math
import os
import pickle
import sys
from collections.abc import Callable, Sequence
from typing import Any, Optional

import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hiper_jax.mesh_shape import host_mesh_shape, resolve_mesh_shape  # noqa: F401 (re-exported)
from hiper_jax.vocab import BATCH_AXES, MESH_AXES

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Start-up


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """Where this process sits in the job (as :func:`initialize` leaves it)."""

    process_index: int
    process_count: int
    local_device_count: int
    device_count: int
    platform: str

    @property
    def is_main(self) -> bool:
        return self.process_index == 0


def is_main_process() -> bool:
    """True on process 0, the one that writes logs, plots and metrics files."""
    return jax.process_index() == 0


def process_info() -> ProcessInfo:
    """The current :class:`ProcessInfo` (initialises the JAX backend if it was not yet)."""
    return ProcessInfo(
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        local_device_count=jax.local_device_count(),
        device_count=jax.device_count(),
        platform=jax.default_backend(),
    )


def _unset(value: Any) -> bool:
    return value is None or value == ""


def _check_coordinator_address(address: str) -> None:
    host, sep, port = str(address).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"distributed.coordinator_address must look like HOST:PORT (e.g. 10.0.0.2:8476), "
            f"got {address!r}"
        )


def _tpu_cluster_detected() -> Optional[str]:
    """Names the TPU environment that JAX can set up by itself, or None.

    A Cloud TPU VM has ``libtpu`` installed and TPU chips as ``/dev/accel*`` (v2-v4) or
    ``/dev/vfio/<n>`` (v5e, v5p, v6e) devices; on GKE the TPU worker list is in the environment.
    JAX reads the worker list and this host's index from the TPU metadata in both cases.
    """
    if os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("TPU_PROCESS_ADDRESSES"):
        return "TPU workers listed in the environment (GKE)"
    if importlib.util.find_spec("libtpu") is None:
        return None
    if glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"):
        return "Cloud TPU VM"
    return None


def initialize(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    *,
    auto_detect: bool = True,
    initialization_timeout_s: int = 300,
) -> ProcessInfo:
    """Starts the multi-process runtime when the job has several processes; idempotent.

    * With all three of ``coordinator_address``, ``num_processes``, ``process_id``: starts
      ``jax.distributed`` with them (nothing to start when ``num_processes == 1``).
    * With none (``None`` or ``""``, the config's "auto"): on a Cloud TPU VM or GKE TPU slice
      JAX finds the coordinator, process count and index itself; elsewhere this is a single
      process and nothing is started. ``auto_detect=False`` skips the TPU detection.

    Call it before any other JAX call (``jax.devices()``, creating arrays): JAX refuses to start
    the distributed runtime once its backend is up. A second call returns the same information,
    and raises if it asks for a different process layout.

    Returns:
      :class:`ProcessInfo` of this process.
    """
    explicit = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    given = {name: value for name, value in explicit.items() if not _unset(value)}
    if given and len(given) < len(explicit):
        missing = sorted(set(explicit) - set(given))
        raise ValueError(
            f"distributed settings are incomplete: {sorted(given)} given but {missing} missing; "
            "give all three (coordinator_address, num_processes, process_id) or none to "
            "auto-detect"
        )
    if given:
        _check_coordinator_address(coordinator_address)
        for name in ("num_processes", "process_id"):
            if isinstance(explicit[name], bool) or not isinstance(explicit[name], int):
                raise ValueError(
                    f"distributed.{name} must be an int, got {explicit[name]!r}"
                )
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(
                f"distributed.process_id must be in [0, num_processes); got process_id="
                f"{process_id}, num_processes={num_processes}"
            )

    if jax.distributed.is_initialized():
        if given and (num_processes, process_id) != (jax.process_count(), jax.process_index()):
            raise RuntimeError(
                f"jax.distributed is already running as process {jax.process_index()} of "
                f"{jax.process_count()}; cannot re-initialise as process {process_id} of "
                f"{num_processes}"
            )
        return process_info()

    if given:
        if num_processes == 1:
            return process_info()
        description = f"process {process_id} of {num_processes}, coordinator {coordinator_address}"
        kwargs = dict(explicit)
    else:
        description = _tpu_cluster_detected() if auto_detect else None
        if description is None:
            return process_info()
        kwargs = {}
    # JAX aborts the process (no Python exception) when the coordinator cannot be reached, so
    # say first what this process is waiting for.
    print(f"[hiper_jax] starting jax.distributed ({description}); waiting up to "
          f"{initialization_timeout_s} s for all processes", file=sys.stderr, flush=True)
    try:
        jax.distributed.initialize(**kwargs, initialization_timeout=initialization_timeout_s)
    except Exception as error:
        raise RuntimeError(
            f"jax.distributed.initialize failed ({description}): {error}. Every process must "
            "start with the same coordinator address and process count, a distinct process id, "
            "and call hiper_jax.distributed.initialize() before any other JAX call."
        ) from error
    info = process_info()
    logger.info("jax.distributed ready: %s", info)
    return info


# --------------------------------------------------------------------------------------------
# Meshes


def device_grid(shape: Sequence[int], devices: Sequence[Any]) -> np.ndarray:
    """Devices arranged as a ``shape`` array in an order that suits the interconnect.

    One TPU slice: ``mesh_utils.create_device_mesh`` maps the axes onto the physical torus
    (splitting physical axes only when it must). Several slices (``slice_index`` differs):
    slices are joined along the first axis (``data``) over the data-centre network with
    ``create_hybrid_device_mesh``, so only data-parallel gradient reductions cross slices.
    """
    shape = tuple(int(s) for s in shape)
    slices = {getattr(d, "slice_index", 0) for d in devices}
    if len(slices) > 1:
        if shape[0] % len(slices):
            raise ValueError(
                f"the devices span {len(slices)} TPU slices, so mesh.data={shape[0]} must be a "
                f"multiple of {len(slices)} (data parallelism is the axis that crosses slices)"
            )
        per_slice = (shape[0] // len(slices),) + shape[1:]
        dcn = (len(slices),) + (1,) * (len(shape) - 1)
        return mesh_utils.create_hybrid_device_mesh(
            per_slice, dcn, devices, allow_split_physical_axes=True
        )
    try:
        return mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError):
        return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)


def make_mesh(
    data: int = -1,
    fsdp: int = 1,
    tensor: int = 1,
    devices: Optional[Sequence[Any]] = None,
) -> Mesh:
    """The ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all devices of the job).

    ``-1`` (at most one axis) takes the remaining devices, so the default is pure data
    parallelism and ``make_mesh(**config.mesh)`` builds the configured mesh. Axis types are
    ``Auto``: jitted code places arrays by sharding annotations and ``jax.shard_map`` accepts
    unsharded inputs (the ``jax.make_mesh`` default, ``Explicit``, does not).

    ``make_mesh(devices=jax.devices()[:1])`` is the one-device mesh ``(1, 1, 1)``.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh needs at least one device, got an empty device list")
    shape = resolve_mesh_shape(len(devices), data=data, fsdp=fsdp, tensor=tensor)
    return Mesh(
        device_grid(shape, devices),
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
    )


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes that split batch rows: those of :data:`BATCH_AXES` present in ``mesh``."""
    axes = tuple(axis for axis in BATCH_AXES if axis in mesh.axis_names)
    if not axes:
        raise ValueError(
            f"mesh axes {mesh.axis_names} contain none of the batch axes {BATCH_AXES}"
        )
    return axes


def batch_spec(mesh: Mesh) -> PartitionSpec:
    """PartitionSpec that splits the leading (row) axis over the batch axes of ``mesh``."""
    return PartitionSpec(batch_axes(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """NamedSharding that splits the leading (row) axis over the batch axes of ``mesh``."""
    return NamedSharding(mesh, batch_spec(mesh))


def num_batch_shards(mesh: Mesh) -> int:
    """How many ways batch rows are split (product of the batch axes' sizes)."""
    return math.prod(mesh.shape[axis] for axis in batch_axes(mesh))


# --------------------------------------------------------------------------------------------
# Which rows a host plays; placing whole batches on the mesh


@dataclasses.dataclass(frozen=True)
class HostShare:
    """The rows of a global batch that one process feeds (its env pool for one rollout batch).

    Attributes:
      global_rows: rows of the whole batch.
      row_indices: the global rows this process feeds, ascending: host-local arrays hold them
        in this order. One contiguous block with meshes from :func:`make_mesh` on one slice.
    """

    global_rows: int
    row_indices: tuple[int, ...]

    @property
    def rows(self) -> int:
        return len(self.row_indices)

    @property
    def row_offset(self) -> int:
        """The first global row this process feeds."""
        return self.row_indices[0]

    def env_seeds(self, base_seed: int) -> np.ndarray:
        """``[rows]`` int64 seeds, ``base_seed + global row index``: distinct across hosts."""
        return base_seed + np.asarray(self.row_indices, dtype=np.int64)


def host_share(mesh: Mesh, global_rows: int, process: Optional[int] = None) -> HostShare:
    """Which rows of a ``global_rows`` batch, split over the batch axes, ``process`` feeds.

    Processes whose devices hold the same rows (a ``tensor`` axis that crosses hosts) get the
    same share and must feed identical data.

    Raises ValueError when ``global_rows`` is not a multiple of the batch shards.
    """
    shards = num_batch_shards(mesh)
    if global_rows < 1 or global_rows % shards:
        raise ValueError(
            f"a global batch of {global_rows} rows must be a positive multiple of the "
            f"{shards} batch shards of mesh {dict(mesh.shape)} (data x fsdp)"
        )
    process = jax.process_index() if process is None else process
    index_map = batch_sharding(mesh).devices_indices_map((global_rows,))
    rows = sorted({
        row
        for device, (index,) in index_map.items()
        if device.process_index == process
        for row in range(*index.indices(global_rows))
    })
    if not rows:
        raise ValueError(f"process {process} owns no device of mesh {dict(mesh.shape)}")
    return HostShare(global_rows=global_rows, row_indices=tuple(rows))


def _path_name(path) -> str:
    return jax.tree_util.keystr(path) or "<batch>"


def gather_to_all_hosts(tree: Any) -> Any:
    """Whole global arrays as NumPy on every process (e.g. metrics or plots on process 0).

    Collective: every process must call it. Copies everything to every host, so keep it to
    small arrays.
    """
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def gather_objects(obj: Any) -> list[Any]:
    """Every process's picklable ``obj``, in process order, on every process (collective).

    Used for rollouts: each host plays its own envs and every host then holds all trajectories.
    """
    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int64))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [pickle.loads(gathered[p, : sizes[p]].tobytes()) for p in range(len(sizes))]


def global_from_host_copy(tree: Any, mesh: Mesh, spec: Optional[PartitionSpec] = None) -> Any:
    """Global arrays laid out as ``spec`` (default :func:`batch_spec`) from a whole batch that
    every process holds identically (each process places only its devices' shards; in one
    process, every device gets its shard)."""
    sharding = NamedSharding(mesh, batch_spec(mesh) if spec is None else spec)

    def place(path, x):
        x = np.asarray(x)
        try:
            return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
        except ValueError as error:
            raise ValueError(
                f"{_path_name(path)} (shape {x.shape}) cannot be laid out as {sharding.spec} on "
                f"mesh {dict(mesh.shape)}: {error}"
            ) from error

    return jax.tree_util.tree_map_with_path(place, tree)


def rows_divide(tree: Any, mesh: Mesh) -> bool:
    """Whether every leaf of ``tree`` has a leading (row) axis that the batch shards divide."""
    shards = num_batch_shards(mesh)
    return all(np.ndim(x) > 0 and np.shape(x)[0] % shards == 0 for x in jax.tree.leaves(tree))


def place_rows(tree: Any, mesh: Mesh) -> Any:
    """A whole host batch (the same on every process) as global arrays on ``mesh``: rows split
    over the batch axes (``data`` x ``fsdp``) when the batch shards divide every leaf's rows,
    else replicated (a small batch in one process; with several processes the config keeps
    update and pass rows multiples of the batch shards)."""
    return global_from_host_copy(tree, mesh, None if rows_divide(tree, mesh) else PartitionSpec())


def on_mesh(mesh: Optional[Mesh]):
    """Context in which jitted calls see ``mesh`` (``jax.set_mesh``), so the logical-axis
    activation hints of :func:`hiper_jax.models.sharding.constrain` apply; nothing without one."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def local_copy(tree: Any, device: Optional[Any] = None) -> Any:
    """A copy of (possibly cross-host) global arrays on one device of this process
    (default: its first); in a single process, the tree itself.

    Collective across processes (an all-gather of the whole tree).
    """
    if jax.process_count() == 1:
        return tree
    full = multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_put(full, device or jax.local_devices()[0])


# --------------------------------------------------------------------------------------------
# Per-host sampling meshes

HOST_AXIS = "hosts"  # the leading axis of :func:`replica_mesh`: one entry per process


def _process_devices() -> dict[int, list[Any]]:
    """Every process's devices, in ``jax.devices()`` order."""
    by_process: dict[int, list[Any]] = {}
    for device in jax.devices():
        by_process.setdefault(device.process_index, []).append(device)
    return dict(sorted(by_process.items()))


def _local_grid(shape: tuple[int, int, int], devices: Sequence[Any]) -> np.ndarray:
    """One host's devices as a ``shape`` grid (topology-aware where the slice allows it)."""
    try:
        return device_grid(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
        return np.asarray(devices, dtype=object).reshape(shape)


@functools.lru_cache(maxsize=16)
def _host_grids(shape: tuple[int, int, int]) -> np.ndarray:
    """``[processes, data, fsdp, tensor]``: every process's sampling-mesh grid (the same on
    every process, so the cross-host copy of :func:`copy_to_host_mesh` agrees on it)."""
    by_process = _process_devices()
    counts = {p: len(d) for p, d in by_process.items()}
    if len(set(counts.values())) > 1:
        raise ValueError(f"a per-host sampling mesh needs the same number of devices on every "
                         f"process, got {counts} (process: devices)")
    return np.stack([_local_grid(shape, devices) for devices in by_process.values()])


def host_sampling_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, *,
                       kv_heads: Optional[int] = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over this process's devices only (``jax.local_devices()``),
    for sampling: sizes as :func:`host_mesh_shape` resolves them over the host's devices
    (``tensor=0``: the largest size dividing ``kv_heads``).

    Jitted code on it never communicates with another host, so each host samples for its own
    envs at its own pace. Weights are split over ``fsdp`` (hidden) and ``tensor`` (heads, MLP,
    vocab) by the model's logical rules, prompt rows and the KV cache over ``data x fsdp``, KV
    heads over ``tensor`` where it divides them (else the cache is replicated along it).
    Every process must have the same number of devices.
    """
    local = jax.local_devices()
    shape = host_mesh_shape(len(local), data, fsdp, tensor, kv_heads)
    grid = _host_grids(shape)[list(_process_devices()).index(jax.process_index())]
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def replica_mesh(host_mesh: Mesh) -> Mesh:
    """The global mesh ``(hosts, data, fsdp, tensor)`` whose ``hosts`` rows are every process's
    :func:`host_sampling_mesh` of ``host_mesh``'s shape: an array replicated over ``hosts`` and
    laid out as a spec over the other axes is one host-mesh copy per host."""
    shape = tuple(int(host_mesh.shape[axis]) for axis in MESH_AXES)
    grids = _host_grids(shape)
    mine = grids[list(_process_devices()).index(jax.process_index())]
    if [d.id for d in mine.flat] != [d.id for d in host_mesh.devices.flat]:
        raise ValueError("the sampling mesh is not the one host_sampling_mesh builds for this "
                         f"process (shape {shape}); build it with distributed.host_sampling_mesh")
    return Mesh(grids, (HOST_AXIS,) + MESH_AXES,
                axis_types=(jax.sharding.AxisType.Auto,) * (len(MESH_AXES) + 1))


def _identity(x: Any) -> Any:
    return x


def copy_to_host_mesh(tree: Any, shardings: Any) -> Any:
    """``tree`` on every host, laid out as ``shardings`` (a matching tree of NamedShardings on
    this host's :func:`host_sampling_mesh`): e.g. the sampling copy of (cross-host) training
    parameters.

    One leaf at a time, device to device: the whole tree is never gathered onto one chip, and
    where XLA cannot convert a leaf's layout directly it holds that one leaf whole on each
    device for a moment (keep leaves small: one layer's weights, not a stack of them).
    In one process the leaves (any placement) are moved onto the host mesh. With several
    processes the call is collective (every process calls it with the same global arrays over
    all devices): each leaf is laid out on :func:`replica_mesh`, replicated over hosts, and each
    process keeps its own devices' shards as an array on its host mesh, which jitted code then
    uses without touching another host.
    """
    if jax.process_count() == 1:
        return jax.tree.map(jax.device_put, tree, shardings)

    def local(x, sharding):
        replicas = replica_mesh(sharding.mesh)
        x = jax.jit(_identity, out_shardings=NamedSharding(replicas, sharding.spec))(x)
        by_device = {shard.device: shard.data for shard in x.addressable_shards}
        devices = sharding.addressable_devices_indices_map(x.shape)
        return jax.make_array_from_single_device_arrays(x.shape, sharding, [by_device[d] for d in devices])

    return jax.tree.map(local, tree, shardings)


# --------------------------------------------------------------------------------------------
# Estimators under shard_map


@functools.lru_cache(maxsize=64)
def sharded_estimator(
    estimator_fn: Callable[..., Any], mesh: Mesh
) -> Callable[[Any, Any], Any]:
    """Wraps an estimator so that it runs under ``jax.shard_map`` with rows split over devices.

    Args:
      estimator_fn: ``estimator_fn(batch, cfg, axis_name=...) -> outputs``, where every leaf
        of ``batch`` and of the outputs has the batch (trajectory) axis first, e.g.
        ``hiper_jax.advantages.get_estimator("hae").fn``; it must reduce any cross-row
        statistics over ``axis_name`` (HAE and turn-GAE normalisation do).
      mesh: the mesh; rows are split over its batch axes (``data`` and ``fsdp`` together).

    Returns:
      ``run(batch, cfg) -> outputs``, jitted (``cfg`` static, so hashable). ``batch`` holds
      global arrays (:func:`place_rows`) or, in one process, plain arrays; its row count must
      be a multiple of :func:`num_batch_shards`. The outputs are global arrays split the same
      way. Estimators that need whole groups of rows (GRPO, RLOO) refuse. The same
      ``(estimator_fn, mesh)`` returns the same ``run`` (cached), so a loop that calls this
      every iteration compiles once per batch shape; ``run.jitted`` is the jitted function.
    """
    axes = batch_axes(mesh)
    spec = PartitionSpec(axes)
    shards = num_batch_shards(mesh)

    @functools.partial(jax.jit, static_argnames="cfg")
    def sharded_estimate(batch, cfg):
        per_shard = functools.partial(estimator_fn, cfg=cfg, axis_name=axes)
        return jax.shard_map(per_shard, mesh=mesh, in_specs=spec, out_specs=spec)(batch)

    def run(batch, cfg):
        for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
            rows = np.shape(leaf)[0] if np.ndim(leaf) else None
            if rows is None or rows % shards:
                raise ValueError(
                    f"{_path_name(path)} has shape {np.shape(leaf)}; its leading (row) axis must "
                    f"be a multiple of the {shards} batch shards of mesh {dict(mesh.shape)}"
                )
        return sharded_estimate(batch, cfg)

    run.jitted = sharded_estimate
    return run
