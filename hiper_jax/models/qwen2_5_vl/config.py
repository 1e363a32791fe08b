"""Qwen2.5-VL configuration: the vision tower's and the language model's, read from and written to
a Hugging Face ``config.json``.

The language model is a Qwen2 decoder (:class:`~hiper_jax.models.qwen2.Qwen2Config`) whose rotary
positions are multimodal (M-RoPE: ``mrope_section`` splits each head's frequencies between the
temporal, height and width position ids). Both layouts of the file are read: the nested one that
transformers 5 writes (``text_config``, ``vision_config``, ``rope_parameters.mrope_section``) and
the flat one of the published checkpoints (text fields at the top level, ``rope_scaling: {"type":
"mrope", "mrope_section": ...}``, ``in_chans``). Anything this port does not implement raises
:class:`~hiper_jax.models.qwen2.UnsupportedConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, Union

import jax.numpy as jnp

from hiper_jax.models.qwen2.config import (_IGNORED_HF_KEYS, ConfigFileError, Qwen2Config,
                                           UnsupportedConfigError, _number, _read_hf_dict)

PathLike = Union[str, os.PathLike]

# Qwen2.5-VL's own token ids (the Qwen2.5 tokenizer's <|image_pad|>, <|video_pad|>,
# <|vision_start|>, <|vision_end|>): the HF defaults when a config omits them.
IMAGE_TOKEN_ID, VIDEO_TOKEN_ID = 151655, 151656
VISION_START_TOKEN_ID, VISION_END_TOKEN_ID = 151652, 151653

# Keys of the text part that are not Qwen2 fields and change nothing in a forward pass (or are
# checked here); they are not handed to the Qwen2 parser, which would warn about them.
_TEXT_KEYS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings",
    "initializer_range", "rms_norm_eps", "use_sliding_window", "sliding_window",
    "max_window_layers", "layer_types", "attention_dropout", "rope_parameters", "rope_scaling",
    "rope_theta", "bos_token_id", "eos_token_id", "quantization_config",
})
_VISION_KEYS = frozenset({
    "depth", "hidden_size", "hidden_act", "intermediate_size", "num_heads", "in_channels",
    "in_chans", "patch_size", "spatial_patch_size", "spatial_merge_size", "temporal_patch_size",
    "tokens_per_second", "window_size", "out_hidden_size", "fullatt_block_indexes",
    "initializer_range", "rope_parameters", "model_type", "dtype", "torch_dtype",
    "transformers_version", "architectures", "_name_or_path", "num_hidden_layers",
    "num_attention_heads",
})


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The vision tower (a ViT with 2-D rotary positions, windowed and full attention blocks and
    a patch merger). Frozen and hashable (a static jit argument).

    Attributes:
        depth, hidden_size, intermediate_size, num_heads, in_channels, patch_size,
        temporal_patch_size, spatial_merge_size, window_size, out_hidden_size,
        fullatt_block_indexes, tokens_per_second, initializer_range: as in HF.
        rope_theta: base of the 2-D rotary frequencies (HF ``rope_parameters.rope_theta``).
        param_dtype, compute_dtype: as in :class:`~hiper_jax.models.qwen2.Qwen2Config`.
    """

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    tokens_per_second: int = 4
    rope_theta: float = 10000.0
    initializer_range: float = 0.02
    param_dtype: str = "float32"
    compute_dtype: str = "float32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "fullatt_block_indexes", tuple(self.fullatt_block_indexes))
        for name in ("param_dtype", "compute_dtype"):
            object.__setattr__(self, name, jnp.dtype(getattr(self, name)).name)
        for name in ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size",
                     "in_channels", "patch_size", "temporal_patch_size", "spatial_merge_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"VisionConfig.{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"VisionConfig.hidden_size ({self.hidden_size}) must be a multiple of "
                             f"num_heads ({self.num_heads})")
        if self.head_dim % 4:
            raise ValueError(f"VisionConfig head_dim ({self.head_dim}) must be a multiple of 4 "
                             "(2-D rotary positions split it between height and width)")
        if self.merger_window < 1:
            raise ValueError(f"VisionConfig.window_size ({self.window_size}) must be at least "
                             f"patch_size * spatial_merge_size "
                             f"({self.patch_size * self.spatial_merge_size})")
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"VisionConfig.fullatt_block_indexes {bad} outside 0..{self.depth - 1}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Width of one flattened patch of ``pixel_values``: ``C * T * P * P``."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merge_unit(self) -> int:
        """Patches merged into one language-model token: ``spatial_merge_size ** 2``."""
        return self.spatial_merge_size ** 2

    @property
    def merger_window(self) -> int:
        """Side of an attention window in merged tokens: ``window_size // merge // patch``."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    # The shared Qwen2 modules (Dense, RMSNorm) read these two.
    @property
    def rms_norm_eps(self) -> float:
        return 1e-6  # fixed in every RMSNorm of HF's vision tower

    def to_hf_config(self) -> dict[str, Any]:
        return {
            "model_type": "qwen2_5_vl_vision", "depth": self.depth,
            "hidden_size": self.hidden_size, "hidden_act": "silu",
            "intermediate_size": self.intermediate_size, "num_heads": self.num_heads,
            "in_channels": self.in_channels, "patch_size": self.patch_size,
            "spatial_merge_size": self.spatial_merge_size,
            "temporal_patch_size": self.temporal_patch_size,
            "tokens_per_second": self.tokens_per_second, "window_size": self.window_size,
            "out_hidden_size": self.out_hidden_size,
            "fullatt_block_indexes": list(self.fullatt_block_indexes),
            "initializer_range": self.initializer_range,
            "rope_parameters": {"rope_type": "axial", "rope_theta": self.rope_theta},
        }


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLConfig:
    """Qwen2.5-VL: a vision tower, a Qwen2 language model with M-RoPE, and the token ids that
    place images in a sequence. Frozen and hashable.

    Attributes:
        text: the language model (``tie_word_embeddings`` lives here).
        vision: the vision tower; its ``out_hidden_size`` is ``text.hidden_size``.
        mrope_section: how many rotary frequencies of each head (``head_dim / 2`` in all) follow
            the temporal, height and width position ids, in that order.
        image_token_id: the placeholder token that image features replace, one per merged patch.
        video_token_id, vision_start_token_id, vision_end_token_id: as in HF (videos are not
            supported yet: :func:`~hiper_jax.models.qwen2_5_vl.rope_index` refuses video tokens).
    """

    text: Qwen2Config
    vision: VisionConfig
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    image_token_id: int = IMAGE_TOKEN_ID
    video_token_id: int = VIDEO_TOKEN_ID
    vision_start_token_id: int = VISION_START_TOKEN_ID
    vision_end_token_id: int = VISION_END_TOKEN_ID

    def __post_init__(self) -> None:
        object.__setattr__(self, "mrope_section", tuple(int(s) for s in self.mrope_section))
        if len(self.mrope_section) != 3 or sum(self.mrope_section) != self.text.head_dim // 2:
            raise ValueError(f"Qwen2_5_VLConfig.mrope_section {list(self.mrope_section)} must be 3 "
                             f"sizes summing to head_dim / 2 = {self.text.head_dim // 2}")
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ValueError(f"vision.out_hidden_size ({self.vision.out_hidden_size}) must equal "
                             f"text.hidden_size ({self.text.hidden_size})")
        if self.text.lora_rank:
            raise ValueError("LoRA adapters are not wired into the Qwen2.5-VL port yet")

    def replace(self, **changes: Any) -> "Qwen2_5_VLConfig":
        return dataclasses.replace(self, **changes)

    def with_dtypes(self, param_dtype: Any = None, compute_dtype: Any = None) -> "Qwen2_5_VLConfig":
        """The same model holding parameters in ``param_dtype`` and computing in
        ``compute_dtype`` (both parts)."""
        changes = {k: jnp.dtype(v).name for k, v in (("param_dtype", param_dtype),
                                                      ("compute_dtype", compute_dtype)) if v}
        return self.replace(text=self.text.replace(**changes),
                            vision=dataclasses.replace(self.vision, **changes))

    @classmethod
    def from_hf_config(cls, source: Union[PathLike, Mapping[str, Any], Any],
                       **dtypes: Any) -> "Qwen2_5_VLConfig":
        """Reads a HF Qwen2.5-VL config: a ``config.json`` path, a checkpoint directory, a dict
        or a ``transformers`` config object (nested or flat layout). ``param_dtype`` /
        ``compute_dtype`` keywords set both parts' dtypes."""
        raw, origin = _read_hf_dict(source)
        return _parse(raw, origin).with_dtypes(**dtypes)

    def to_hf_config(self) -> dict[str, Any]:
        """A ``config.json`` dict (nested layout) that transformers loads as
        ``Qwen2_5_VLForConditionalGeneration``."""
        text = self.text.to_hf_config()
        for key in ("architectures", "torch_dtype", "rope_theta", "rope_scaling",
                    "tie_word_embeddings"):
            text.pop(key, None)
        text.update(model_type="qwen2_5_vl_text",
                    rope_parameters={"rope_type": "default", "rope_theta": self.text.rope_theta,
                                     "mrope_section": list(self.mrope_section)})
        return {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            "text_config": text,
            "vision_config": self.vision.to_hf_config(),
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.text.tie_word_embeddings,
            "torch_dtype": self.text.param_dtype,
        }


def _unsupported(origin: str, field: str, value: Any, why: str) -> UnsupportedConfigError:
    return UnsupportedConfigError(f"{origin}: unsupported {field}={value!r} ({why})")


def _parse(raw: Mapping[str, Any], origin: str) -> Qwen2_5_VLConfig:
    model_type = raw.get("model_type", "qwen2_5_vl")
    if model_type != "qwen2_5_vl":
        raise _unsupported(origin, "model_type", model_type, "only 'qwen2_5_vl' is ported here")
    text_raw = dict(raw["text_config"]) if isinstance(raw.get("text_config"), Mapping) else {
        k: v for k, v in raw.items() if k in _TEXT_KEYS}
    text_config, mrope_section = _parse_text(text_raw, raw, origin)
    vision_raw = raw.get("vision_config")
    if not isinstance(vision_raw, Mapping):
        raise ConfigFileError(f"{origin}: missing 'vision_config' object")

    def token(field: str, default: int) -> int:
        return _number(raw.get(field), field, int, origin, default)

    return Qwen2_5_VLConfig(
        text=text_config, vision=_parse_vision(dict(vision_raw), origin + " vision_config"),
        mrope_section=mrope_section,
        image_token_id=token("image_token_id", IMAGE_TOKEN_ID),
        video_token_id=token("video_token_id", VIDEO_TOKEN_ID),
        vision_start_token_id=token("vision_start_token_id", VISION_START_TOKEN_ID),
        vision_end_token_id=token("vision_end_token_id", VISION_END_TOKEN_ID))


def _parse_text(text: dict[str, Any], top: Mapping[str, Any],
                origin: str) -> tuple[Qwen2Config, tuple[int, ...]]:
    """The language model's :class:`Qwen2Config` and ``mrope_section``, through the Qwen2
    parser once the multimodal rope settings are taken out."""
    rope = text.pop("rope_parameters", None) or text.pop("rope_scaling", None) or {}
    text.pop("rope_scaling", None)
    rope = dict(rope)
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise _unsupported(origin, "rope_parameters.rope_type", rope_type,
                           "only (multimodal) default RoPE is implemented")
    mrope_section = rope.pop("mrope_section", None)
    if mrope_section is None:
        raise ConfigFileError(f"{origin}: no mrope_section in rope_parameters / rope_scaling")
    theta = rope.pop("rope_theta", text.pop("rope_theta", 1_000_000.0))
    if rope:
        raise _unsupported(origin, "rope_parameters", rope,
                           "only rope_type, rope_theta and mrope_section are understood")
    head_dim = text.get("head_dim")
    if head_dim is not None and head_dim != text["hidden_size"] // text["num_attention_heads"]:
        raise _unsupported(origin, "head_dim", head_dim,
                           "Qwen2.5-VL's attention uses hidden_size // num_attention_heads")
    if text.get("model_type", "qwen2_5_vl_text") not in ("qwen2_5_vl_text", "qwen2_5_vl"):
        raise _unsupported(origin, "text_config.model_type", text["model_type"],
                           "expected 'qwen2_5_vl_text'")
    # The tied head is a top-level field in transformers 5, a text field before it.
    tie = bool(top.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False))
    qwen2 = {k: v for k, v in text.items() if k in _TEXT_KEYS - {"sliding_window",
                                                                  "max_window_layers"}}
    qwen2.update(model_type="qwen2", rope_theta=theta, tie_word_embeddings=tie,
                 rms_norm_eps=text.get("rms_norm_eps", 1e-5))
    unknown = sorted(k for k, v in text.items() if k not in _TEXT_KEYS | _IGNORED_HF_KEYS
                     and k not in ("tie_word_embeddings", "vision_start_token_id",
                                   "vision_end_token_id", "vision_token_id", "image_token_id",
                                   "video_token_id")
                     and v not in (None, False, {}, []))
    if unknown:
        raise _unsupported(origin, "text_config fields", unknown, "not part of this port")
    return Qwen2Config.from_hf_config(qwen2), tuple(mrope_section)


def _parse_vision(raw: dict[str, Any], origin: str) -> VisionConfig:
    unknown = sorted(k for k, v in raw.items() if k not in _VISION_KEYS | _IGNORED_HF_KEYS
                     and v not in (None, False, {}, []))
    if unknown:
        raise _unsupported(origin, "fields", unknown, "not part of this port")
    if raw.get("hidden_act", "silu") != "silu":
        raise _unsupported(origin, "hidden_act", raw["hidden_act"], "the vision MLP uses 'silu'")
    for field in ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size"):
        if field not in raw:
            raise ConfigFileError(f"{origin}: missing required field {field!r}")
    rope = dict(raw.get("rope_parameters") or {})
    if rope.pop("rope_type", "axial") != "axial" or set(rope) - {"rope_theta"}:
        raise _unsupported(origin, "rope_parameters", raw["rope_parameters"],
                           "the vision tower's rotary positions are 'axial' with rope_theta only")
    patch = raw.get("patch_size", 14)
    if raw.get("spatial_patch_size", patch) != patch:
        raise _unsupported(origin, "spatial_patch_size", raw["spatial_patch_size"],
                           f"must equal patch_size ({patch})")

    def number(field: str, kind: type = int, default: Any = None) -> Any:
        return _number(raw.get(field), field, kind, origin, default)

    indexes = raw.get("fullatt_block_indexes", (7, 15, 23, 31))
    if not isinstance(indexes, (list, tuple)) or not all(isinstance(i, int) for i in indexes):
        raise ConfigFileError(f"{origin}: field 'fullatt_block_indexes' must be a list of block "
                              f"indexes, got {indexes!r}")
    in_channels = raw.get("in_channels", raw.get("in_chans", 3))
    return VisionConfig(
        depth=number("depth"), hidden_size=number("hidden_size"),
        intermediate_size=number("intermediate_size"), num_heads=number("num_heads"),
        out_hidden_size=number("out_hidden_size"),
        in_channels=_number(in_channels, "in_channels", int, origin),
        patch_size=_number(patch, "patch_size", int, origin),
        temporal_patch_size=number("temporal_patch_size", int, 2),
        spatial_merge_size=number("spatial_merge_size", int, 2),
        window_size=number("window_size", int, 112), fullatt_block_indexes=tuple(indexes),
        tokens_per_second=number("tokens_per_second", int, 4),
        rope_theta=_number(rope.get("rope_theta"), "rope_parameters.rope_theta", float, origin,
                           10000.0),
        initializer_range=number("initializer_range", float, 0.02))
