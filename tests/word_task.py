"""The ChooseWord sanity task shared by the trainer and study tests: demonstrations, a tiny
warm-started checkpoint and a training config that learns in a few iterations."""

import numpy as np

from hiper_jax.agent.prompts import PromptConfig
from hiper_jax.experiments.tiny import training_texts, tiny_model_config
from hiper_jax.tokenization import train_byte_level_bpe
from hiper_jax.train.config import base_config


def word_demos(num_episodes=64, seed=0):
    """Undecided demonstrations: each turn says alpha or beta at random (the episode ends when
    alpha is said), so the warm-started policy is near 50/50."""
    rng = np.random.default_rng(seed)
    demos = []
    for _ in range(num_episodes):
        turns, observation = [], "You stand before a door that opens to the magic word."
        for step in range(3):
            word = rng.choice(["alpha", "beta"])
            turns.append({"observation": observation, "admissible_actions": ["say alpha", "say beta"],
                          "switch": "SWITCH" if step == 0 else "KEEP", "subgoal": "open the door",
                          "action": f"say {word}", "reward": 10.0 if word == "alpha" else 0.0,
                          "done": word == "alpha"})
            observation = "Nothing happens."
            if word == "alpha":
                break
        demos.append({"env": "choose_word", "task": "say the magic word", "task_type": "choose_word",
                      "won": turns[-1]["done"], "num_turns": len(turns), "turns": turns})
    return demos


def build_word_checkpoint(out: str) -> str:
    """A tiny model warm-started on undecided ChooseWord demonstrations (HF checkpoint dir)."""
    import dataclasses

    import jax

    from transformers import AutoTokenizer

    from hiper_jax.agent.demos import demo_turns
    from hiper_jax.models import qwen2
    from hiper_jax.train.sft import SFTConfig, make_examples, train_sft

    demos = word_demos()
    prompt_cfg = PromptConfig(env="choose_word", max_steps=3, max_prompt_tokens=512)
    tokenizer = train_byte_level_bpe(training_texts(demos, [prompt_cfg]) * 4, vocab_size=400)
    tokenizer.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    config = dataclasses.replace(tiny_model_config(len(tokenizer), hidden_size=64, num_layers=2,
                                                   intermediate_size=128), eos_token_id=tokenizer.eos_token_id)
    params = qwen2.init_params(jax.random.key(0), config)
    examples = make_examples(list(demo_turns(demos, prompt_cfg, only_won=False)), tokenizer, prompt_cfg)
    params, history = train_sft(params, config, examples, tokenizer.pad_token_id,
                                SFTConfig(epochs=20, lr=1e-2, batch_rows=16, length_multiple=256),
                                progress=False)
    if history[-1]["nll"] >= 0.1:
        raise AssertionError(f"warm start did not fit the demonstrations: nll {history[-1]['nll']:.3f}")
    qwen2.save_hf_checkpoint(params, config, out)
    return out


def word_config(checkpoint, out_dir, estimator="hae", iterations=4):
    c = base_config()
    c.env.name = "choose_word"
    c.env.num_envs = 32
    c.env.max_turns = 3
    c.env.envs_per_worker = 8
    c.env.env_kwargs = {"num_tasks": 32}
    c.model.checkpoint = checkpoint
    c.prompt.max_prompt_tokens = 512
    c.sampling.max_new_tokens = 32
    c.sampling.prompt_length_multiple = 256
    c.sampling.eval_temperature = 1.0
    c.advantage.estimator = estimator
    c.advantage.rollouts_per_task = 4 if estimator in ("grpo", "rloo", "gigpo") else 1
    c.advantage.gamma = 0.95
    c.advantage.lam_turn = 0.95
    # A format error costs as much as success earns: the 64-wide model's tags are fragile, and
    # trajectory-level estimators otherwise reinforce malformed but lucky responses.
    c.advantage.invalid_action_penalty = 10.0
    c.ppo.actor_lr = 3e-4
    c.ppo.critic_lr = 3e-3
    c.ppo.kl_coef = 0.0
    c.ppo.mini_batch_rows = 16
    c.ppo.micro_batch_rows = 16
    c.ppo.length_multiple = 256
    c.ppo.epochs = 1
    c.train.iterations = iterations
    c.train.eval_every = iterations
    c.train.checkpoint_every = 2
    c.train.out_dir = str(out_dir)
    c.train.tensorboard = False
    return c
