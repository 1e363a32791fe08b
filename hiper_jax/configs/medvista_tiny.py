"""MedVista on a 2-core CPU with the tiny embedded vision-language model (a Qwen2.5-VL with a
2-block vision tower and a 2-layer decoder, warm-started on the oracle's demonstrations of the
generated data this config plays; built by ``python -m hiper_jax.experiments.medvista_vlm
--work-dir build/tiny_medvista --iterations 0 --save-dir hiper_jax/assets/tiny_medvista``).

    python -m hiper_jax.train --config configs/medvista_tiny.py [--config.train.iterations=4]

Plan-Execute responses under the grammar (subgoal = what to inspect next, then one tool call
or the answer), HAE, the vision tower frozen (``model.train_vision=False``), the critic value
heads on the policy's hidden states. Each view is 32x32 pixels; every image of the episode so
far is in the prompt. Held-out evaluation is greedy. Measured results: benchmarks/RESULTS.md,
"MedVista with a tiny Qwen2.5-VL".
"""

from hiper_jax.assets import TINY_MEDVISTA
from hiper_jax.train.config import base_config


def get_config():
    c = base_config()
    c.env.name = "medvista"
    c.env.num_envs = 16
    c.env.max_turns = 5               # 4 tool calls, then the answer
    c.env.envs_per_worker = 8
    # The generated data the warm start was trained on (40 source images, seed 0).
    c.env.env_kwargs = {"synth_images": 40, "synth_seed": 0, "image_size": 32, "tool_budget": 4,
                        "info_images": "all"}
    c.model.checkpoint = TINY_MEDVISTA
    c.model.critic = "shared"
    c.model.patch_multiple = 256
    c.prompt.history_turns = 1
    c.prompt.max_prompt_tokens = 4096
    c.sampling.constraint = "grammar"
    c.sampling.max_text_tokens = 8
    c.sampling.max_new_tokens = 48
    c.sampling.eval_temperature = 0.0  # greedy
    c.ppo.actor_lr = 3e-4
    c.ppo.critic_lr = 1e-3
    c.ppo.entropy_coef = 0.0
    c.ppo.mini_batch_rows = 16
    c.ppo.micro_batch_rows = 8
    c.ppo.length_multiple = 128
    c.train.iterations = 4
    c.train.eval_every = 4
    c.train.eval_episodes = 32
    c.train.checkpoint_every = 4
    c.train.out_dir = "runs/medvista_tiny"
    return c
