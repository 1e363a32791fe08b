"""The embedded default: a tiny Qwen2-architecture model and a BPE tokenizer trained on env text.

The shipped checkpoint (``hiper_jax/assets/tiny_alfworld``) is made by this module::

    python -m hiper_jax.tiny --out hiper_jax/assets/tiny_alfworld

which generates ALFWorld games, writes expert demonstrations, trains the tokenizer on the
prompts and responses the agent will see (plus WebShop text, so one tokenizer serves both
envs), initialises the model from a seed and warm-starts it with supervised fine-tuning
(:mod:`hiper_jax.train.sft`). Weights are stored in bfloat16 to keep the repository small; the
trainer loads them as float32 master weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from hiper_jax.agent.demos import demo_turns, read_demos
from hiper_jax.agent.prompts import PromptConfig, build_messages
from hiper_jax.models import qwen2
from hiper_jax.tokenization import train_byte_level_bpe

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
TINY_ALFWORLD = os.path.join(ASSETS, "tiny_alfworld")


def tiny_model_config(vocab_size: int, hidden_size: int = 96, num_layers: int = 3,
                      intermediate_size: int = 256) -> qwen2.Qwen2Config:
    """The tiny architecture: 4 query heads, 2 KV heads, tied embeddings."""
    return qwen2.Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, rope_theta=10_000.0, tie_word_embeddings=True)


def training_texts(demos: list[dict], prompt_cfgs: list[PromptConfig]) -> list[str]:
    """Prompt and response texts of every demonstration turn, in each prompt style."""
    texts = []
    for cfg in prompt_cfgs:
        for turn in demo_turns(demos, cfg, only_won=False):
            system, user = build_messages(turn.view, cfg)
            texts.append(f"{system['content']}\n{user['content']}\n{turn.response}")
    return texts


def webshop_texts(num_goals: int = 200) -> list[str]:
    """Oracle-episode prompts of a small generated WebShop catalog (for tokenizer coverage)."""
    from hiper_envs.webshop.demos import write_demonstrations
    from hiper_envs.webshop.env import WebShopEnv

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "webshop_demos.jsonl")
        write_demonstrations(WebShopEnv(num_products=1000, split="train"), path, episodes=num_goals,
                             progress=False)
        demos = read_demos(path)
    return training_texts(demos, [PromptConfig(env="webshop", max_steps=15),
                                  PromptConfig(env="webshop", style="flat", max_steps=15)])


def build(out_dir: str, work_dir: str, num_games: int = 600, vocab_size: int = 1024,
          epochs: int = 6, lr: float = 3e-3, seed: int = 0, hidden_size: int = 96,
          num_layers: int = 3, intermediate_size: int = 256, max_receptacles: int = 4,
          max_distractors: int = 1, max_steps: int = 30,
          task_types: tuple[str, ...] = ("pick_and_place_simple", "look_at_obj_in_light")) -> dict:
    """Makes the tiny checkpoint in ``out_dir`` (see the module docstring); returns a summary."""
    from transformers import AutoTokenizer

    from hiper_envs.alfworld.demos import write_demos
    from hiper_envs.alfworld.generate import GeneratorConfig, generate_games
    from hiper_jax.train.sft import SFTConfig, make_examples, train_sft

    start = time.perf_counter()
    games = os.path.join(work_dir, "games")
    demos_path = os.path.join(work_dir, "demos.jsonl")
    if not os.path.exists(demos_path):
        scenes = GeneratorConfig(max_receptacles=max_receptacles, max_distractors=max_distractors)
        generate_games(games, num_games, seed=seed + 1000, task_types=task_types, config=scenes,
                       workers=2)
        write_demos(os.path.join(games, "train"), demos_path, workers=2)
    demos = read_demos(demos_path)
    alfworld_cfg = PromptConfig(env="alfworld", history_turns=2, max_prompt_tokens=512, max_steps=max_steps)
    texts = training_texts(demos, [alfworld_cfg, PromptConfig(env="alfworld", style="flat", max_steps=max_steps)])
    texts += webshop_texts()
    tokenizer = train_byte_level_bpe(texts, vocab_size=vocab_size)
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)

    config = tiny_model_config(len(tokenizer), hidden_size, num_layers, intermediate_size)
    config = dataclasses.replace(config, eos_token_id=tokenizer.eos_token_id)
    params = qwen2.init_params(jax.random.key(seed), config)
    examples = make_examples(list(demo_turns(demos, alfworld_cfg)), tokenizer, alfworld_cfg)
    params, history = train_sft(params, config, examples, tokenizer.pad_token_id,
                                SFTConfig(epochs=epochs, lr=lr, batch_rows=16, seed=seed),
                                log_path=os.path.join(work_dir, "sft_metrics.jsonl"))
    shipped = dataclasses.replace(config, param_dtype="bfloat16", compute_dtype="bfloat16")
    qwen2.save_hf_checkpoint(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), shipped, out_dir)
    summary = {
        "params": int(sum(np.size(x) for x in jax.tree.leaves(params))),
        "vocab_size": len(tokenizer), "demo_episodes": len(demos), "sft_examples": len(examples),
        "sft_tokens_per_epoch": int(sum(len(e.prompt_ids) + len(e.response_ids) for e in examples)),
        "epochs": epochs, "final_nll": history[-1]["nll"], "minutes": (time.perf_counter() - start) / 60,
        "recipe": f"python -m hiper_jax.tiny --out {out_dir} --num-games {num_games} --epochs {epochs} "
                  f"--lr {lr} --seed {seed} --hidden-size {hidden_size} --num-layers {num_layers} "
                  f"--intermediate-size {intermediate_size} --max-receptacles {max_receptacles} "
                  f"--max-distractors {max_distractors} --max-steps {max_steps} "
                  f"--task-types {' '.join(task_types)}",
    }
    with open(os.path.join(out_dir, "build_summary.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Make the tiny embedded checkpoint.")
    parser.add_argument("--out", default=TINY_ALFWORLD)
    parser.add_argument("--work-dir", default="", help="games and demos (default: a temp dir)")
    parser.add_argument("--num-games", type=int, default=600)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden-size", type=int, default=96)
    parser.add_argument("--num-layers", type=int, default=3)
    parser.add_argument("--intermediate-size", type=int, default=256)
    parser.add_argument("--max-receptacles", type=int, default=4)
    parser.add_argument("--max-distractors", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=30, help="the episode step limit prompts show")
    parser.add_argument("--task-types", nargs="+", default=["pick_and_place_simple", "look_at_obj_in_light"],
                        help="ALFWorld task types of the demonstrations (a model this small does not "
                             "learn all six)")
    args = parser.parse_args(argv)
    work = args.work_dir or tempfile.mkdtemp(prefix="hiper_tiny_")
    try:
        summary = build(args.out, work, args.num_games, args.vocab_size, args.epochs, args.lr, args.seed,
                        args.hidden_size, args.num_layers, args.intermediate_size,
                        args.max_receptacles, args.max_distractors, args.max_steps, tuple(args.task_types))
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
