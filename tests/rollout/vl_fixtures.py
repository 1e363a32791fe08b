"""A tiny random Qwen2.5-VL, a tokenizer that knows its vision tokens, and small MedVista data,
shared by the vision-language rollout tests."""

from __future__ import annotations

import jax

from hiper_jax.agent.prompts import PromptConfig
from hiper_jax.models.qwen2 import Qwen2Config
from hiper_jax.models.qwen2_5_vl import Qwen2_5_VLConfig, VisionConfig, init_params
from hiper_jax.rollout.adapters import EnvSpec, get_adapter

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
IMAGE_SIZE = 16  # 8x8 patches of 2x2 pixels: 16 placeholders per image
CORPUS = [
    "<switch>SWITCH</switch><subgoal>look closer</subgoal><action>zoom[0, 0, 500, 500]</action>",
    "<switch>KEEP</switch><subgoal>answer</subgoal><action>answer[yes]</action>",
    "Question: Is there a lesion in this image? Image 1 is the full image. Tool calls left: 4.",
    "Admissible actions: zoom[333, 0, 667, 333], contrast[high], answer[no], answer[upper left].",
]


def tokenizer():
    from hiper_jax.tokenization import train_byte_level_bpe

    tok = train_byte_level_bpe(CORPUS * 20, vocab_size=400)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", *VISION_TOKENS]})
    return tok


def config(tok) -> Qwen2_5_VLConfig:
    """A 2-layer Qwen2.5-VL over ``tok``'s vocabulary (a 2-block tower, 2x2-pixel patches)."""
    start, end, image, video = (tok.convert_tokens_to_ids(t) for t in VISION_TOKENS)
    text = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                       tie_word_embeddings=False, initializer_range=0.2)
    vision = VisionConfig(depth=2, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=32,
                          patch_size=2, temporal_patch_size=2, spatial_merge_size=2, window_size=8,
                          fullatt_block_indexes=(1,), initializer_range=0.2)
    return Qwen2_5_VLConfig(text, vision, mrope_section=(2, 1, 1), image_token_id=image,
                            video_token_id=video, vision_start_token_id=start,
                            vision_end_token_id=end)


def model(tok, seed: int = 0):
    """(config, params) of a random :func:`config` model."""
    vl_config = config(tok)
    return vl_config, init_params(jax.random.key(seed), vl_config)


def medvista(data_dir: str, info_images: str = "new", max_turns: int = 3):
    """(EnvSpec, PromptConfig) of MedVista on ``data_dir`` at the tiny image size."""
    adapter = get_adapter("medvista")
    spec = EnvSpec(adapter.env_id, {"data_dir": data_dir, "image_size": IMAGE_SIZE,
                                    "info_images": info_images}, adapter.task_option,
                   max_steps_key=adapter.max_steps_key)
    prompt_cfg = PromptConfig(env="medvista", intro=adapter.intro, max_steps=max_turns,
                              max_prompt_tokens=2048, history_turns=1)
    return spec, prompt_cfg
