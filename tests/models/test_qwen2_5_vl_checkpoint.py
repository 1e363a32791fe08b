"""Qwen2.5-VL HF checkpoints: our save loads in transformers with equal logits, transformers'
save loads in ours, both config layouts parse, unsupported fields fail with their name."""

import json
import os

import jax
import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file, save_file

from hf_qwen2_5_vl import (IMAGE, TEXT, VISION, hf_logits, make_hf_model, pixel_values,
                           save_hf_model, sequence)
from hiper_jax.models import qwen2, qwen2_5_vl

GRID = [(1, 6, 4), (1, 4, 4)]


def _inputs():
    tokens = np.array([sequence([3, "image", 2, "image", 4], GRID, seed=1)])
    return tokens, pixel_values(GRID, seed=1)


@pytest.mark.parametrize("tied", [False, True])
def test_saved_checkpoint_loads_in_transformers_with_equal_logits(tied, tmp_path):
    model = make_hf_model(seed=3, tie_word_embeddings=tied)
    config, params = qwen2_5_vl.load_hf_checkpoint(save_hf_model(model, tmp_path / "in"),
                                                   progress=False)
    assert config.text.tie_word_embeddings == tied
    assert ("lm_head" in params["language_model"]) == (not tied)
    qwen2_5_vl.save_hf_checkpoint(params, config, tmp_path / "out", progress=False)
    reloaded = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tmp_path / "out", attn_implementation="eager").eval()
    assert reloaded.config.tie_word_embeddings == tied
    tokens, pixels = _inputs()
    ours = np.asarray(qwen2_5_vl.compute_logits(params, config, tokens, pixels, GRID))
    expected = hf_logits(reloaded, tokens, pixels, GRID)
    assert expected.std() > 0.5
    np.testing.assert_allclose(expected, ours, atol=1e-4, rtol=0)
    np.testing.assert_allclose(hf_logits(model, tokens, pixels, GRID), ours, atol=1e-4, rtol=0)
    # And back: the same config and exactly the same parameters.
    config_again, params_again = qwen2_5_vl.load_hf_checkpoint(tmp_path / "out", progress=False)
    assert config_again == config
    jax.tree.map(np.testing.assert_array_equal, params_again, params)


def test_sharded_files_and_in_memory_names_load(tmp_path):
    model = make_hf_model(seed=4)
    path = save_hf_model(model, tmp_path / "single")
    config, params = qwen2_5_vl.load_hf_checkpoint(path, progress=False)
    qwen2_5_vl.save_hf_checkpoint(params, config, tmp_path / "sharded", max_shard_bytes=20_000,
                                  progress=False)
    with open(tmp_path / "sharded" / "model.safetensors.index.json") as f:
        assert len(set(json.load(f)["weight_map"].values())) > 2
    _, sharded = qwen2_5_vl.load_hf_checkpoint(tmp_path / "sharded", progress=False)
    jax.tree.map(np.testing.assert_array_equal, sharded, params)
    # transformers 5's in-memory names (model.language_model.*, model.visual.*) read the same.
    tensors = load_file(os.path.join(path, "model.safetensors"))
    renamed = {("model.language_model." + k[6:] if k.startswith("model.") else
                "model." + k if k.startswith("visual.") else k): v for k, v in tensors.items()}
    os.makedirs(tmp_path / "renamed")
    save_file(renamed, str(tmp_path / "renamed" / "model.safetensors"))
    with open(os.path.join(path, "config.json")) as f:
        (tmp_path / "renamed" / "config.json").write_text(f.read())
    _, again = qwen2_5_vl.load_hf_checkpoint(tmp_path / "renamed", progress=False)
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_flat_published_config_layout_parses():
    # The layout of the published Qwen2.5-VL config.json files: text fields at the top level,
    # rope_scaling {"type": "mrope"}, in_chans, tie_word_embeddings beside them.
    flat = dict({k: v for k, v in TEXT.items() if k != "rope_parameters"},
                model_type="qwen2_5_vl", rope_theta=1e4,
                rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]},
                tie_word_embeddings=True, image_token_id=IMAGE, vision_start_token_id=142,
                vision_end_token_id=143, video_token_id=141, sliding_window=32768,
                max_window_layers=2, use_sliding_window=False, torch_dtype="bfloat16",
                vision_config=dict({k: v for k, v in VISION.items() if k != "in_channels"},
                                   in_chans=3, spatial_patch_size=2, model_type="qwen2_5_vl",
                                   tokens_per_second=2, hidden_act="silu"))
    config = qwen2_5_vl.Qwen2_5_VLConfig.from_hf_config(flat)
    assert config.mrope_section == (2, 1, 1)
    assert config.text.tie_word_embeddings and config.text.rope_theta == 1e4
    assert config.vision.in_channels == 3 and config.vision.tokens_per_second == 2
    assert config.vision.fullatt_block_indexes == (1,)
    # The nested layout we write reads back as the same config.
    assert qwen2_5_vl.Qwen2_5_VLConfig.from_hf_config(config.to_hf_config()) == config
    hf = transformers.Qwen2_5_VLConfig(**config.to_hf_config())
    assert hf.text_config.rope_parameters["mrope_section"] == [2, 1, 1]
    assert hf.vision_config.window_size == 8 and hf.tie_word_embeddings


@pytest.mark.parametrize("change, field", [
    (lambda c: c["text_config"]["rope_parameters"].update(rope_type="yarn", factor=4.0),
     "rope_type"),
    (lambda c: c["vision_config"].update(hidden_act="gelu"), "hidden_act"),
    (lambda c: c["text_config"].update(use_sliding_window=True), "use_sliding_window"),
    (lambda c: c["vision_config"].update(spatial_patch_size=7), "spatial_patch_size"),
    (lambda c: c.update(model_type="qwen2_vl"), "model_type"),
    (lambda c: c["vision_config"].update(deepstack_visual_indexes=[1]), "deepstack"),
])
def test_unsupported_config_fields_are_named(change, field):
    config = make_hf_model().config.to_dict()
    change(config)
    with pytest.raises(qwen2.UnsupportedConfigError, match=field):
        qwen2_5_vl.Qwen2_5_VLConfig.from_hf_config(config)


def test_mismatched_weights_are_refused(tmp_path):
    path = save_hf_model(make_hf_model(seed=5), tmp_path / "ckpt")
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["vision_config"]["depth"] = 2
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(qwen2.CheckpointError, match="unexpected tensor.*visual.blocks.2"):
        qwen2_5_vl.load_hf_checkpoint(path, progress=False)


@pytest.mark.slow
def test_loads_onto_a_mesh_with_equal_logits(tmp_path):
    path = save_hf_model(make_hf_model(seed=6), tmp_path / "ckpt")
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    config, params = qwen2_5_vl.load_hf_checkpoint(path, mesh=mesh, progress=False)
    _, local = qwen2_5_vl.load_hf_checkpoint(path, progress=False)
    expected = qwen2_5_vl.param_shardings(config, mesh)
    jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail(str(s)),
                 params, expected)
    qkv = params["visual"]["blocks"]["attn"]["qkv"]["kernel"]  # [depth, E, 3, H, D]
    assert qkv.sharding.is_equivalent_to(jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(None, "fsdp", None, "tensor")), qkv.ndim)
    jax.tree.map(np.testing.assert_array_equal, params, local)
    tokens, pixels = _inputs()
    np.testing.assert_allclose(
        qwen2_5_vl.compute_logits(params, config, tokens, pixels, GRID),
        qwen2_5_vl.compute_logits(local, config, tokens, pixels, GRID), atol=1e-5)
