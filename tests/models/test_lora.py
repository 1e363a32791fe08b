"""LoRA on the Qwen2 port: fresh adapters change nothing, merged weights compute the adapter
model (also in `transformers`), adapters shard like their kernels, bad settings are named."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from hf_qwen2 import hf_logits, make_hf_model, save_hf_model
from hiper_jax.models import qwen2
from hiper_jax.models.qwen2 import lora

CONFIG = qwen2.Qwen2Config(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
LORA = CONFIG.replace(lora_rank=4, lora_alpha=8.0)
TOKENS = np.random.default_rng(0).integers(0, 61, size=(2, 9)).astype(np.int32)


def nonzero_b(adapters, seed=1, scale=0.1):
    """The adapters with every ``lora_b`` random (as after some training)."""
    leaves, tree = jax.tree.flatten_with_path(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = [scale * jax.random.normal(k, x.shape) if path[-1].key == "lora_b" else x
           for (path, x), k in zip(leaves, keys)]
    return jax.tree.unflatten(tree, out)


@pytest.fixture(scope="module")
def base():
    return qwen2.init_params(jax.random.key(0), CONFIG)


@pytest.mark.parametrize("stacked", [True, False])
def test_fresh_adapters_leave_the_model_exactly_as_it_was(base, stacked):
    adapters = lora.init_adapters(jax.random.key(1), LORA)
    for path, x in jax.tree.flatten_with_path(adapters)[0]:  # random A, zero B
        assert (float(jnp.abs(x).max()) > 0) == (path[-1].key == "lora_a"), path
    full = lora.combine(adapters, base)
    if not stacked:
        base, full = qwen2.unstack_layers(base), qwen2.unstack_layers(full)
    want = np.asarray(qwen2.compute_logits(base, CONFIG, TOKENS))
    np.testing.assert_array_equal(np.asarray(qwen2.compute_logits(full, LORA, TOKENS)), want)
    # The base tree alone under the LoRA config is the base model (adapters off).
    np.testing.assert_array_equal(np.asarray(qwen2.compute_logits(base, LORA, TOKENS)), want)


def test_merged_weights_compute_the_adapter_model(base):
    full = lora.combine(nonzero_b(lora.init_adapters(jax.random.key(1), LORA)), base)
    adapted = np.asarray(qwen2.compute_logits(full, LORA, TOKENS))
    assert np.abs(adapted - np.asarray(qwen2.compute_logits(base, CONFIG, TOKENS))).max() > 1e-2
    merged = lora.merge_lora(full, LORA)
    assert not qwen2.has_adapters(merged)
    np.testing.assert_allclose(np.asarray(qwen2.compute_logits(merged, CONFIG, TOKENS)), adapted,
                               atol=1e-5, rtol=0)
    unstacked = qwen2.unstack_layers(full)
    np.testing.assert_allclose(np.asarray(qwen2.compute_logits(unstacked, LORA, TOKENS)), adapted,
                               atol=1e-5, rtol=0)
    np.testing.assert_allclose(
        np.asarray(qwen2.compute_logits(lora.merge_lora(unstacked, LORA), CONFIG, TOKENS)), adapted,
        atol=1e-5, rtol=0)


def test_split_and_combine_round_trip_without_copies(base):
    full = lora.combine(lora.init_adapters(jax.random.key(1), LORA), base)
    adapters, rest = lora.split_adapters(full)
    assert jax.tree.structure(rest) == jax.tree.structure(base)
    assert all(a is b for a, b in zip(jax.tree.leaves(rest), jax.tree.leaves(base)))
    names = {path[-1].key for path, _ in jax.tree.flatten_with_path(adapters)[0]}
    assert names == {"lora_a", "lora_b"}
    assert jax.tree.structure(lora.combine(adapters, rest)) == jax.tree.structure(full)
    # r * (in + out) per adapted projection and layer.
    e, m, h, kv, d, r = 32, 48, 4, 2, 8, 4
    per_layer = r * ((e + h * d) * 2 + (e + kv * d) * 2 + (e + m) * 2 + (m + e))
    assert lora.count_adapter_params(LORA) == 2 * per_layer
    assert sum(x.size for x in jax.tree.leaves(adapters)) == 2 * per_layer


def test_targets_choose_the_adapted_projections():
    config = CONFIG.replace(lora_rank=2, lora_targets=("q_proj", "down_proj"))
    adapters = lora.init_adapters(jax.random.key(0), config)
    assert set(adapters["layers"]["self_attn"]) == {"q_proj"}
    assert set(adapters["layers"]["mlp"]) == {"down_proj"}


def test_merged_export_loads_in_transformers_with_the_adapter_logits(tmp_path):
    config, params = qwen2.load_hf_checkpoint(save_hf_model(make_hf_model("gqa2-untied-theta1e6", seed=3),
                                                            tmp_path / "in"), progress=False)
    config = config.replace(lora_rank=4, lora_alpha=16.0)
    adapters = lora.init_adapters(jax.random.key(2), config)
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, size=(2, 11)).astype(np.int32)

    def nll(adapters):  # one gradient step makes every lora_b non-zero
        logits = qwen2.compute_logits(lora.combine(adapters, params), config, tokens[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))
    grads = jax.grad(nll)(adapters)
    adapters = jax.tree.map(lambda a, g: a - 0.5 * g / (jnp.abs(g).max() + 1e-12), adapters, grads)
    assert all(float(jnp.abs(b["lora_b"]).max()) > 0
               for b in (*adapters["layers"]["self_attn"].values(), *adapters["layers"]["mlp"].values()))
    full = lora.combine(adapters, params)
    ours = np.asarray(qwen2.compute_logits(full, config, tokens))
    assert np.abs(ours - np.asarray(qwen2.compute_logits(params, config, tokens))).max() > 1e-3
    qwen2.save_hf_checkpoint(full, config, tmp_path / "merged", progress=False)
    reloaded = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "merged").eval()
    np.testing.assert_allclose(hf_logits(reloaded, tokens), ours, atol=1e-4, rtol=0)
    config_again, _ = qwen2.load_hf_checkpoint(tmp_path / "merged", progress=False)
    assert config_again == config.without_lora()


def test_adapters_shard_like_their_kernels():
    mesh = jax.make_mesh((1, 2, 4), ("data", "fsdp", "tensor"), devices=jax.devices()[:8],
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    config = CONFIG.replace(num_attention_heads=4, num_key_value_heads=4, lora_rank=2)
    specs = jax.tree.map(lambda s: s.spec, lora.adapter_shardings(config, mesh))
    attention, mlp = specs["layers"]["self_attn"], specs["layers"]["mlp"]
    P = jax.sharding.PartitionSpec
    assert attention["q_proj"]["lora_a"] == P(None, "fsdp", None)      # [N, E, r]
    assert attention["q_proj"]["lora_b"] == P(None, None, "tensor", None)  # [N, r, H, D]
    assert attention["o_proj"]["lora_a"] == P(None, "tensor", None, None)  # [N, H, D, r]
    assert mlp["down_proj"]["lora_b"] == P(None, None, "fsdp")          # [N, r, E]
    placed = lora.init_adapters(jax.random.key(0), config, mesh)
    assert placed["layers"]["mlp"]["up_proj"]["lora_b"].sharding.spec == P(None, None, "tensor")


def test_bad_lora_settings_are_named(base):
    with pytest.raises(ValueError, match="lora_targets"):
        CONFIG.replace(lora_rank=2, lora_targets=("q_proj", "qkv"))
    with pytest.raises(ValueError, match="lora_rank"):
        CONFIG.replace(lora_rank=-1)
    with pytest.raises(ValueError, match="lora_alpha"):
        CONFIG.replace(lora_rank=2, lora_alpha=0.0)
    full = lora.combine(lora.init_adapters(jax.random.key(1), LORA), base)
    with pytest.raises(ValueError, match="lora_rank is 0"):
        qwen2.compute_logits(full, CONFIG, TOKENS)


def test_peft_adapter_directory_loads_in_peft_with_the_adapter_logits(tmp_path):
    import peft
    hf_dir = save_hf_model(make_hf_model("gqa2-untied-theta1e6", seed=3), tmp_path / "base")
    config, params = qwen2.load_hf_checkpoint(hf_dir, progress=False)
    config = config.replace(lora_rank=4, lora_alpha=8.0, lora_targets=("q_proj", "o_proj", "down_proj"))
    full = lora.combine(nonzero_b(lora.init_adapters(jax.random.key(2), config), scale=0.2), params)
    tokens = np.random.default_rng(4).integers(0, config.vocab_size, size=(2, 10)).astype(np.int32)
    ours = np.asarray(qwen2.compute_logits(full, config, tokens))
    assert np.abs(ours - np.asarray(qwen2.compute_logits(params, config, tokens))).max() > 1e-3
    names = qwen2.save_peft_adapter(full, config, tmp_path / "adapter", base_model=str(hf_dir))
    # 3 projections x layers x (A, B)
    assert len(names) == 3 * config.num_hidden_layers * 2 and "base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight" in names
    base_model = transformers.Qwen2ForCausalLM.from_pretrained(hf_dir).eval()
    adapted = peft.PeftModel.from_pretrained(base_model, tmp_path / "adapter").eval()
    np.testing.assert_allclose(hf_logits(adapted, tokens), ours, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="needs a tree with LoRA adapters"):
        qwen2.save_peft_adapter(params, config.without_lora(), tmp_path / "none")
