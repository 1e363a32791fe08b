"""A first end-to-end run of a tiny Qwen2.5-VL policy on MedVista: warm start, then PPO with HAE.

    python -m hiper_jax.experiments.medvista_vlm --work-dir build/medvista_vlm [--seed 0]
    # the shipped warm start (hiper_jax/assets/tiny_medvista):
    python -m hiper_jax.experiments.medvista_vlm --work-dir build/tiny_medvista --iterations 0 \
        --save-dir hiper_jax/assets/tiny_medvista

Generates the offline MedVista data (``--images`` source images at ``--image-size`` pixels per
view), writes the oracle's demonstrations of the train split, trains a byte-level BPE on the
prompts and responses, initialises a tiny Qwen2.5-VL from the seed (a 2-block vision tower,
a 2-layer decoder), warm-starts it on the demonstrations (:mod:`hiper_jax.train.vision_sft`,
tower frozen) and runs ``--iterations`` of PPO with HAE on train questions
(:mod:`hiper_jax.train.vision_batch`). The held-out test questions are played greedily under the
Plan-Execute grammar after the warm start and after RL, with the tools (``tool_budget`` 4) and
without them (``tool_budget`` 0: answer at once): accuracy, tool calls per episode and accuracy
per question type, in ``summary.json`` in the work directory.

The model is tiny and the views small; the run checks that the pieces learn together on 2
CPU cores in minutes, not what a real VLM reaches.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from hiper_jax.agent.demos import demo_turns, read_demos
from hiper_jax.agent.grammar import ResponseGrammar
from hiper_jax.agent.prompts import PromptConfig, build_messages
from hiper_jax.agent.spans import TokenBytes
from hiper_jax.hae import HAEConfig
from hiper_jax.models.qwen2 import Qwen2Config
from hiper_jax.models.qwen2_5_vl import Qwen2_5_VLConfig, VisionConfig, init_params
from hiper_jax.models.value_heads import CriticConfig, init_critic
from hiper_jax.rollout.adapters import EnvSpec, get_adapter
from hiper_jax.rollout.collector import Collector
from hiper_jax.rollout.images import ImagePrompter
from hiper_jax.rollout.vlm_policy import VLMPolicy
from hiper_jax.sampling import SamplingConfig
from hiper_jax.train import ppo
from hiper_jax.train.batch import BatchSettings
from hiper_jax.train.sft import SFTConfig
from hiper_jax.train.vision_batch import build_vision_ppo_batch
from hiper_jax.train.vision_sft import make_vision_examples, train_vision_sft

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
TOOLS = ("zoom[", "contrast[")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What one run does (see the module docstring)."""

    images: int = 40
    image_size: int = 32
    seed: int = 0
    sft_epochs: int = 4
    sft_lr: float = 3e-3
    iterations: int = 4
    envs: int = 16
    actor_lr: float = 3e-4
    critic_lr: float = 1e-3
    eval_questions: int = 32
    max_text_tokens: int = 8


def model_config(tok) -> Qwen2_5_VLConfig:
    """The tiny Qwen2.5-VL over ``tok``'s vocabulary: 2x2-pixel patches merged 2x2."""
    start, end, image, video = (tok.convert_tokens_to_ids(t) for t in VISION_TOKENS)
    text = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                       tie_word_embeddings=True, initializer_range=0.05)
    vision = VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                          patch_size=2, temporal_patch_size=2, spatial_merge_size=2, window_size=8,
                          fullatt_block_indexes=(1,), initializer_range=0.05)
    return Qwen2_5_VLConfig(text, vision, mrope_section=(4, 2, 2), image_token_id=image,
                            video_token_id=video, vision_start_token_id=start, vision_end_token_id=end)


def env_spec(data_dir: str, split: str, image_size: int, tool_budget: int = 4) -> EnvSpec:
    adapter = get_adapter("medvista")
    return EnvSpec(adapter.env_id, {"data_dir": data_dir, "split": split, "image_size": image_size,
                                    "info_images": "all", "tool_budget": tool_budget},
                   adapter.task_option, max_steps_key=adapter.max_steps_key)


def play(params, config, tok, grammar, prompt_cfg, spec: EnvSpec, tasks, key, greedy: bool, envs: int,
         max_turns: int):
    """Trajectories of ``tasks`` (chunks of ``envs``), constrained, greedy or at temperature 1."""
    sampling = SamplingConfig(max_new_tokens=48, temperature=1.0, greedy=greedy,
                              stop_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id)
    policy = VLMPolicy(params, config, sampling, tok.pad_token_id, length_multiple=64, grammar=grammar,
                       patch_multiple=256)
    out = []
    with Collector(spec, envs, prompt_cfg, tok, TokenBytes(tok), max_turns=max_turns, groups=1,
                   envs_per_worker=envs, prompter=ImagePrompter(config, tok)) as collector:
        for start in range(0, len(tasks), envs):
            chunk = list(tasks[start: start + envs])
            chunk += chunk[:1] * (envs - len(chunk))
            key, sub = jax.random.split(key)
            trajectories, _ = collector.run(policy, chunk, sub)
            out.extend(trajectories[: min(envs, len(tasks) - start)])
    return out


def summarize(trajectories) -> dict:
    """Accuracy, tool calls per episode, accuracy per question type."""
    by_type = collections.defaultdict(list)
    for t in trajectories:
        by_type[t.task_type].append(float(t.won))
    tools = [sum(turn.action.startswith(TOOLS) for turn in t.turns) for t in trajectories]
    return {"accuracy": float(np.mean([t.won for t in trajectories])), "episodes": len(trajectories),
            "tool_calls": float(np.mean(tools)),
            "turns": float(np.mean([len(t.turns) for t in trajectories])),
            "by_type": {k: float(np.mean(v)) for k, v in sorted(by_type.items())}}


def evaluate(params, config, tok, grammar, prompt_cfg, data_dir, cfg: RunConfig, num_test: int) -> dict:
    tasks = list(range(min(cfg.eval_questions, num_test)))
    out = {}
    for name, budget in (("tools", 4), ("no_tools", 0)):
        spec = env_spec(data_dir, "test", cfg.image_size, budget)
        trajectories = play(params, config, tok, grammar, prompt_cfg, spec, tasks, jax.random.key(0), True,
                            cfg.envs, budget + 1)
        out[name] = summarize(trajectories)
    return out


def save_warm_start(params, config, tok, out_dir: str, summary: dict) -> None:
    """Writes the warm start as a HF checkpoint directory the trainer loads
    (``config.json``, ``model.safetensors``, the tokenizer) with ``build_summary.json``."""
    from hiper_jax.models.qwen2_5_vl import save_hf_checkpoint

    os.makedirs(out_dir, exist_ok=True)
    save_hf_checkpoint(params, config, out_dir, progress=False)
    tok.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "build_summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)


def run(work_dir: str, cfg: RunConfig, save_dir: str = "") -> dict:
    """The run of the module docstring; ``save_dir``: also write the warm start there
    (:func:`save_warm_start`). With ``cfg.iterations == 0`` only the warm start is evaluated."""
    from hiper_envs.medvista import synth
    from hiper_envs.medvista.env import MedVistaEnv
    from hiper_envs.medvista.oracle import write_demos
    from hiper_jax.tokenization import train_byte_level_bpe

    os.makedirs(work_dir, exist_ok=True)
    start = time.perf_counter()
    data_dir = os.path.join(work_dir, "data")
    synth.generate(data_dir, synth.SynthConfig(num_images=cfg.images, seed=cfg.seed), progress=False)
    train_env = MedVistaEnv(data_dir, split="train", image_size=cfg.image_size, info_images="all")
    num_test = len(MedVistaEnv(data_dir, split="test", image_size=cfg.image_size).items)
    demos_path = os.path.join(work_dir, "demos.jsonl")
    demo_stats = write_demos(train_env, demos_path, progress=False)
    episodes = read_demos(demos_path)
    adapter = get_adapter("medvista")
    prompt_cfg = PromptConfig(env="medvista", intro=adapter.intro, max_steps=train_env.max_turns,
                              max_prompt_tokens=4096, history_turns=1)
    # The tokenizer learns the text the agent reads and writes.
    texts = []
    for turn in demo_turns(episodes, prompt_cfg, only_won=False):
        texts.extend(message["content"] for message in build_messages(turn.view, prompt_cfg))
        texts.append(turn.response)
    tok = train_byte_level_bpe(texts * 2, vocab_size=1024)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", *VISION_TOKENS]})
    config = model_config(tok)
    params = init_params(jax.random.key(cfg.seed), config)
    grammar = ResponseGrammar(tok, TokenBytes(tok), "plan_execute", tok.eos_token_id,
                              max_text_tokens=cfg.max_text_tokens)
    examples = make_vision_examples(episodes, tok, prompt_cfg, ImagePrompter(config, tok), cfg.image_size,
                                    grammar=grammar)
    sft_cfg = SFTConfig(epochs=cfg.sft_epochs, lr=cfg.sft_lr, warmup_steps=10, batch_rows=8,
                        length_multiple=128, seed=cfg.seed)
    params, sft_history = train_vision_sft(params, config, examples, sft_cfg, patch_multiple=256)
    summary = {"config": dataclasses.asdict(cfg), "demos": demo_stats, "sft_examples": len(examples),
               "sft_nll_first": sft_history[0]["nll"], "sft_nll_last": sft_history[-1]["nll"]}
    summary["warm_start"] = evaluate(params, config, tok, grammar, prompt_cfg, data_dir, cfg, num_test)
    print("warm start:", json.dumps(summary["warm_start"]))
    if save_dir:
        save_warm_start(params, config, tok, save_dir, summary)
    if not cfg.iterations:
        summary["seconds"] = time.perf_counter() - start
        with open(os.path.join(work_dir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
        return summary

    critic = init_critic(jax.random.key(cfg.seed + 1), config.text, params, CriticConfig(shared_backbone=True))
    actor_tx = ppo.freeze_vision(ppo.make_optimizer(cfg.actor_lr, 0.0, 1.0))
    critic_tx = ppo.make_optimizer(cfg.critic_lr, 0.0, 1.0)
    state = ppo.init_train_state(params, critic, actor_tx, critic_tx)
    ref = ppo.reference_params(params, jnp.float32)
    settings = BatchSettings(estimator="hae", max_turns=train_env.max_turns, rows=8, length_multiple=128)
    ppo_cfg = ppo.PPOConfig(mini_batch_rows=16, micro_batch_rows=8, epochs=1, kl_coef=0.01,
                            entropy_coef=0.0)
    spec = env_spec(data_dir, "train", cfg.image_size)
    rng = np.random.default_rng(cfg.seed)
    key = jax.random.key(cfg.seed + 2)
    history = []
    for iteration in range(cfg.iterations):
        tasks = rng.choice(len(train_env.items), cfg.envs, replace=False)
        key, sub = jax.random.split(key)
        trajectories = play(state.actor, config, tok, grammar, prompt_cfg, spec, tasks, sub, False,
                            cfg.envs, train_env.max_turns)
        built = build_vision_ppo_batch(trajectories, state, ref, config, settings, HAEConfig(),
                                       tok.pad_token_id, text_mask=grammar.text_mask, patch_multiple=256)
        state, metrics = ppo.ppo_update(state, built.batch, rng, config=config, ppo=ppo_cfg,
                                        actor_tx=actor_tx, critic_tx=critic_tx, text_mask=grammar.text_mask)
        record = {"iteration": iteration, **summarize(trajectories),
                  "loss": metrics["loss"], "value_loss": metrics["value_loss"],
                  "logp_mismatch_max": built.stats["logp_mismatch_max"]}
        record.pop("by_type")
        history.append(record)
        print(json.dumps(record))
    summary["rl"] = history
    summary["after_rl"] = evaluate(state.actor, config, tok, grammar, prompt_cfg, data_dir, cfg, num_test)
    print("after RL:", json.dumps(summary["after_rl"]))
    summary["seconds"] = time.perf_counter() - start
    with open(os.path.join(work_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--save-dir", default="", help="also write the warm start here as a HF checkpoint")
    for field in dataclasses.fields(RunConfig):
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(field.default), default=field.default)
    args = parser.parse_args(argv)
    cfg = RunConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig)})
    run(args.work_dir, cfg, args.save_dir)


if __name__ == "__main__":
    main()
