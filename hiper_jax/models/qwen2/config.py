"""Qwen2 / Qwen2.5 model configuration, read from and written to Hugging Face ``config.json``.

Only what the architecture needs is kept (RMSNorm, default RoPE, grouped-query attention with
q/k/v biases, SwiGLU MLP, tied or untied embeddings). Anything else a config asks for (rope
scaling, sliding windows, a different activation) raises :class:`UnsupportedConfigError` naming
the field, so a checkpoint is never run as a silently different model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Mapping
from typing import Any, Optional, Union

import jax.numpy as jnp

PathLike = Union[str, os.PathLike]

# The projections LoRA adapters can wrap (all of them by default): attention and MLP.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Keys of a HF config that change nothing in the forward pass (bookkeeping, generation and
# training-framework settings). Other unknown keys are reported with a warning.
_IGNORED_HF_KEYS = frozenset({
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
    "use_cache", "pad_token_id", "_name_or_path", "return_dict", "output_hidden_states",
    "output_attentions", "torchscript", "chunk_size_feed_forward", "is_encoder_decoder",
    "is_decoder", "add_cross_attention", "tie_encoder_decoder", "tokenizer_class",
    "problem_type", "id2label", "label2id", "task_specific_params", "finetuning_task",
    "prefix", "sep_token_id", "decoder_start_token_id", "cross_attention_hidden_size",
    "pruned_heads", "use_bfloat16", "max_length", "min_length", "do_sample", "num_beams",
    "temperature", "top_k", "top_p", "repetition_penalty", "num_return_sequences",
    "sliding_window", "max_window_layers",
})


class ConfigFileError(ValueError):
    """A HF config cannot be read: not JSON, or a field of the wrong type. The message names the
    file and the field."""


class UnsupportedConfigError(ConfigFileError):
    """A HF config asks for something this port does not implement; the message names the field."""


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    """Architecture of a Qwen2/Qwen2.5 causal LM plus the dtypes used to hold and run it.

    Frozen and hashable: pass it as a static argument to jitted functions.

    Attributes:
        vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
        num_key_value_heads, head_dim, rms_norm_eps, rope_theta, tie_word_embeddings,
        max_position_embeddings, initializer_range, bos_token_id, eos_token_id: as in HF.
        param_dtype: dtype parameters are stored in (e.g. "float32" master weights).
        compute_dtype: dtype matmuls and activations run in (e.g. "bfloat16" on TPU).
            Norm statistics, softmax and logits are always float32.
        lora_rank: rank ``r`` of the LoRA adapters on ``lora_targets`` (0: no adapters). A
            targeted projection computes ``x @ W + (lora_alpha / r) * (x @ A) @ B``; see
            :mod:`hiper_jax.models.qwen2.lora`. Not part of the HF config.
        lora_alpha: the adapters' scale numerator (scale ``lora_alpha / lora_rank``).
        lora_targets: names of the projections that get adapters (from :data:`LORA_TARGETS`).
        scan_unroll: decoder layers per step of the scan over stacked layers (1: a loop of
            ``num_hidden_layers`` steps; ``>= num_hidden_layers``: the layers unrolled into
            straight-line code). The same numbers either way; unrolling drops the scan's stacked
            activation buffers (~10% off a training step of a 6-layer model on CPU) at the cost
            of compile time that grows with depth. Not part of the HF config.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: Optional[int] = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[Union[int, tuple[int, ...]]] = None
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    scan_unroll: int = 1

    def __post_init__(self) -> None:
        if self.head_dim is None:
            default_head_dim = self.hidden_size // max(self.num_attention_heads, 1)
            object.__setattr__(self, "head_dim", default_head_dim)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        for name in ("param_dtype", "compute_dtype"):
            object.__setattr__(self, name, jnp.dtype(getattr(self, name)).name)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"Qwen2Config.{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"Qwen2Config.num_attention_heads ({self.num_attention_heads}) must be a multiple "
                f"of num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"Qwen2Config.head_dim must be even for RoPE, got {self.head_dim}")
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if int(self.scan_unroll) < 1:
            raise ValueError(f"Qwen2Config.scan_unroll must be >= 1, got {self.scan_unroll}")
        if int(self.lora_rank) < 0:
            raise ValueError(f"Qwen2Config.lora_rank must be >= 0 (0 = off), got {self.lora_rank}")
        if self.lora_rank and self.lora_alpha <= 0:
            raise ValueError(f"Qwen2Config.lora_alpha must be > 0, got {self.lora_alpha}")
        unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if unknown:
            raise ValueError(f"Qwen2Config.lora_targets: unknown projection(s) {unknown}; "
                             f"choose from {LORA_TARGETS}")
        if self.lora_rank and not self.lora_targets:
            raise ValueError("Qwen2Config.lora_targets must name at least one projection when "
                             "lora_rank > 0")

    @property
    def num_groups(self) -> int:
        """Query heads per key/value head (the GQA ratio)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """The EOS ids as a tuple (empty when the config has none)."""
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    @property
    def lora_scale(self) -> float:
        """``lora_alpha / lora_rank``, the factor of the adapters' product (0 without LoRA)."""
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

    def without_lora(self) -> "Qwen2Config":
        """The same architecture without adapters (the base model)."""
        return self if not self.lora_rank else dataclasses.replace(self, lora_rank=0)

    def replace(self, **changes: Any) -> "Qwen2Config":
        """A copy with some fields changed (e.g. ``compute_dtype="bfloat16"``)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_config(cls, source: Union[PathLike, Mapping[str, Any], Any],
                       **overrides: Any) -> "Qwen2Config":
        """Reads a HF Qwen2 config: a ``config.json`` path, a checkpoint directory, a dict, or a
        ``transformers`` config object. Keyword overrides (e.g. ``param_dtype``) win.

        Both rope layouts are accepted: top-level ``rope_theta`` (older checkpoints) and
        ``rope_parameters: {"rope_type": "default", "rope_theta": ...}`` (transformers 5).
        """
        raw, origin = _read_hf_dict(source)
        return cls(**_parse_hf_dict(raw, origin), **overrides)

    def to_hf_config(self) -> dict[str, Any]:
        """A ``config.json`` dict that transformers 4.x and 5.x load as this architecture."""
        hf: dict[str, Any] = {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "rope_scaling": None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "use_sliding_window": False,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
                             else self.eos_token_id),
            "torch_dtype": self.param_dtype,
        }
        if self.head_dim != self.hidden_size // self.num_attention_heads:
            hf["head_dim"] = self.head_dim
        return hf


def _read_hf_dict(source: Any) -> tuple[dict[str, Any], str]:
    if isinstance(source, Mapping):
        return dict(source), "config dict"
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"HF config not found: {path}")
        with open(path, encoding="utf-8") as f:
            try:
                raw = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ConfigFileError(f"{path}: not valid JSON ({error})") from None
        if not isinstance(raw, dict):
            raise ConfigFileError(f"{path}: must hold a JSON object, got {type(raw).__name__}")
        return raw, path
    if hasattr(source, "to_dict"):
        return source.to_dict(), type(source).__name__
    raise TypeError(f"cannot read a Qwen2 config from {type(source).__name__}")


def _parse_hf_dict(raw: Mapping[str, Any], origin: str) -> dict[str, Any]:
    def unsupported(field: str, value: Any, why: str) -> UnsupportedConfigError:
        return UnsupportedConfigError(f"{origin}: unsupported {field}={value!r} ({why})")

    model_type = raw.get("model_type", "qwen2")
    if model_type not in ("qwen2",):
        raise unsupported("model_type", model_type, "only 'qwen2' (Qwen2 / Qwen2.5) is ported")
    if raw.get("hidden_act", "silu") != "silu":
        raise unsupported("hidden_act", raw["hidden_act"], "Qwen2 uses 'silu'")
    if raw.get("use_sliding_window", False):
        raise unsupported("use_sliding_window", raw["use_sliding_window"],
                          "sliding-window attention is not implemented")
    layer_types = raw.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise unsupported("layer_types", layer_types,
                          "only 'full_attention' layers are implemented")
    if raw.get("attention_dropout", 0.0):
        raise unsupported("attention_dropout", raw["attention_dropout"],
                          "dropout is not implemented")
    if raw.get("quantization_config") is not None:
        raise unsupported("quantization_config", raw["quantization_config"],
                          "load the unquantized checkpoint")
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "vocab_size"):
        if field not in raw:
            raise UnsupportedConfigError(f"{origin}: missing required field {field!r}")

    rope_theta = _parse_rope(raw, unsupported, origin)
    known = {
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
        "tie_word_embeddings", "max_position_embeddings", "initializer_range", "bos_token_id",
        "eos_token_id", "hidden_act", "use_sliding_window", "layer_types", "attention_dropout",
        "rope_theta", "rope_parameters", "rope_scaling", "quantization_config",
    }
    unknown = sorted(k for k, v in raw.items() if k not in known and k not in _IGNORED_HF_KEYS
                     and v not in (None, False, {}, []))
    if unknown:
        warnings.warn(f"{origin}: ignoring config fields the Qwen2 architecture does not use: "
                      f"{', '.join(unknown)}", stacklevel=3)

    def number(field: str, kind: type, default: Any = None) -> Any:
        return _number(raw.get(field), field, kind, origin, default)

    def token_ids(field: str) -> Any:
        value = raw.get(field)
        ids = value if isinstance(value, list) else [value]
        if value is not None and not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ConfigFileError(f"{origin}: field {field!r} must be a token id or a list of them, "
                                  f"got {value!r}")
        return value

    tie = raw.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise ConfigFileError(f"{origin}: field 'tie_word_embeddings' must be true or false, got {tie!r}")
    num_heads = number("num_attention_heads", int)
    return dict(
        vocab_size=number("vocab_size", int),
        hidden_size=number("hidden_size", int),
        intermediate_size=number("intermediate_size", int),
        num_hidden_layers=number("num_hidden_layers", int),
        num_attention_heads=num_heads,
        num_key_value_heads=number("num_key_value_heads", int) or num_heads,
        head_dim=number("head_dim", int),
        rms_norm_eps=number("rms_norm_eps", float, 1e-6),
        rope_theta=rope_theta,
        # transformers 5 defaults this to False for Qwen2; older files always spell it out.
        tie_word_embeddings=tie,
        max_position_embeddings=number("max_position_embeddings", int, 32768),
        initializer_range=number("initializer_range", float, 0.02),
        bos_token_id=token_ids("bos_token_id"),
        eos_token_id=token_ids("eos_token_id"),
    )


def _number(value: Any, field: str, kind: type, origin: str, default: Any = None) -> Any:
    """``value`` as ``kind`` (int or float); a string, bool or fraction where a number belongs
    is a broken file, reported with the field, not a value to coerce."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            kind is int and value != int(value)):
        what = "an integer" if kind is int else "a number"
        raise ConfigFileError(f"{origin}: field {field!r} must be {what}, got {value!r}")
    return kind(value)


def _parse_rope(raw: Mapping[str, Any], unsupported, origin: str) -> float:
    scaling = raw.get("rope_scaling")
    if scaling:
        rope_type = scaling.get("rope_type", scaling.get("type"))
        if rope_type != "default":
            raise unsupported("rope_scaling", scaling, "only default RoPE is implemented")
    params = raw.get("rope_parameters")
    if params:
        rope_type = params.get("rope_type", "default")
        if rope_type != "default":
            raise unsupported("rope_parameters.rope_type", rope_type,
                              "only default RoPE is implemented")
        extra = {k: v for k, v in params.items() if k not in ("rope_type", "rope_theta")}
        if extra:
            raise unsupported("rope_parameters", extra,
                              "only rope_type and rope_theta are understood")
        if "rope_theta" in params:
            return _number(params["rope_theta"], "rope_parameters.rope_theta", float, origin)
    return _number(raw.get("rope_theta"), "rope_theta", float, origin, 10000.0)
