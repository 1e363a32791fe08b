"""Hugging Face safetensors checkpoints in and out of the Qwen2.5-VL parameter tree.

The language model's tensors are the Qwen2 port's (``model.layers.*``, ``model.embed_tokens``,
``model.norm``, ``lm_head``: the table of :mod:`hiper_jax.models.qwen2.checkpoint`, under
``language_model``); the vision tower's are ``visual.*`` (:func:`_vision_map`). That is the
layout transformers writes and the published checkpoints use; the names transformers 5 uses in
memory (``model.language_model.*``, ``model.visual.*``) are read too. Loading checks every name
and shape before reading data, then streams tensor by tensor onto the parameters' shardings,
writing stacked layers in place (the Qwen2 loader's helpers).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, Sharding
from tqdm.auto import tqdm

from hiper_jax.models import sharding
from hiper_jax.models.qwen2.checkpoint import (CheckpointError, _Tensor, _check_finite,
                                               _check_tensor, _checkpoint_files, _get,
                                               _IGNORED_SUFFIXES, _layer_sharding,
                                               _open_safetensors, _place, _set, _tensor_map,
                                               _write_layer, write_hf_directory)
from hiper_jax.models.qwen2_5_vl.config import PathLike, Qwen2_5_VLConfig, VisionConfig
from hiper_jax.models.qwen2_5_vl.model import Params, param_shardings

# transformers 5's in-memory names -> the names on disk.
_RENAMES = (("model.language_model.", "model."), ("model.visual.", "visual."))


def _vision_map(config: VisionConfig) -> dict[str, _Tensor]:
    """HF tensor name -> :class:`_Tensor` for the vision tower (paths under ``visual``)."""
    e, h, d, m = config.hidden_size, config.num_heads, config.head_dim, config.intermediate_size
    wide, out = e * config.merge_unit, config.out_hidden_size
    same, t = (lambda x: x), (lambda x: x.T)
    kernel_shape = (e, config.in_channels, config.temporal_patch_size, config.patch_size,
                    config.patch_size)
    table = {
        # Conv3d weight [E, C, T, P, P] with stride = kernel: a matmul over flattened patches.
        "visual.patch_embed.proj.weight": _Tensor(
            ("visual", "patch_embed", "kernel"), None, kernel_shape,
            lambda x: x.reshape(e, -1).T, lambda x: x.T.reshape(kernel_shape)),
        "visual.merger.ln_q.weight": _Tensor(("visual", "merger", "ln_q", "scale"), None, (e,),
                                             same, same),
        "visual.merger.mlp.0.weight": _Tensor(("visual", "merger", "mlp_0", "kernel"), None,
                                              (wide, wide), t, t),
        "visual.merger.mlp.0.bias": _Tensor(("visual", "merger", "mlp_0", "bias"), None, (wide,),
                                            same, same),
        "visual.merger.mlp.2.weight": _Tensor(("visual", "merger", "mlp_2", "kernel"), None,
                                              (out, wide), t, t),
        "visual.merger.mlp.2.bias": _Tensor(("visual", "merger", "mlp_2", "bias"), None, (out,),
                                            same, same),
    }
    per_block = {
        "norm1.weight": (("norm1", "scale"), (e,), same, same),
        "norm2.weight": (("norm2", "scale"), (e,), same, same),
        # HF [3 * E, E] (rows: q, k, v, each heads-major) <-> ours [E, 3, H, D]
        "attn.qkv.weight": (("attn", "qkv", "kernel"), (3 * e, e),
                            lambda x: x.T.reshape(e, 3, h, d), lambda x: x.reshape(e, 3 * e).T),
        "attn.qkv.bias": (("attn", "qkv", "bias"), (3 * e,), lambda x: x.reshape(3, h, d),
                          lambda x: x.reshape(3 * e)),
        "attn.proj.weight": (("attn", "proj", "kernel"), (e, e), lambda x: x.T.reshape(h, d, e),
                             lambda x: x.reshape(e, e).T),
        "attn.proj.bias": (("attn", "proj", "bias"), (e,), same, same),
        "mlp.gate_proj.weight": (("mlp", "gate_proj", "kernel"), (m, e), t, t),
        "mlp.gate_proj.bias": (("mlp", "gate_proj", "bias"), (m,), same, same),
        "mlp.up_proj.weight": (("mlp", "up_proj", "kernel"), (m, e), t, t),
        "mlp.up_proj.bias": (("mlp", "up_proj", "bias"), (m,), same, same),
        "mlp.down_proj.weight": (("mlp", "down_proj", "kernel"), (e, m), t, t),
        "mlp.down_proj.bias": (("mlp", "down_proj", "bias"), (e,), same, same),
    }
    for i in range(config.depth):
        for suffix, (path, shape, to_ours, to_hf) in per_block.items():
            table[f"visual.blocks.{i}.{suffix}"] = _Tensor(("visual", "blocks") + path, i, shape,
                                                           to_ours, to_hf)
    return table


def _tensor_table(config: Qwen2_5_VLConfig) -> dict[str, _Tensor]:
    """Every tensor of a checkpoint of ``config``: the Qwen2 table under ``language_model``,
    then the vision tower's."""
    text = {name: spec._replace(path=("language_model",) + spec.path)
            for name, spec in _tensor_map(config.text).items()}
    return {**text, **_vision_map(config.vision)}


def _disk_name(name: str) -> str:
    for old, new in _RENAMES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def load_hf_checkpoint(path: PathLike, dtype: Any = jnp.float32, *, compute_dtype: Any = None,
                       mesh: Optional[Mesh] = None,
                       rules: sharding.AxisRules = sharding.DEFAULT_RULES,
                       progress: bool = True) -> tuple[Qwen2_5_VLConfig, Params]:
    """Loads a HF Qwen2.5-VL checkpoint directory (``config.json`` + ``model.safetensors`` or a
    sharded ``model.safetensors.index.json``).

    Args:
        path: the checkpoint directory.
        dtype: parameter dtype of both parts; tensors are cast as they are read.
        compute_dtype: activation dtype; defaults to ``dtype``.
        mesh: place parameters sharded on this mesh under ``rules`` (default: one device).
        progress: show a progress bar.

    Returns:
        ``(config, params)`` with ``params = {"visual": ..., "language_model": ...}``.

    Raises:
        FileNotFoundError, CheckpointError, ConfigFileError, UnsupportedConfigError: as the
        Qwen2 loader (the message names the file, tensor or field).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    dtype = jnp.dtype(dtype)
    config = Qwen2_5_VLConfig.from_hf_config(path, param_dtype=dtype,
                                             compute_dtype=jnp.dtype(compute_dtype or dtype))
    stored = _checkpoint_files(path)
    files = {_disk_name(name): (name, file) for name, file in stored.items()}
    expected = _tensor_table(config)
    ignored = {name for name in files if name.endswith(_IGNORED_SUFFIXES)}
    if config.text.tie_word_embeddings:
        ignored |= {"lm_head.weight"} & set(files)
    missing = sorted(set(expected) - set(files))
    unexpected = sorted(set(files) - set(expected) - ignored)
    for what, names in (("missing", missing), ("unexpected", unexpected)):
        if names:
            raise CheckpointError(f"{path}: {what} tensor(s) {', '.join(names[:8])}"
                                  f"{' ...' if len(names) > 8 else ''} ({len(names)} in all)"
                                  + (" — does config.json match the weights?"
                                     if what == "unexpected" else ""))
    by_file: dict[str, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name][1], []).append(name)
    for file, names in by_file.items():  # headers only: fail before any data is read
        with _open_safetensors(file) as f:
            for name in names:
                _check_tensor(f, files[name][0], expected[name], file)

    targets = param_shardings(config, mesh or sharding.single_device_mesh(), rules)
    depth = {"language_model": config.text.num_hidden_layers, "visual": config.vision.depth}
    params: Params = {}
    with tqdm(total=len(expected), desc="loading " + os.path.basename(path.rstrip("/")),
              disable=not progress, unit="tensor") as bar:
        for file, names in by_file.items():
            with _open_safetensors(file) as f:
                for name in names:
                    spec = expected[name]
                    raw = f.get_tensor(files[name][0])
                    _check_finite(raw, name, file)
                    array = spec.to_ours(raw).astype(dtype, copy=False)
                    del raw
                    target = _get(targets, spec.path)
                    if spec.layer is None:
                        _set(params, spec.path, _place(array, target))
                    else:
                        _write_stacked(params, spec, array, target, depth[spec.path[0]])
                    bar.update()
    return config, params


def _write_stacked(params: Params, spec: _Tensor, array: np.ndarray, target: Sharding,
                   num_layers: int) -> None:
    """Writes layer ``spec.layer`` of a stacked parameter, creating the stack on first use."""
    try:
        stacked = _get(params, spec.path)
    except KeyError:
        shape = (num_layers,) + array.shape
        stacked = jax.jit(lambda: jnp.zeros(shape, array.dtype), out_shardings=target)()
    layer = _place(array, _layer_sharding(target))
    _set(params, spec.path, _write_layer(stacked, layer, spec.layer))


def save_hf_checkpoint(params: Params, config: Qwen2_5_VLConfig, out_dir: PathLike, *,
                       dtype: Any = None, max_shard_bytes: int = 2 * 1024 ** 3,
                       progress: bool = True) -> None:
    """Writes ``params`` as a HF checkpoint directory that transformers loads as
    ``Qwen2_5_VLForConditionalGeneration`` (``config.json`` and ``model.safetensors``, or
    numbered shards plus ``model.safetensors.index.json`` above ``max_shard_bytes``). ``dtype``
    defaults to the language model's ``param_dtype``. In a multi-process run every process
    calls this; only process 0 writes."""
    out_dir = os.fspath(out_dir)
    dtype = np.dtype(jnp.dtype(dtype or config.text.param_dtype))

    def value(spec: _Tensor) -> jax.Array:
        tensor = _get(params, spec.path)
        return tensor if spec.layer is None else tensor[spec.layer]
    write_hf_directory(_tensor_table(config), value, config.to_hf_config(), out_dir, dtype,
                       max_shard_bytes, progress)
