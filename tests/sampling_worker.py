"""One process of the two-process sharded-sampling test in tests/test_sampling_sharded.py.

Usage: python -m tests.sampling_worker COORDINATOR NUM_PROCESSES PROCESS_ID OUT_DIR

Each process joins the job, initialises the test model's parameters as global arrays split over
all devices of both processes (the training layout, fsdp over 8), makes its own sampling copy on
a mesh over its 4 devices for two host-mesh shapes (one collective reshard; no leaf gathered
onto one chip), checks that the copy lives on its own devices only, each holding a quarter of
every weight matrix, and samples the test prompts there (greedy and with a fixed key). It
writes the tokens and log-probs to OUT_DIR/process_<id>.npz for the parent to compare with one
device.
"""

from __future__ import annotations

import sys

import numpy as np

HOST_MESHES = {"tensor4": (1, 1, 4), "fsdp4": (1, 4, 1)}


def main(coordinator: str, num_processes: int, process_id: int, out_dir: str) -> None:
    import jax

    from hiper_jax import distributed
    from hiper_jax.models import qwen2
    from hiper_jax.sampling import generate, pad_prompts, sampling_copy
    from tests.test_sampling_sharded import CONFIG, MODES, PROMPTS, host_params

    distributed.initialize(coordinator, num_processes, process_id)
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    train_mesh = distributed.make_mesh(data=1, fsdp=8)
    params = jax.tree.map(lambda x, sharding: distributed.global_from_host_copy(x, train_mesh, sharding.spec),
                          host_params(), qwen2.param_shardings(CONFIG, train_mesh))
    assert not params["lm_head"]["kernel"].is_fully_addressable
    local = {d.id for d in jax.local_devices()}
    results = {}
    for name, shape in HOST_MESHES.items():
        mesh = distributed.host_sampling_mesh(*shape)
        assert {d.id for d in mesh.devices.flat} == local
        copy = sampling_copy(params, CONFIG, mesh)
        for leaf in jax.tree.leaves(copy):
            assert leaf.is_fully_addressable and {d.id for d in leaf.devices()} <= local
        for kernel in (copy["lm_head"]["kernel"], copy["layers"][0]["mlp"]["up_proj"]["kernel"],
                       copy["layers"][0]["self_attn"]["q_proj"]["kernel"]):
            assert all(s.data.size * 4 == kernel.size for s in kernel.addressable_shards), kernel.sharding
        tokens, mask = distributed.place_rows(pad_prompts(PROMPTS, 0, length_multiple=8), mesh)
        for mode in ("greedy", "sampled"):
            with distributed.on_mesh(mesh):
                out = generate(copy, CONFIG, tokens, mask, jax.random.key(7), MODES[mode])
            results[f"{name}/{mode}/tokens"] = np.asarray(out.tokens)
            results[f"{name}/{mode}/logprobs"] = np.asarray(out.logprobs)
    np.savez(f"{out_dir}/process_{process_id}.npz", **results)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
