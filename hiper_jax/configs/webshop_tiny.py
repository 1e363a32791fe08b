"""WebShop on a 2-core CPU with the tiny embedded model (its tokenizer covers WebShop text; the
shipped warm start was trained on ALFWorld demonstrations, so warm-start it on WebShop oracle
demonstrations first for meaningful success rates).

    python -m hiper_envs.webshop.demos --out runs/webshop_demos.jsonl --split train --num-products 1000
    python -m hiper_jax.train.sft --checkpoint hiper_jax/assets/tiny_alfworld \
        --demos runs/webshop_demos.jsonl --env webshop --max-steps 15 --out runs/webshop_sft
    python -m hiper_jax.train --config configs/webshop_tiny.py --config.model.checkpoint=runs/webshop_sft
"""

from hiper_jax.assets import TINY_ALFWORLD
from hiper_jax.train.config import base_config


def get_config():
    c = base_config()
    c.env.name = "webshop"
    c.env.num_envs = 16
    c.env.max_turns = 15
    c.env.env_kwargs = {"num_products": 1000}
    c.env.envs_per_worker = 8
    c.model.checkpoint = TINY_ALFWORLD
    c.prompt.history_turns = 1
    c.prompt.max_prompt_tokens = 768
    c.sampling.max_new_tokens = 64
    c.sampling.prompt_length_multiple = 128
    c.advantage.keep_penalty = -3.5
    c.advantage.bootstrap_truncated = False
    c.advantage.gamma = 0.95
    c.advantage.lam_turn = 0.95
    c.ppo.actor_lr = 2e-5
    c.ppo.critic_lr = 1e-3
    c.ppo.mini_batch_rows = 32
    c.ppo.micro_batch_rows = 16
    c.ppo.length_multiple = 128
    c.train.iterations = 6
    c.train.eval_every = 6
    c.train.eval_episodes = 32
    c.train.out_dir = "runs/webshop_tiny"
    return c
