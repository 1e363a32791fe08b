"""Qwen2 / Qwen2.5 causal LM in JAX: config, functional model, HF checkpoint load/save.

    from hiper_jax.models import qwen2
    config, params = qwen2.load_hf_checkpoint(path, dtype=jnp.float32)
    logits = qwen2.compute_logits(params, config, tokens)     # [B, L] -> [B, L, V]
    qwen2.save_hf_checkpoint(params, config, out_dir)
"""

from hiper_jax.models.qwen2.checkpoint import (
    CheckpointError,
    load_hf_checkpoint,
    save_hf_checkpoint,
)
from hiper_jax.models.qwen2.config import ConfigFileError, Qwen2Config, UnsupportedConfigError
from hiper_jax.models.qwen2.model import (
    CACHE_AXES,
    AllowedTokens,
    KVCache,
    ParamSpec,
    Params,
    TokenStats,
    compute_logits,
    count_params,
    forward,
    init_cache,
    init_params,
    lm_head,
    param_axes,
    param_shapes,
    param_shardings,
    param_specs,
    positions_from_segments,
    stack_layers,
    token_logprobs,
    unstack_layers,
)

__all__ = [
    "AllowedTokens", "CACHE_AXES", "CheckpointError", "ConfigFileError", "KVCache", "ParamSpec", "Params",
    "Qwen2Config",
    "TokenStats", "UnsupportedConfigError", "compute_logits", "count_params", "forward",
    "init_cache", "init_params", "lm_head", "load_hf_checkpoint", "param_axes", "param_shapes",
    "param_shardings", "param_specs", "positions_from_segments", "save_hf_checkpoint",
    "stack_layers", "token_logprobs", "unstack_layers",
]
