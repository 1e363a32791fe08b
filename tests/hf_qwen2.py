"""Tiny random `transformers` Qwen2 models: the independent reference for the JAX port."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch
import transformers

torch.set_num_threads(2)

# name -> HF config kwargs. GQA ratios 1, 2 and 7; tied and untied; rope_theta 1e4 and 1e6;
# vocab sizes that are odd or prime.
TINY_CONFIGS = {
    "gqa1-tied-theta1e4": dict(vocab_size=97, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                               rope_theta=1e4, tie_word_embeddings=True),
    "gqa2-untied-theta1e6": dict(vocab_size=131, hidden_size=48, intermediate_size=80,
                                 num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=3,
                                 rope_theta=1e6, tie_word_embeddings=False),
    "gqa7-untied-theta1e4": dict(vocab_size=101, hidden_size=56, intermediate_size=72,
                                 num_hidden_layers=2, num_attention_heads=7, num_key_value_heads=1,
                                 rope_theta=1e4, tie_word_embeddings=False),
}


def make_hf_model(name: str, seed: int = 0, **overrides) -> transformers.Qwen2ForCausalLM:
    """A random fp32 Qwen2ForCausalLM whose every weight, bias and norm scale is non-trivial
    (default init leaves biases at 0 and norms at 1, which would hide mapping bugs)."""
    kwargs = dict(TINY_CONFIGS[name], rms_norm_eps=1e-6, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2)
    kwargs.update(overrides)
    config = transformers.Qwen2Config(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif param_name.endswith("bias"):
                param.normal_(0.0, 0.5)
            else:
                param.normal_(0.0, 0.15)
    return model


def save_hf_model(model: transformers.Qwen2ForCausalLM, path: os.PathLike,
                  max_shard_size: Optional[str] = None) -> str:
    """``save_pretrained`` to ``path`` (safetensors; sharded when ``max_shard_size`` is given)."""
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return os.fspath(path)


def hf_logits(model: transformers.Qwen2ForCausalLM, tokens: np.ndarray,
              attention_mask: Optional[np.ndarray] = None,
              position_ids: Optional[np.ndarray] = None) -> np.ndarray:
    """Logits ``[B, L, V]`` float32 of the reference model."""
    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(np.asarray(tokens), dtype=torch.long),
            attention_mask=None if attention_mask is None else torch.as_tensor(
                np.asarray(attention_mask), dtype=torch.long),
            position_ids=None if position_ids is None else torch.as_tensor(
                np.asarray(position_ids), dtype=torch.long),
            use_cache=False)
    return out.logits.float().numpy()
