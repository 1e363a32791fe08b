"""Logical-axis sharding rules, and the model run sharded over an 8-device CPU mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from hiper_jax.models import qwen2, sharding
from hiper_jax.sampling import SamplingConfig, generate

CONFIG = qwen2.Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           initializer_range=0.2)


def _mesh(shape=(2, 2, 2)):
    return jax.make_mesh(shape, sharding.MESH_AXIS_NAMES,
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)


def test_logical_to_spec_follows_the_rules():
    mesh_shape = {"data": 2, "fsdp": 2, "tensor": 4}
    assert sharding.logical_to_spec(("vocab", "embed")) == P("tensor", "fsdp")
    # fsdp is taken by batch first, so embed stays replicated when both appear.
    assert sharding.logical_to_spec(("batch", "embed"), mesh_shape=mesh_shape,
                                    shape=(8, 32)) == P(("data", "fsdp"), None)
    # Two KV heads do not split over a tensor axis of 4: replicated along it.
    assert sharding.logical_to_spec(("layers", "embed", "kv_heads", "head_dim"),
                                    mesh_shape=mesh_shape, shape=(2, 32, 2, 8)) \
        == P(None, "fsdp", None, None)
    # Axes missing from the mesh are dropped.
    assert sharding.logical_to_spec(("batch", "vocab"), mesh_shape={"data": 4},
                                    shape=(8, 96)) == P("data", None)
    with pytest.raises(KeyError, match="no_such_axis"):
        sharding.logical_to_spec(("no_such_axis",))


def test_param_shardings_cover_every_parameter():
    shardings = qwen2.param_shardings(CONFIG, _mesh((1, 2, 4)))
    params = jax.eval_shape(lambda: qwen2.init_params(jax.random.key(0), CONFIG))
    assert jax.tree.structure(shardings) == jax.tree.structure(params)
    q = shardings["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.spec == P(None, "fsdp", "tensor", None)
    assert shardings["embed_tokens"]["embedding"].spec == P("tensor", "fsdp")
    unstacked = qwen2.param_shardings(CONFIG, _mesh((1, 2, 4)), stacked=False)
    assert jax.tree.structure(unstacked) == jax.tree.structure(
        jax.eval_shape(qwen2.unstack_layers, params))
    assert unstacked["layers"][1]["self_attn"]["q_proj"]["kernel"].spec == P("fsdp", "tensor", None)


def test_sharded_forward_and_generate_equal_single_device():
    params = qwen2.init_params(jax.random.key(0), CONFIG)
    tokens = jax.random.randint(jax.random.key(1), (8, 12), 0, CONFIG.vocab_size)
    mask = jnp.ones_like(tokens).at[:, :3].set(0)
    expected = qwen2.compute_logits(params, CONFIG, tokens, segment_ids=mask)
    sampling = SamplingConfig(max_new_tokens=4, greedy=True)
    expected_out = generate(params, CONFIG, tokens, mask, jax.random.key(2), sampling)

    mesh = _mesh()
    sharded = qwen2.init_params(jax.random.key(0), CONFIG, mesh=mesh)
    assert sharded["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    batch_sharding = NamedSharding(mesh, sharding.logical_to_spec(("batch", "length")))
    tokens_s, mask_s = (jax.device_put(x, batch_sharding) for x in (tokens, mask))
    with jax.set_mesh(mesh):
        logits = qwen2.compute_logits(sharded, CONFIG, tokens_s, segment_ids=mask_s)
        out = generate(sharded, CONFIG, tokens_s, mask_s, jax.random.key(2), sampling)
    assert logits.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    np.testing.assert_array_equal(out.tokens, expected_out.tokens)


def test_module_specs_are_built_under_a_mesh_and_inside_jit():
    """The abstract module (cached per config) is first built while a mesh is set, inside a
    jitted call: the logical axis names must not be resolved against that mesh."""
    import subprocess
    import sys
    import textwrap
    code = textwrap.dedent("""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        import jax, jax.numpy as jnp
        from hiper_jax import distributed
        from hiper_jax.models import qwen2
        from hiper_jax.models.qwen2 import model
        config = qwen2.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
        params = qwen2.init_params(jax.random.key(0), config)
        model._abstract.cache_clear()
        with jax.set_mesh(distributed.make_mesh(data=8)):
            hidden, _ = qwen2.forward(params, config, jnp.ones((8, 4), jnp.int32))
        print(hidden.shape)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("(8, 4, 32)")
