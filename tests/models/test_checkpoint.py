"""HF checkpoint load/save: round trips through transformers, sharded files, clear errors."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file, save_file

from hf_qwen2 import hf_logits, make_hf_model, save_hf_model
from hiper_jax.models import qwen2

TOKENS = np.array([[5, 17, 3, 44, 90, 12, 7], [1, 2, 3, 4, 5, 6, 7]], np.int32)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    model = make_hf_model("gqa2-untied-theta1e6", seed=1)
    return model, save_hf_model(model, tmp_path_factory.mktemp("hf"))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


@pytest.mark.parametrize("name", ["gqa1-tied-theta1e4", "gqa2-untied-theta1e6"])
def test_saved_checkpoint_loads_in_transformers_with_equal_logits(name, tmp_path):
    model = make_hf_model(name, seed=2)
    config, params = qwen2.load_hf_checkpoint(save_hf_model(model, tmp_path / "in"),
                                              progress=False)
    qwen2.save_hf_checkpoint(params, config, tmp_path / "out", progress=False)
    assert not os.path.exists(tmp_path / "out" / "model.safetensors.index.json")
    reloaded = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert reloaded.config.tie_word_embeddings == config.tie_word_embeddings
    ours = np.asarray(qwen2.compute_logits(params, config, jnp.asarray(TOKENS)))
    np.testing.assert_allclose(hf_logits(reloaded, TOKENS), ours, atol=1e-4, rtol=0)
    # And back: exactly the same parameters.
    config_again, params_again = qwen2.load_hf_checkpoint(tmp_path / "out", progress=False)
    assert config_again == config
    jax.tree.map(np.testing.assert_array_equal, params_again, params)


def test_sharded_checkpoints_load_and_save(hf_dir, tmp_path):
    model, path = hf_dir
    sharded = save_hf_model(model, tmp_path / "sharded", max_shard_size="40KB")
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    _, reference_params = qwen2.load_hf_checkpoint(path, progress=False)
    config, params = qwen2.load_hf_checkpoint(sharded, progress=False)
    jax.tree.map(np.testing.assert_array_equal, params, reference_params)

    qwen2.save_hf_checkpoint(params, config, tmp_path / "ours", max_shard_bytes=50_000,
                             progress=False)
    with open(tmp_path / "ours" / "model.safetensors.index.json") as f:
        files = set(json.load(f)["weight_map"].values())
    assert len(files) > 2
    reloaded = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "ours").eval()
    np.testing.assert_allclose(hf_logits(reloaded, TOKENS), hf_logits(model, TOKENS), atol=1e-5)


def test_bfloat16_load_and_save(hf_dir, tmp_path):
    _, path = hf_dir
    config, params = qwen2.load_hf_checkpoint(path, dtype=jnp.bfloat16, compute_dtype=jnp.float32,
                                              progress=False)
    assert config.param_dtype == "bfloat16" and config.compute_dtype == "float32"
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    qwen2.save_hf_checkpoint(params, config, tmp_path / "bf16", progress=False)
    assert load_file(str(tmp_path / "bf16" / "model.safetensors"))["model.norm.weight"].dtype \
        == jnp.bfloat16
    _, params_again = qwen2.load_hf_checkpoint(tmp_path / "bf16", dtype=jnp.bfloat16,
                                               progress=False)
    jax.tree.map(np.testing.assert_array_equal, params_again, params)


def test_loads_onto_a_mesh(hf_dir):
    _, path = hf_dir
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    config, params = qwen2.load_hf_checkpoint(path, mesh=mesh, progress=False)
    _, local = qwen2.load_hf_checkpoint(path, progress=False)
    expected = qwen2.param_shardings(config, mesh)
    jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail(str(s)),
                 params, expected)
    assert params["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec == \
        jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    jax.tree.map(np.testing.assert_array_equal, params, local)


def _rewrite_weights(path, edit):
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_tensor_is_named(hf_dir, tmp_path):
    path = _copy(hf_dir[1], tmp_path / "c")
    _rewrite_weights(path, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(qwen2.CheckpointError,
                       match=r"missing.*model\.layers\.1\.self_attn\.k_proj\.bias"):
        qwen2.load_hf_checkpoint(path, progress=False)


def test_unexpected_tensor_is_named(hf_dir, tmp_path):
    path = _copy(hf_dir[1], tmp_path / "c")
    _rewrite_weights(path, lambda t: t.update({"model.layers.9.mlp.up_proj.weight":
                                               np.zeros((2, 2), np.float32)}))
    with pytest.raises(qwen2.CheckpointError, match=r"unexpected.*model\.layers\.9\.mlp\.up_proj"):
        qwen2.load_hf_checkpoint(path, progress=False)


def test_misshaped_tensor_is_named(hf_dir, tmp_path):
    path = _copy(hf_dir[1], tmp_path / "c")
    _rewrite_weights(path, lambda t: t.update({"model.layers.0.mlp.down_proj.weight":
                                               np.zeros((48, 81), np.float32)}))
    with pytest.raises(qwen2.CheckpointError,
                       match=r"model\.layers\.0\.mlp\.down_proj\.weight has shape \[48, 81\]"):
        qwen2.load_hf_checkpoint(path, progress=False)


def test_missing_files_are_named(hf_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        qwen2.load_hf_checkpoint(tmp_path / "nowhere", progress=False)
    path = _copy(hf_dir[1], tmp_path / "c")
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        qwen2.load_hf_checkpoint(path, progress=False)
    os.remove(os.path.join(path, "config.json"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        qwen2.load_hf_checkpoint(path, progress=False)


def test_missing_shard_is_named(hf_dir, tmp_path):
    sharded = save_hf_model(hf_dir[0], tmp_path / "sharded", max_shard_size="40KB")
    shard = sorted(f for f in os.listdir(sharded) if f.startswith("model-"))[1]
    os.remove(os.path.join(sharded, shard))
    with pytest.raises(FileNotFoundError, match=shard):
        qwen2.load_hf_checkpoint(sharded, progress=False)


BASE = dict(model_type="qwen2", vocab_size=100, hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu")


def test_both_rope_layouts_parse_alike(tmp_path):
    old = dict(BASE, rope_theta=12345.0, rope_scaling=None, use_sliding_window=False,
               sliding_window=4096, max_window_layers=21)
    new = dict(BASE, rope_parameters={"rope_type": "default", "rope_theta": 12345.0},
               layer_types=["full_attention"] * 2)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(old, f)
    from_file = qwen2.Qwen2Config.from_hf_config(tmp_path / "config.json")
    assert from_file == qwen2.Qwen2Config.from_hf_config(new)
    assert from_file.rope_theta == 12345.0 and from_file.head_dim == 8
    assert from_file == qwen2.Qwen2Config.from_hf_config(from_file.to_hf_config())
    hf = transformers.Qwen2Config(**{k: v for k, v in new.items() if k != "model_type"})
    assert qwen2.Qwen2Config.from_hf_config(hf) == from_file


@pytest.mark.parametrize("field, value", [
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}),
    ("rope_parameters.rope_type", {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}),
    ("use_sliding_window", True),
    ("hidden_act", "gelu"),
    ("layer_types", ["full_attention", "sliding_attention"]),
    ("model_type", "llama"),
])
def test_unsupported_config_fields_are_named(field, value):
    raw = dict(BASE, **{field.split(".")[0]: value})
    with pytest.raises(qwen2.UnsupportedConfigError, match=field.replace(".", r"\.")):
        qwen2.Qwen2Config.from_hf_config(raw)


def test_published_qwen25_config_parses_without_warnings(recwarn):
    # config.json of Qwen2.5-1.5B-Instruct as published (older layout, top-level rope_theta).
    published = {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 1536,
        "initializer_range": 0.02, "intermediate_size": 8960, "max_position_embeddings": 32768,
        "max_window_layers": 21, "model_type": "qwen2", "num_attention_heads": 12,
        "num_hidden_layers": 28, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "transformers_version": "4.43.1", "use_cache": True,
        "use_sliding_window": False, "vocab_size": 151936,
    }
    config = qwen2.Qwen2Config.from_hf_config(published)
    assert not recwarn.list
    assert (config.head_dim, config.num_groups, config.stop_token_ids) == (128, 6, (151645,))
    assert 1.5e9 < qwen2.count_params(config) < 1.6e9
    with pytest.warns(UserWarning, match="mystery_option"):
        qwen2.Qwen2Config.from_hf_config(dict(published, mystery_option=3))


def test_truncated_safetensors_is_named(hf_dir, tmp_path):
    path = _copy(hf_dir[1], tmp_path / "c")
    file = os.path.join(path, "model.safetensors")
    data = open(file, "rb").read()
    open(file, "wb").write(data[: len(data) - 100])
    with pytest.raises(qwen2.CheckpointError, match=r"c/model\.safetensors: not a readable safetensors file"):
        qwen2.load_hf_checkpoint(path, progress=False)


def test_non_finite_weights_are_refused(hf_dir, tmp_path):
    path = _copy(hf_dir[1], tmp_path / "c")

    def poison(tensors):
        tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = np.nan
        tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = np.inf

    _rewrite_weights(path, poison)
    with pytest.raises(qwen2.CheckpointError,
                       match=r"model\.safetensors: tensor model\.layers\.1\.mlp\.up_proj\.weight has 2 "
                             r"non-finite value"):
        qwen2.load_hf_checkpoint(path, progress=False)
    _rewrite_weights(path, lambda t: t.update({k: np.full_like(v, np.nan) for k, v in t.items()}))
    with pytest.raises(qwen2.CheckpointError, match="non-finite"):
        qwen2.load_hf_checkpoint(path, progress=False)


def test_unreadable_config_json_is_named(hf_dir, tmp_path):
    path = _copy(hf_dir[1], tmp_path / "c")
    config_file = os.path.join(path, "config.json")
    text = open(config_file).read()
    open(config_file, "w").write(text[: len(text) // 2])
    with pytest.raises(qwen2.ConfigFileError, match=r"c/config\.json: not valid JSON \(.*line"):
        qwen2.load_hf_checkpoint(path, progress=False)
    for field, value, kind in (("num_hidden_layers", "two", "an integer"), ("hidden_size", 31.5, "an integer"),
                               ("rms_norm_eps", "tiny", "a number"),
                               ("rope_parameters.rope_theta", [1], "a number"),
                               ("tie_word_embeddings", "yes", "true or false")):
        config = json.loads(text)
        section, _, key = field.rpartition(".")
        (config[section] if section else config)[key] = value
        open(config_file, "w").write(json.dumps(config))
        with pytest.raises(qwen2.ConfigFileError, match=rf"config\.json: field '{field}' must be {kind}"):
            qwen2.load_hf_checkpoint(path, progress=False)
