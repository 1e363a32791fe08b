"""Critic value heads: shared and separate backbones."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hiper_jax.models import qwen2, sharding, value_heads

CONFIG = qwen2.Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32,
                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                           initializer_range=0.2)


def test_value_heads_are_an_affine_map_of_hidden_states():
    heads = value_heads.init_value_heads(jax.random.key(0), CONFIG)
    heads = {**heads, "bias": jnp.array([0.1, -0.2, 0.3])}
    hidden = jax.random.normal(jax.random.key(1), (2, 5, 16))
    values = value_heads.value_heads(heads, hidden)
    assert values.shape == (2, 5, 3) and values.dtype == jnp.float32
    np.testing.assert_allclose(values, np.asarray(hidden) @ np.asarray(heads["kernel"])
                               + [0.1, -0.2, 0.3], atol=1e-5)
    assert value_heads.VALUE_HEAD_NAMES == ("low", "high", "term")


def test_separate_and_shared_critics():
    policy = qwen2.init_params(jax.random.key(0), CONFIG)
    tokens = jax.random.randint(jax.random.key(1), (2, 7), 0, CONFIG.vocab_size)
    hidden, _ = qwen2.forward(policy, CONFIG, tokens)

    separate = value_heads.init_critic(jax.random.key(2), CONFIG, policy)
    assert "lm_head" not in separate["backbone"]
    # A copy, not an alias: updating the policy leaves the critic alone.
    assert separate["backbone"]["norm"]["scale"] is not policy["norm"]["scale"]
    shared = value_heads.init_critic(jax.random.key(2), CONFIG, policy,
                                     value_heads.CriticConfig(shared_backbone=True))
    assert set(shared) == {"heads"}

    from_separate = value_heads.critic_values(separate, CONFIG, tokens)
    from_shared = value_heads.critic_values(shared, CONFIG, tokens, policy_hidden=hidden)
    np.testing.assert_allclose(from_separate, from_shared, atol=1e-5)
    np.testing.assert_allclose(from_shared, value_heads.value_heads(shared["heads"], hidden))

    mesh = sharding.single_device_mesh()
    for critic_config, params in ((value_heads.CriticConfig(), separate),
                                  (value_heads.CriticConfig(shared_backbone=True), shared)):
        shardings = value_heads.critic_param_shardings(CONFIG, critic_config, mesh)
        assert jax.tree.structure(shardings) == jax.tree.structure(params)


def test_critic_module_state_is_the_critic_tree():
    for shared in (False, True):
        critic_config = value_heads.CriticConfig(shared_backbone=shared)
        module = value_heads.Critic(CONFIG, critic_config, rngs=nnx.Rngs(0))
        params = qwen2.module_params(module)
        policy = qwen2.init_params(jax.random.key(0), CONFIG)
        assert (jax.tree.structure(params)
                == jax.tree.structure(value_heads.init_critic(jax.random.key(1), CONFIG, policy,
                                                              critic_config)))
        assert module.heads.kernel.get_metadata()["out_sharding"] == ("embed", "value_heads")
        tokens = jax.random.randint(jax.random.key(1), (2, 7), 0, CONFIG.vocab_size)
        hidden = None if not shared else jax.random.normal(jax.random.key(2), (2, 7, 16))
        np.testing.assert_allclose(module(tokens, policy_hidden=hidden),
                                   value_heads.critic_values(params, CONFIG, tokens,
                                                             policy_hidden=hidden), atol=1e-6)
