"""Sampling on a per-host mesh (8 simulated CPU devices, tests/conftest.py): the sharded sampler
gives the tokens of one device, each device holds 1/8 of the weight matrices, the KV cache and
activations follow the sharding rules, and the host mesh's sizes are checked naming the field."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from hiper_jax import distributed
from hiper_jax.agent.grammar import PAD, WILD
from hiper_jax.models import qwen2
from hiper_jax.sampling import DecodeConstraint, SamplingConfig, generate, pad_prompts, sampling_copy

# Every sharded dimension divisible by 8: hidden (fsdp), heads and KV heads, MLP, vocab (tensor).
CONFIG = qwen2.Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=8, num_key_value_heads=8, head_dim=4,
                           initializer_range=0.3, tie_word_embeddings=False)
PROMPTS = [[5, 9, 14, 3, 60, 21, 8], [40, 3], [11, 50, 51, 52, 53], [7], [2, 4, 6, 8, 10, 12],
           [33, 34], [20, 21, 22], [9, 9, 9, 9]]
STOP = 1
HOST_MESHES = [(1, 1, 8), (1, 8, 1)]
MODES = {
    "greedy": SamplingConfig(max_new_tokens=5, greedy=True, stop_token_ids=(STOP,)),
    "sampled": SamplingConfig(max_new_tokens=5, temperature=1.3, stop_token_ids=(STOP,)),
    "constrained": SamplingConfig(max_new_tokens=5, temperature=1.0, stop_token_ids=(STOP,)),
}


@pytest.fixture(scope="module")
def devices():
    found = jax.local_devices()
    assert len(found) == 8, "tests/conftest.py should give 8 simulated CPU devices"
    return found


def host_params(seed: int = 0) -> dict:
    """Random parameters of CONFIG as NumPy (no jitted init to compile)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda shape: (0.3 * rng.standard_normal(shape)).astype(np.float32),
                        qwen2.param_shapes(CONFIG), is_leaf=lambda x: isinstance(x, tuple))


@pytest.fixture(scope="module")
def params():
    return jax.device_put(host_params())


def constraint_for(rows: int) -> DecodeConstraint:
    """Two alternatives per row: a literal answer, and one with free text (budget 2)."""
    alternatives = np.full((rows, 2, 4), PAD, np.int32)
    alternatives[:, 0, :3] = [12, 13, STOP]
    alternatives[:, 1] = [30, WILD, 31, STOP]
    text_mask = np.zeros(CONFIG.vocab_size, bool)
    text_mask[40:60] = True
    return DecodeConstraint(alternatives, np.full((rows,), 2, np.int32), text_mask)


def run(params, mode, mesh=None):
    tokens, mask = pad_prompts(PROMPTS, 0, length_multiple=8)
    constraint = constraint_for(len(PROMPTS)) if mode == "constrained" else None
    if mesh is not None:
        tokens, mask = distributed.place_rows((tokens, mask), mesh)
        if constraint is not None:
            alternatives, budget = distributed.place_rows(constraint[:2], mesh)
            constraint = DecodeConstraint(alternatives, budget, distributed.global_from_host_copy(
                constraint.text_mask, mesh, P()))
    with distributed.on_mesh(mesh):
        return generate(params, CONFIG, tokens, mask, jax.random.key(7), MODES[mode], constraint)


class OneDevice(dict):
    """The one-device outputs of each mode, computed when first asked for."""

    def __init__(self, params):
        super().__init__()
        self.params = jax.device_put(qwen2.unstack_layers(params), jax.local_devices()[0])

    def __missing__(self, mode):
        self[mode] = jax.tree.map(np.asarray, run(self.params, mode))
        return self[mode]


@pytest.fixture(scope="module")
def one_device(params):
    return OneDevice(params)


def per_device_bytes(tree) -> dict:
    held: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return held


# Each case compiles the sampler twice (3-5 s per compile on a 2-core CPU): greedy runs by
# default, the sampled and constrained cases with -m slow.
CASES = [pytest.param(mode, marks=() if mode == "greedy" else pytest.mark.slow) for mode in MODES]


@pytest.mark.parametrize("mode", CASES)
@pytest.mark.parametrize("shape", HOST_MESHES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_sampling_gives_the_tokens_of_one_device(devices, params, one_device, shape, mode):
    mesh = distributed.host_sampling_mesh(*shape)
    assert tuple(mesh.shape.values()) == shape
    assert {d.id for d in mesh.devices.flat} == {d.id for d in devices}
    copy = sampling_copy(params, CONFIG, mesh)
    out = run(copy, mode, mesh)
    want = one_device[mode]
    np.testing.assert_array_equal(out.tokens, want.tokens)
    np.testing.assert_array_equal(out.lengths, want.lengths)
    np.testing.assert_allclose(out.logprobs, want.logprobs, atol=1e-5)
    if mode == "constrained":
        np.testing.assert_array_equal(out.allowed, want.allowed)
        assert (want.lengths > 1).all() and (want.tokens[:, 0] != want.tokens[0, 0]).any()
    # Rows split over the batch axes of the host mesh (fsdp here), not over tensor.
    rows_per_device = {s.data.shape[0] for s in out.tokens.addressable_shards}
    assert rows_per_device == {len(PROMPTS) // distributed.num_batch_shards(mesh)}


@pytest.mark.parametrize("shape", HOST_MESHES, ids=lambda s: "x".join(map(str, s)))
def test_each_device_holds_an_eighth_of_the_weights(devices, params, shape):
    mesh = distributed.host_sampling_mesh(*shape)
    copy = sampling_copy(params, CONFIG, mesh, jnp.bfloat16)
    assert isinstance(copy["layers"], list) and len(copy["layers"]) == CONFIG.num_hidden_layers
    layer = copy["layers"][0]
    matrices = {"embed": copy["embed_tokens"]["embedding"], "lm_head": copy["lm_head"]["kernel"],
                **{name: layer["self_attn"][name]["kernel"] for name in ("q_proj", "k_proj", "v_proj", "o_proj")},
                **{name: layer["mlp"][name]["kernel"] for name in ("gate_proj", "up_proj", "down_proj")}}
    for name, x in matrices.items():
        assert x.dtype == jnp.bfloat16 and x.sharding.mesh == mesh, name
        assert len(x.addressable_shards) == 8, name
        for shard in x.addressable_shards:
            assert shard.data.size * 8 == x.size, (name, shard.data.shape, x.shape)
    total = sum(x.nbytes for x in jax.tree.leaves(copy))
    rest = total - sum(x.nbytes for x in matrices.values())  # norms and biases: small
    held = per_device_bytes(copy)
    assert set(held) == set(devices)
    assert all(total / 8 <= b <= total / 8 + rest for b in held.values()), (held, total)
    np.testing.assert_array_equal(np.asarray(matrices["lm_head"], np.float32),
                                  np.asarray(params["lm_head"]["kernel"].astype(jnp.bfloat16), np.float32))


def test_kv_cache_and_activations_follow_the_rules_on_the_host_mesh(devices, params, monkeypatch):
    """Under the host mesh the cache is split over rows (fsdp) and KV heads (tensor), and the
    activations carry the rules' shardings (traced here with a prompt width no other test uses)."""
    from tests.sharding_probes import activation_shardings, rules_sharding

    mesh = distributed.host_sampling_mesh(1, 2, 4)
    copy = sampling_copy(params, CONFIG, mesh)
    tokens, mask = distributed.place_rows(pad_prompts(PROMPTS, 0, length_multiple=11), mesh)
    with activation_shardings(monkeypatch) as hints, distributed.on_mesh(mesh):
        jax.block_until_ready(generate(copy, CONFIG, tokens, mask, jax.random.key(1), MODES["greedy"]))
    cache = [(axes, shape, placed) for axes, shape, placed in hints if "cache_length" in axes]
    assert {axes for axes, _, _ in cache} == {("layers", "batch", "kv_heads", "cache_length", "head_dim"),
                                              ("batch", "cache_length")}
    for axes, shape, placed in hints:
        assert placed.is_equivalent_to(rules_sharding(mesh, axes, shape), len(shape)), (axes, placed)
    kv = next(placed for axes, _, placed in cache if "kv_heads" in axes)
    assert kv.spec[1] == "fsdp" and kv.spec[2] == "tensor"


def test_host_mesh_shape_resolves_auto_tensor_and_names_the_field():
    shape = distributed.host_mesh_shape
    assert shape(8, data=-1, fsdp=1, tensor=0, kv_heads=2) == (4, 1, 2)
    assert shape(8, data=-1, fsdp=1, tensor=0, kv_heads=4) == (2, 1, 4)
    assert shape(4, data=1, fsdp=-1, tensor=0, kv_heads=28) == (1, 1, 4)
    assert shape(8, data=1, fsdp=-1, tensor=0, kv_heads=3) == (1, 8, 1)
    assert shape(8, data=1, fsdp=1, tensor=-1) == (1, 1, 8)
    assert shape(1, data=-1, fsdp=1, tensor=0, kv_heads=2) == (1, 1, 1)
    errors = {
        r"sampling.mesh.tensor=0 \(auto\) needs sampling.mesh.data or sampling.mesh.fsdp to be -1":
            dict(data=2, fsdp=4, tensor=0, kv_heads=2),
        r"needs the model's number of KV heads": dict(data=-1, tensor=0),
        r"sampling.mesh.tensor must be a positive int, -1 \(the rest\) or 0": dict(tensor=-3),
        r"sampling.mesh.fsdp must be a positive int or -1": dict(fsdp=0, tensor=2),
        r"sampling.mesh data=1 x fsdp=1 x tensor=4 uses 4 devices but 8": dict(data=1, tensor=4),
        r"the fixed axes use 3 devices.*sampling.mesh.data=-1": dict(fsdp=3),
        r"the fixed sizes use 3 devices": dict(fsdp=3, tensor=0, kv_heads=2),
    }
    for message, sizes in errors.items():
        with pytest.raises(ValueError, match=message):
            shape(8, **sizes)


def test_host_mesh_is_this_hosts_devices_and_its_replica_mesh(devices):
    mesh = distributed.host_sampling_mesh(tensor=0, kv_heads=2)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    replicas = distributed.replica_mesh(mesh)
    assert dict(replicas.shape) == {"hosts": 1, "data": 4, "fsdp": 1, "tensor": 2}
    assert [d.id for d in replicas.devices[0].flat] == [d.id for d in mesh.devices.flat]
    other = jax.sharding.Mesh(mesh.devices[::-1], mesh.axis_names)
    with pytest.raises(ValueError, match="not the one host_sampling_mesh builds"):
        distributed.replica_mesh(other)


def test_sampling_copy_refuses_adapters_and_other_trees(devices, params):
    mesh = distributed.host_sampling_mesh(1, 1, 8)
    with pytest.raises(ValueError, match="merge them first"):
        sampling_copy({**params, "layers": {**params["layers"], "lora_a": params["norm"]["scale"]}},
                      CONFIG, mesh)
    with pytest.raises(ValueError, match="does not match the model's"):
        sampling_copy({k: v for k, v in params.items() if k != "lm_head"}, CONFIG, mesh)


@pytest.mark.slow
def test_two_processes_each_sample_on_their_own_chips(tmp_path, one_device):
    """Two processes of 4 devices: the training weights are global arrays over all 8; each
    process's sampling copy lives on its own 4 devices (a quarter of each matrix per device) and
    samples the tokens of one device, greedy and with a fixed key (tests/sampling_worker.py)."""
    import sys

    from tests.sampling_worker import HOST_MESHES
    from tests.test_distributed import _child_env, _free_port, _run_processes

    coordinator = f"127.0.0.1:{_free_port()}"
    commands = [[sys.executable, "-m", "tests.sampling_worker", coordinator, "2", str(i), str(tmp_path)]
                for i in range(2)]
    for i, (code, log) in enumerate(_run_processes(commands, _child_env(4), timeout_s=300)):
        assert code == 0, f"process {i} failed:\n{log[-4000:]}"
    for i in range(2):
        out = np.load(tmp_path / f"process_{i}.npz")
        for name in HOST_MESHES:
            for mode in ("greedy", "sampled"):
                np.testing.assert_array_equal(out[f"{name}/{mode}/tokens"], one_device[mode].tokens)
                np.testing.assert_allclose(out[f"{name}/{mode}/logprobs"], one_device[mode].logprobs,
                                           atol=1e-5)
