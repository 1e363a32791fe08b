"""HiPER's published alfworld setting with Qwen2.5-7B-Instruct (TPU/GPU).

    python -m hiper_jax.train --config configs/alfworld_qwen2_5_7b.py \
        --config.model.checkpoint=/path/to/Qwen2.5-7B-Instruct --config.train.out_dir=gs://bucket/runs/alfworld_qwen2_5_7b

The checkpoint is a local Hugging Face directory (config.json + safetensors).
"""

from hiper_jax.train.config import published_hiper_config


def get_config():
    c = published_hiper_config("alfworld", checkpoint="checkpoints/Qwen2.5-7B-Instruct")
    c.ppo.micro_batch_rows = 8  # 7B: smaller micro-batches (see the README's memory plan)
    c.train.out_dir = "runs/alfworld_qwen2_5_7b"
    return c
