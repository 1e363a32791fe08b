"""Qwen2.5-VL in JAX: the vision tower and the Qwen2 language model with multimodal rotary
positions; config from HF ``config.json``, HF safetensors load/save.

    from hiper_jax.models import qwen2_5_vl
    config, params = qwen2_5_vl.load_hf_checkpoint(path)
    # pixel_values [N, C*T*P*P], image_grid_thw [num_images, 3] as HF's processor gives them;
    # tokens [B, L] hold one run of image_token_id per image.
    logits = qwen2_5_vl.compute_logits(params, config, tokens, pixel_values, image_grid_thw)
    qwen2_5_vl.save_hf_checkpoint(params, config, out_dir)

    # The pieces (host positions, jitted vision tower, jitted language model):
    positions, deltas = qwen2_5_vl.rope_index(config, tokens, image_grid_thw)    # [3, B, L]
    features = qwen2_5_vl.vision_features(params["visual"], config.vision, pixel_values,
                                          image_grid_thw)                        # [K, E]
    hidden, cache = qwen2_5_vl.forward(params, config, tokens, positions, image_features=features)

Generation (a submodule, imported on its own: it builds on :mod:`hiper_jax.sampling`):
:func:`hiper_jax.models.qwen2_5_vl.sampling.generate`, the jitted KV-cache sampler over prompts
with images (patch counts bucketed so few programs compile).

Scoring (a submodule): :mod:`hiper_jax.models.qwen2_5_vl.scoring` packs sampled turns with
their images into rows and gives the log-probs PPO trains on.

Preprocessing (a submodule): :func:`hiper_jax.models.qwen2_5_vl.processing.image_patches` turns
uint8 images into ``pixel_values`` and ``image_grid_thw`` as HF's image processor does.

Not yet: video inputs (refused with :class:`UnsupportedInputError`), LoRA on this model.
"""

from hiper_jax.models.qwen2_5_vl.checkpoint import load_hf_checkpoint, save_hf_checkpoint
from hiper_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig, VisionConfig
from hiper_jax.models.qwen2_5_vl.model import (
    Qwen2_5_VLForConditionalGeneration,
    UnsupportedInputError,
    as_module,
    compute_logits,
    count_params,
    forward,
    init_params,
    merge_image_features,
    merge_row_features,
    module_params,
    mrope_tables,
    param_shardings,
    param_specs,
    rope_index,
    text_positions,
)
from hiper_jax.models.qwen2_5_vl.vision import (
    PatchLayout,
    VisionTransformer,
    as_grid,
    num_image_tokens,
    patch_layout,
    patch_positions,
    split_features,
    vision_features,
    window_layout,
)

__all__ = [
    "PatchLayout", "Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration",
    "UnsupportedInputError", "VisionConfig", "VisionTransformer", "as_grid", "as_module",
    "compute_logits", "count_params", "forward", "init_params", "load_hf_checkpoint",
    "merge_image_features", "merge_row_features", "module_params", "mrope_tables", "num_image_tokens",
    "param_shardings", "param_specs", "patch_layout", "patch_positions", "rope_index",
    "save_hf_checkpoint", "split_features", "text_positions", "vision_features", "window_layout",
]
