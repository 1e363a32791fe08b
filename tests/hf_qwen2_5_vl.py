"""Tiny random `transformers` Qwen2.5-VL models and inputs: the reference for the JAX port."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch
import transformers

torch.set_num_threads(2)

IMAGE, VIDEO, START, END = 140, 141, 142, 143

# Text: head_dim 8, so mrope_section splits its 4 frequencies 2/1/1 (temporal/height/width).
# Vision: head_dim 8, 2x2-pixel patches, 2x2 merge, windows of 2x2 merged tokens (window_size
# 8 pixels), block 1 of 3 full attention.
TEXT = dict(vocab_size=151, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
            max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 1, 1]})
VISION = dict(depth=3, hidden_size=16, intermediate_size=24, num_heads=2, patch_size=2,
              temporal_patch_size=2, spatial_merge_size=2, window_size=8, out_hidden_size=32,
              fullatt_block_indexes=[1], in_channels=3)


def make_hf_model(seed: int = 0, tie_word_embeddings: bool = False, text: Optional[dict] = None,
                  vision: Optional[dict] = None) -> transformers.Qwen2_5_VLForConditionalGeneration:
    """A random fp32 Qwen2_5_VLForConditionalGeneration (eager attention) whose every weight,
    bias and norm scale is non-trivial (default init would leave biases 0 and norms 1)."""
    config = transformers.Qwen2_5_VLConfig(
        text_config=dict(TEXT, **(text or {})), vision_config=dict(VISION, **(vision or {})),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START,
        vision_end_token_id=END, tie_word_embeddings=tie_word_embeddings)
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "ln_q.weight")):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.normal_(0.0, 0.5)
            else:
                param.normal_(0.0, 0.15)
    return model


def save_hf_model(model, path: os.PathLike, max_shard_size: Optional[str] = None) -> str:
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return os.fspath(path)


def loaded_reference(directory: os.PathLike, seed: int = 0):
    """(HF model, our config, our params): a random HF model saved into ``directory`` with
    ``save_pretrained`` and read back by our ``load_hf_checkpoint``."""
    from hiper_jax.models import qwen2_5_vl

    model = make_hf_model(seed=seed)
    config, params = qwen2_5_vl.load_hf_checkpoint(save_hf_model(model, directory), progress=False)
    return model, config, params


def pixel_values(grid: Sequence[Sequence[int]], seed: int = 0, patch_dim: int = 24) -> np.ndarray:
    """Random ``[N, C*T*P*P]`` float32 patches for the images of ``grid``."""
    count = sum(t * h * w for t, h, w in grid)
    return np.random.default_rng(seed).normal(size=(count, patch_dim)).astype(np.float32)


def sequence(pieces: Sequence, grid: Sequence[Sequence[int]], merge: int = 2,
             seed: int = 0) -> list[int]:
    """Token ids: each int in ``pieces`` is that many random text tokens, each ``"image"`` the
    next image of ``grid`` as <vision_start>, its placeholders, <vision_end>."""
    rng = np.random.default_rng(seed)
    images = iter(grid)
    out: list[int] = []
    for piece in pieces:
        if piece == "image":
            t, h, w = next(images)
            out += [START] + [IMAGE] * (t * h * w // merge ** 2) + [END]
        else:
            out += rng.integers(3, 139, piece).tolist()
    return out


def hf_logits(model, tokens: np.ndarray, pixels: Optional[np.ndarray] = None,
              grid: Optional[Sequence] = None,
              attention_mask: Optional[np.ndarray] = None) -> np.ndarray:
    """Logits ``[B, L, V]`` float32 of the reference model (3-D positions from its own
    ``get_rope_index``, given the token types it needs)."""
    tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    kwargs = {}
    if pixels is not None:
        kwargs = dict(pixel_values=torch.as_tensor(pixels),
                      image_grid_thw=torch.as_tensor(np.asarray(grid), dtype=torch.long),
                      mm_token_type_ids=(tokens == IMAGE).int())
    if attention_mask is not None:
        kwargs["attention_mask"] = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=tokens, use_cache=False, **kwargs)
    return out.logits.float().numpy()


def hf_rope_index(model, tokens: np.ndarray, grid: Sequence,
                  attention_mask: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    positions, deltas = model.model.get_rope_index(
        tokens, mm_token_type_ids=(tokens == IMAGE).int(),
        image_grid_thw=torch.as_tensor(np.asarray(grid), dtype=torch.long),
        attention_mask=None if attention_mask is None else torch.as_tensor(
            np.asarray(attention_mask), dtype=torch.long))
    return positions.numpy(), deltas.numpy().reshape(-1)


def hf_vision(model, pixels: np.ndarray, grid: Sequence) -> np.ndarray:
    """The reference vision tower's merged features ``[K, out_hidden_size]``."""
    with torch.no_grad():
        out = model.model.visual(torch.as_tensor(pixels),
                                 grid_thw=torch.as_tensor(np.asarray(grid), dtype=torch.long))
    return out.pooler_output.float().numpy()
