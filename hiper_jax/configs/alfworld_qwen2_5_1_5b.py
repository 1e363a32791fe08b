"""HiPER's published alfworld setting with Qwen2.5-1.5B-Instruct (TPU/GPU).

    python -m hiper_jax.train --config configs/alfworld_qwen2_5_1_5b.py \
        --config.model.checkpoint=/path/to/Qwen2.5-1.5B-Instruct --config.train.out_dir=gs://bucket/runs/alfworld_qwen2_5_1_5b

The checkpoint is a local Hugging Face directory (config.json + safetensors).
"""

from hiper_jax.train.config import published_hiper_config


def get_config():
    c = published_hiper_config("alfworld", checkpoint="checkpoints/Qwen2.5-1.5B-Instruct")
    c.train.out_dir = "runs/alfworld_qwen2_5_1_5b"
    return c
