"""Qwen2 / Qwen2.5 causal LM in JAX: config, Flax NNX modules with pure entry points over their
parameter tree, HF checkpoint load/save.

    from hiper_jax.models import qwen2
    config, params = qwen2.load_hf_checkpoint(path, dtype=jnp.float32)
    logits = qwen2.compute_logits(params, config, tokens)     # [B, L] -> [B, L, V]
    qwen2.save_hf_checkpoint(params, config, out_dir)

    model = qwen2.as_module(params, config)                   # the Flax NNX module over them
    hidden, _ = model(tokens); logits = model.logits(hidden)

    config = config.replace(lora_rank=8)                       # LoRA (see qwen2.lora)
    adapters = qwen2.lora.init_adapters(key, config)
    logits = qwen2.compute_logits(qwen2.lora.combine(adapters, params), config, tokens)
    qwen2.save_peft_adapter(qwen2.lora.combine(adapters, params), config, out_dir)  # peft dir
"""

from hiper_jax.models.qwen2.checkpoint import (
    CheckpointError,
    load_hf_checkpoint,
    save_hf_checkpoint,
    save_peft_adapter,
)
from hiper_jax.models.qwen2 import lora
from hiper_jax.models.qwen2.config import (LORA_TARGETS, ConfigFileError, Qwen2Config,
                                           UnsupportedConfigError)
from hiper_jax.models.qwen2.model import (
    CACHE_AXES,
    AllowedTokens,
    Dense,
    KVCache,
    ParamSpec,
    Params,
    Qwen2ForCausalLM,
    Qwen2Model,
    TokenStats,
    as_module,
    compute_logits,
    count_params,
    forward,
    has_adapters,
    init_cache,
    init_params,
    lm_head,
    module_params,
    param_axes,
    param_shapes,
    param_shardings,
    param_specs,
    positions_from_segments,
    stack_layers,
    token_logprobs,
    tree_config,
    unstack_layers,
)

__all__ = [
    "AllowedTokens", "CACHE_AXES", "CheckpointError", "ConfigFileError", "Dense", "KVCache",
    "ParamSpec", "Params", "Qwen2Config", "Qwen2ForCausalLM", "Qwen2Model", "as_module",
    "module_params",
    "TokenStats", "UnsupportedConfigError", "compute_logits", "count_params", "forward",
    "init_cache", "init_params", "lm_head", "load_hf_checkpoint", "param_axes", "param_shapes",
    "param_shardings", "param_specs", "positions_from_segments", "save_hf_checkpoint", "save_peft_adapter",
    "stack_layers", "token_logprobs", "unstack_layers",
    "LORA_TARGETS", "has_adapters", "lora", "tree_config",
]
