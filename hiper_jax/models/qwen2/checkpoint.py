"""Hugging Face safetensors checkpoints in and out of the Qwen2 parameter tree.

The name map is one small table (:func:`_tensor_map`): each HF tensor has a path in our tree,
the HF shape, and a pair of layout conversions (HF linear weights are ``[out, in]``; ours are
``[in, heads, head_dim]`` etc.). Loading checks every name and shape against the config before
reading any data, then streams tensor by tensor into the parameter tree of the module (the
state of :class:`~hiper_jax.models.qwen2.model.Qwen2ForCausalLM`, whose shardings come from the
logical axes on the abstract module's parameters; no module is built with data): read, convert,
cast, place on its sharding, and write into the stacked layer array in place, so peak memory
stays near one model copy plus one tensor.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from hiper_jax.models import sharding
from hiper_jax.models.qwen2.config import PathLike, Qwen2Config
from hiper_jax.models.qwen2.lora import merged_kernel
from hiper_jax.models.qwen2.model import Params, param_shardings, tree_config

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Buffers some exporters store that hold no learned weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint does not match its config, cannot be read, or holds non-finite weights;
    the message names the file and the tensor."""


@contextlib.contextmanager
def _open_safetensors(file: str):
    """``safe_open`` whose errors (a truncated or corrupt file) name the file."""
    try:
        handle = safe_open(file, framework="numpy")
    except Exception as error:  # noqa: BLE001 - SafetensorError, OSError: reported with the path
        raise CheckpointError(f"{file}: not a readable safetensors file ({error})") from None
    with handle as f:
        yield f


def _check_finite(array: np.ndarray, name: str, file: str) -> None:
    """Refuses a tensor with NaN or inf entries (a diverged or corrupt checkpoint)."""
    # A float64 sum of float32/16 values cannot overflow, so it is finite exactly when every
    # entry is; only then is the (memory-hungry) element-wise count skipped.
    if np.isfinite(np.sum(array, dtype=np.float64)):
        return
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    raise CheckpointError(f"{file}: tensor {name} has {bad} non-finite value(s) (NaN or inf) "
                          f"of {array.size}; refusing to load it")


class _Tensor(NamedTuple):
    """One HF tensor: where it lives in our tree, its HF shape and the layout conversions."""

    path: tuple[str, ...]
    layer: Optional[int]
    hf_shape: tuple[int, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _tensor_map(config: Qwen2Config) -> dict[str, _Tensor]:
    """HF tensor name -> :class:`_Tensor` for every tensor a checkpoint of ``config`` holds."""
    e, m, v = config.hidden_size, config.intermediate_size, config.vocab_size
    h, kv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    same = lambda x: x
    table: dict[str, _Tensor] = {
        "model.embed_tokens.weight": _Tensor(("embed_tokens", "embedding"), None, (v, e), same,
                                             same),
        "model.norm.weight": _Tensor(("norm", "scale"), None, (e,), same, same),
    }
    if not config.tie_word_embeddings:
        table["lm_head.weight"] = _Tensor(("lm_head", "kernel"), None, (v, e),
                                          lambda x: x.T, lambda x: x.T)

    def in_proj(heads: int) -> tuple[tuple[int, ...], Callable, Callable]:
        # HF [heads * d, e] <-> ours [e, heads, d]
        return ((heads * d, e), lambda x: x.T.reshape(e, heads, d),
                lambda x: x.reshape(e, heads * d).T)

    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        per_layer = {
            "input_layernorm.weight": (("input_layernorm", "scale"), (e,), same, same),
            "post_attention_layernorm.weight": (("post_attention_layernorm", "scale"), (e,),
                                                same, same),
            "self_attn.o_proj.weight": (("self_attn", "o_proj", "kernel"), (e, h * d),
                                        lambda x: x.T.reshape(h, d, e),
                                        lambda x: x.reshape(h * d, e).T),
            "mlp.gate_proj.weight": (("mlp", "gate_proj", "kernel"), (m, e), lambda x: x.T,
                                     lambda x: x.T),
            "mlp.up_proj.weight": (("mlp", "up_proj", "kernel"), (m, e), lambda x: x.T,
                                   lambda x: x.T),
            "mlp.down_proj.weight": (("mlp", "down_proj", "kernel"), (e, m), lambda x: x.T,
                                     lambda x: x.T),
        }
        for name, heads in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
            per_layer[f"self_attn.{name}.weight"] = (("self_attn", name, "kernel"), *in_proj(heads))
            per_layer[f"self_attn.{name}.bias"] = (
                ("self_attn", name, "bias"), (heads * d,),
                functools.partial(np.reshape, shape=(heads, d)),
                functools.partial(np.reshape, shape=(heads * d,)))
        for suffix, (path, shape, to_ours, to_hf) in per_layer.items():
            table[prefix + suffix] = _Tensor(("layers",) + path, i, shape, to_ours, to_hf)
    return table


def _checkpoint_files(path: str) -> dict[str, str]:
    """Tensor name -> safetensors file for a checkpoint directory (single file or index)."""
    index_path = os.path.join(path, INDEX_FILE)
    single_path = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise CheckpointError(f"{index_path}: not valid JSON ({error})") from None
            except (KeyError, TypeError):
                raise CheckpointError(f"{index_path}: has no 'weight_map' object") from None
        files = {name: os.path.join(path, file) for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{INDEX_FILE} lists {os.path.basename(file)}, which is "
                                        f"missing from {path}")
        return files
    if os.path.isfile(single_path):
        with _open_safetensors(single_path) as f:
            return {name: single_path for name in f.keys()}
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")


def _get(tree: Params, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: Params, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _place(array: np.ndarray, target: Sharding) -> jax.Array:
    """Puts a host array (the same on every process) onto ``target``."""
    return jax.make_array_from_callback(array.shape, target, lambda index: array[index])


@functools.partial(jax.jit, donate_argnums=0)
def _write_layer(stacked: jax.Array, layer: jax.Array, index: jax.Array) -> jax.Array:
    """``stacked[index] = layer`` in place (the stacked buffer is donated)."""
    return lax.dynamic_update_index_in_dim(stacked, layer.astype(stacked.dtype), index, 0)


def _layer_sharding(target: Sharding) -> Sharding:
    if isinstance(target, NamedSharding):
        return NamedSharding(target.mesh, PartitionSpec(*target.spec[1:]))
    return target


def load_hf_checkpoint(path: PathLike, dtype: Any = jnp.float32, *,
                       compute_dtype: Any = None, mesh: Optional[Mesh] = None,
                       rules: sharding.AxisRules = sharding.DEFAULT_RULES,
                       progress: bool = True) -> tuple[Qwen2Config, Params]:
    """Loads a HF Qwen2 checkpoint directory (``config.json`` + ``model.safetensors`` or a sharded
    ``model.safetensors.index.json``).

    Args:
        path: the checkpoint directory.
        dtype: parameter dtype (``config.param_dtype``); tensors are cast as they are read.
        compute_dtype: activation dtype (``config.compute_dtype``); defaults to ``dtype``.
        mesh: place parameters sharded on this mesh under ``rules``; default: a one-device mesh
            on the first device.
        progress: show a progress bar.

    Returns:
        ``(config, params)``.

    Raises:
        FileNotFoundError: a missing directory, config or weights file.
        CheckpointError: a missing, unexpected, mis-shaped or non-finite tensor, or an unreadable
            file (named in the message).
        ConfigFileError: a ``config.json`` that is not JSON or has a field of the wrong type.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    dtype = jnp.dtype(dtype)
    config = Qwen2Config.from_hf_config(path, param_dtype=dtype.name,
                                        compute_dtype=jnp.dtype(compute_dtype or dtype).name)
    files = _checkpoint_files(path)
    expected = _tensor_map(config)
    ignored = {name for name in files if name.endswith(_IGNORED_SUFFIXES)}
    if config.tie_word_embeddings:
        # Some exporters also store the tied head; it is the embedding, so it is not read.
        ignored |= {"lm_head.weight"} & set(files)
    missing = sorted(set(expected) - set(files))
    unexpected = sorted(set(files) - set(expected) - ignored)
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s) {', '.join(missing[:8])}"
                              f"{' ...' if len(missing) > 8 else ''} ({len(missing)} in all)")
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor(s) {', '.join(unexpected[:8])}"
                              f"{' ...' if len(unexpected) > 8 else ''} ({len(unexpected)} in all)"
                              " — does config.json match the weights?")

    by_file: dict[str, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)
    for file, names in by_file.items():  # headers only: fail before any data is read
        with _open_safetensors(file) as f:
            for name in names:
                _check_tensor(f, name, expected[name], file)

    targets = param_shardings(config, mesh or sharding.single_device_mesh(), rules)
    params: Params = {}
    with tqdm(total=len(expected), desc="loading " + os.path.basename(path.rstrip("/")),
              disable=not progress, unit="tensor") as bar:
        for file, names in by_file.items():
            with _open_safetensors(file) as f:
                for name in names:
                    spec = expected[name]
                    raw = f.get_tensor(name)
                    _check_finite(raw, name, file)
                    array = spec.to_ours(raw).astype(dtype, copy=False)
                    del raw
                    target = _get(targets, spec.path)
                    if spec.layer is None:
                        _set(params, spec.path, _place(array, target))
                    else:
                        _write_stacked(params, spec, array, target, config)
                    del array
                    bar.update()
    return config, params


def _check_tensor(f: Any, name: str, spec: _Tensor, file: str) -> None:
    shape = tuple(f.get_slice(name).get_shape())
    if shape != spec.hf_shape:
        raise CheckpointError(f"{os.path.basename(file)}: tensor {name} has shape {list(shape)}, "
                              f"the config expects {list(spec.hf_shape)}")
    kind = f.get_slice(name).get_dtype()
    if kind not in ("F32", "F16", "BF16", "F64"):
        raise CheckpointError(f"{os.path.basename(file)}: tensor {name} has dtype {kind}; "
                              "only float checkpoints are supported")


def _write_stacked(params: Params, spec: _Tensor, array: np.ndarray, target: Sharding,
                   config: Qwen2Config) -> None:
    """Writes layer ``spec.layer`` of a stacked parameter, creating the stack on first use."""
    try:
        stacked = _get(params, spec.path)
    except KeyError:
        shape = (config.num_hidden_layers,) + array.shape
        stacked = jax.jit(lambda: jnp.zeros(shape, array.dtype), out_shardings=target)()
    layer = _place(array, _layer_sharding(target))
    _set(params, spec.path, _write_layer(stacked, layer, spec.layer))


def _to_host(x: jax.Array) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _kernel(params: Params, spec: _Tensor, scale: float) -> jax.Array:
    """The tensor ``spec`` names (one layer of a stacked one), its adapter merged in if any."""
    layer = (lambda x: x) if spec.layer is None else (lambda x: x[spec.layer])
    value = layer(_get(params, spec.path))
    owner = _get(params, spec.path[:-1])
    if spec.path[-1] == "kernel" and "lora_a" in owner:
        value = merged_kernel(value, layer(owner["lora_a"]), layer(owner["lora_b"]), scale)
    return value


def write_hf_directory(table: dict[str, _Tensor], value: Callable[[_Tensor], jax.Array],
                       hf_config: dict, out_dir: str, dtype: np.dtype, max_shard_bytes: int,
                       progress: bool) -> None:
    """Writes an HF checkpoint directory: the tensors of ``table`` (``value(spec)`` in our layout,
    converted by ``spec.to_hf`` and cast to ``dtype``, one at a time) in ``model.safetensors``
    or numbered shards of at most ``max_shard_bytes`` plus ``model.safetensors.index.json``,
    and ``hf_config`` (with ``torch_dtype``) as ``config.json``. Every process converts
    (sharded arrays are gathered); only process 0 writes."""
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(out_dir, exist_ok=True)
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name, spec in table.items():
        size = int(np.prod(spec.hf_shape)) * dtype.itemsize
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += size

    weight_map: dict[str, str] = {}
    total_bytes = 0
    with tqdm(total=len(table), desc="saving " + os.path.basename(out_dir.rstrip("/")),
              disable=not progress or not writer, unit="tensor") as bar:
        for number, names in enumerate(shards, start=1):
            file = SINGLE_FILE if len(shards) == 1 else \
                f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            tensors: dict[str, np.ndarray] = {}
            for name in names:
                spec = table[name]
                array = np.ascontiguousarray(spec.to_hf(_to_host(value(spec))).astype(dtype))
                tensors[name] = array
                weight_map[name] = file
                total_bytes += array.nbytes
                bar.update()
            if writer:
                save_file(tensors, os.path.join(out_dir, file), metadata={"format": "pt"})
            del tensors
    if not writer:
        return
    if len(shards) > 1:
        with open(os.path.join(out_dir, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, f,
                      indent=2)
    hf_config = dict(hf_config, torch_dtype=dtype.name)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2)


def save_hf_checkpoint(params: Params, config: Qwen2Config, out_dir: PathLike, *,
                       dtype: Any = None, max_shard_bytes: int = 2 * 1024 ** 3,
                       progress: bool = True) -> None:
    """Writes ``params`` as a HF checkpoint directory that ``transformers`` loads.

    Writes ``config.json`` and ``model.safetensors``, or numbered shards plus
    ``model.safetensors.index.json`` when the weights exceed ``max_shard_bytes``. Tensors are
    converted one at a time and each shard is written as soon as it is full. ``dtype`` defaults
    to ``config.param_dtype``. In a multi-process run every process must call this (sharded
    arrays are gathered); only process 0 writes.

    A tree with LoRA adapters (under the LoRA ``config`` it was trained with) is written with
    each adapter merged into its kernel, ``W + lora_alpha / r * A @ B``, one tensor at a time:
    a plain checkpoint that ``transformers`` loads and that computes the adapter model.
    """
    scale = tree_config(params, config).lora_scale
    out_dir = os.fspath(out_dir)
    dtype = np.dtype(jnp.dtype(dtype or config.param_dtype))
    write_hf_directory(_tensor_map(config), lambda spec: _kernel(params, spec, scale),
                       config.to_hf_config(), out_dir, dtype, max_shard_bytes, progress)


PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


def save_peft_adapter(params: Params, config: Qwen2Config, out_dir: PathLike, *,
                      base_model: str = "", dtype: Any = jnp.float32) -> list[str]:
    """Writes the LoRA adapters of ``params`` as a ``peft`` adapter directory.

    ``adapter_config.json`` (``peft_type`` LORA, ``r``, ``lora_alpha``, ``target_modules``) and
    ``adapter_model.safetensors`` with ``base_model.model.<module>.lora_A.weight [r, in]`` and
    ``lora_B.weight [out, r]`` per adapted projection and layer: ``peft.PeftModel.from_pretrained``
    on the base checkpoint (the one the run started from, named by ``base_model`` in the
    config file) computes the adapter model, and LoRA serving stacks (vLLM's ``--lora-modules``)
    read the same layout. Our adapters ``lora_a [*I, r]`` and ``lora_b [r, *O]`` flatten ``I``
    and ``O`` in the order of the HF weight's input and output axes. Value heads are not part
    of it (the HF model has none). Only process 0 writes. Returns the tensor names written.
    """
    config = tree_config(params, config)
    if not config.lora_rank:
        raise ValueError("save_peft_adapter needs a tree with LoRA adapters "
                         "(Qwen2Config.lora_rank > 0); save_hf_checkpoint writes plain weights")
    out_dir = os.fspath(out_dir)
    dtype = np.dtype(jnp.dtype(dtype))
    rank = config.lora_rank
    tensors: dict[str, np.ndarray] = {}
    for name, spec in _tensor_map(config).items():
        owner = _get(params, spec.path[:-1])
        if spec.path[-1] != "kernel" or "lora_a" not in owner:
            continue
        layer = (lambda x: x) if spec.layer is None else (lambda x: x[spec.layer])
        lora_a = _to_host(layer(owner["lora_a"])).reshape(-1, rank)
        lora_b = _to_host(layer(owner["lora_b"])).reshape(rank, -1)
        module = "base_model.model." + name[:-len(".weight")]
        tensors[f"{module}.lora_A.weight"] = np.ascontiguousarray(lora_a.T.astype(dtype))
        tensors[f"{module}.lora_B.weight"] = np.ascontiguousarray(lora_b.T.astype(dtype))
    if jax.process_index() != 0:
        return sorted(tensors)
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, PEFT_WEIGHTS), metadata={"format": "pt"})
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": config.lora_alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted(config.lora_targets), "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True,
    }
    with open(os.path.join(out_dir, PEFT_CONFIG), "w", encoding="utf-8") as f:
        json.dump(peft_config, f, indent=2)
    return sorted(tensors)
