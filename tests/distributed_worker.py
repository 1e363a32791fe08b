"""One process of the two-process test in tests/test_distributed.py (run as a script).

Usage: python tests/distributed_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID OUT_DIR

The parent sets XLA_FLAGS (simulated CPU devices per process). Each process joins the job,
checks the global device count, runs a psum over all devices, and runs the sharded HAE on the
shared test batch (each process placing its devices' rows) for three mesh shapes; it writes the
rows it plays (``host_share``) of every output to OUT_DIR/process_<id>.npz for the parent to
compare with a single-process run.
"""

from __future__ import annotations

import sys

import numpy as np

from hiper_jax.advantages import TurnBatch
from hiper_jax.hae import HAEConfig

BATCH_ROWS = 16
TURNS = 9
MESHES = {"data8": dict(data=8), "data2_fsdp4": dict(data=2, fsdp=4),
          "interleaved": dict(data=4, fsdp=2, interleave_hosts=True)}
# Normalisation makes every output depend on every row, so a missing cross-host reduction shows.
HAE_CONFIG = HAEConfig(gamma=0.97, lam_turn=0.9, lam_seg=0.95, bootstrap_truncated=True,
                       keep_penalty=-0.1, keep_penalty_mode="normalized",
                       invalid_action_penalty=0.2, normalize=True)


def turn_batch(seed: int = 0, rows: int = BATCH_ROWS, turns: int = TURNS) -> TurnBatch:
    """A reproducible ``[rows, turns]`` batch with ragged lengths, switches, dones, invalids."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, turns + 1, size=(rows, 1))
    mask = np.arange(turns)[None, :] < lengths
    last = np.arange(turns)[None, :] == lengths - 1
    normal = lambda: rng.normal(size=(rows, turns)).astype(np.float32)  # noqa: E731
    return TurnBatch(
        rewards=normal(), values_low=normal(), values_high=normal(), values_term=normal(),
        switch=rng.random((rows, turns)) < 0.3,
        dones=last & (rng.random((rows, 1)) < 0.6),
        mask=mask,
        invalid=rng.random((rows, turns)) < 0.1,
    )


def main(coordinator: str, num_processes: int, process_id: int, out_dir: str) -> None:
    import jax
    from jax.sharding import PartitionSpec as P

    from hiper_jax import distributed
    from hiper_jax.advantages import get_estimator

    info = distributed.initialize(coordinator, num_processes, process_id)
    assert distributed.initialize(coordinator, num_processes, process_id) == info
    assert distributed.initialize() == info
    assert (info.process_index, info.process_count) == (process_id, num_processes), info
    assert distributed.is_main_process() == (process_id == 0)

    results = {"device_count": np.array(info.device_count),
               "local_device_count": np.array(info.local_device_count)}
    mesh = distributed.make_mesh(data=8)

    # Every device contributes its position on the mesh; the psum must see all 8.
    all_ids = np.array([[d.id] for d in mesh.devices.flat], np.float32)
    ids = distributed.place_rows(all_ids, mesh)
    total = jax.jit(jax.shard_map(lambda x: jax.lax.psum(x, ("data", "fsdp")), mesh=mesh,
                                  in_specs=P(("data", "fsdp")), out_specs=P()))(ids)
    results["psum_ids"] = np.asarray(total.addressable_data(0))
    results["device_ids"] = np.array(sorted(d.id for d in jax.devices()))

    estimator = get_estimator("hae").fn
    full = turn_batch()
    for name, axes in MESHES.items():
        axes = dict(axes)
        if axes.pop("interleave_hosts", False):
            # Alternate the two hosts' devices, so each feeds every other block of rows.
            by_host = [jax.local_devices(process_index=p) for p in range(num_processes)]
            axes["devices"] = [d for group in zip(*by_host) for d in group]
        mesh = distributed.make_mesh(**axes)
        share = distributed.host_share(mesh, BATCH_ROWS)
        out = distributed.sharded_estimator(estimator, mesh)(distributed.place_rows(full, mesh), HAE_CONFIG)
        whole = distributed.gather_to_all_hosts(out)
        rows = type(out)(*(np.asarray(field)[np.asarray(share.row_indices)] for field in whole))
        results[f"{name}/row_indices"] = np.array(share.row_indices)
        results[f"{name}/env_seeds"] = share.env_seeds(1000)
        for field, value in rows._asdict().items():
            results[f"{name}/{field}"] = value
        gathered = distributed.gather_to_all_hosts(out.adv_low)
        results[f"{name}/gathered_adv_low"] = gathered

    np.savez(f"{out_dir}/process_{process_id}.npz", **results)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
