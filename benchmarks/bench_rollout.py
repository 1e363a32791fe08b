"""Rollout throughput: turns/s and device-busy fraction, with and without the two-group overlap.

Usage: python benchmarks/bench_rollout.py [--env alfworld|webshop] [--num-envs 16] [--repeats 3]
                                          [--tables groups,budget]

Runs the collector with the tiny embedded model on generated games, first with one group (the
device generates for all envs, then the host steps them all) and then with two pipelined
groups (the host steps one half while the device generates for the other), in the same run.
The first rollout of each setting warms up the compiled sampler and is not timed.

The ``budget`` table compares (two groups each) one episode per env against continuous
episodes (``Collector(turn_budget=...)``) on the same number of env turns per rollout (the
median of the episode runs'), in interleaved rounds: turns/s and the mean fraction of the
envs of a group that are active in a decode batch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None) -> None:
    from transformers import AutoTokenizer

    from hiper_jax.agent.prompts import PromptConfig
    from hiper_jax.agent.spans import TokenBytes
    from hiper_jax.models import qwen2
    from hiper_jax.rollout.collector import Collector, EnvSpec
    from hiper_jax.rollout.policies import LLMPolicy
    from hiper_jax.sampling import SamplingConfig
    from hiper_jax.assets import TINY_ALFWORLD

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="alfworld", choices=["alfworld", "webshop", "choose_word"],
                        help="choose_word needs --checkpoint (e.g. one built by "
                             "tests/word_task.py:build_word_checkpoint)")
    parser.add_argument("--checkpoint", default=TINY_ALFWORLD)
    parser.add_argument("--num-envs", type=int, default=16)
    parser.add_argument("--max-turns", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tables", default="groups,budget")
    parser.add_argument("--constraint", default="none", choices=["none", "grammar"],
                        help="budget table: grammar-constrained sampling (admissible actions, so "
                             "episodes end at different turns)")
    args = parser.parse_args(argv)
    tables = args.tables.split(",")

    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    config, params = qwen2.load_hf_checkpoint(args.checkpoint, dtype=jnp.float32, progress=False)
    params = qwen2.unstack_layers(params)
    sampling = SamplingConfig(max_new_tokens=48, temperature=1.0, stop_token_ids=(tokenizer.eos_token_id,),
                              pad_token_id=tokenizer.pad_token_id)
    with tempfile.TemporaryDirectory() as tmp:
        if args.env == "alfworld":
            from hiper_envs.alfworld.generate import generate_games

            generate_games(tmp, args.num_envs, seed=5, split="eval", progress=False)
            spec = EnvSpec("hiper_envs:hiper/ALFWorld-v0", {"games": os.path.join(tmp, "eval")}, "game")
        elif args.env == "webshop":
            spec = EnvSpec("hiper_envs:hiper/WebShop-v0", {"num_products": 1000, "split": "eval"}, "goal_index")
        else:
            spec = EnvSpec("hiper_envs:hiper/ChooseWord-v0", {"num_tasks": args.num_envs}, "task")
        prompt_cfg = PromptConfig(env=args.env, max_steps=args.max_turns, max_prompt_tokens=512)
        print(f"{args.env}, {args.num_envs} envs, <= {args.max_turns} turns, model "
              f"{sum(x.size for x in jax.tree.leaves(params)):,} params, jax {jax.__version__} on "
              f"{jax.devices()[0].platform} ({os.cpu_count()} cores)")
        header = f"{'groups':>6} {'turns/s':>9} {'device busy':>12} {'env step s':>11} {'wall s':>8}"
        if "groups" in tables:
            print(header + "\n" + "-" * len(header))
        for groups in (1, 2) if "groups" in tables else ():
            policy = LLMPolicy(params, config, sampling, tokenizer.pad_token_id, length_multiple=512,
                               rows=-(-args.num_envs // groups))
            with Collector(spec, args.num_envs, prompt_cfg, tokenizer, TokenBytes(tokenizer),
                           args.max_turns, groups=groups, envs_per_worker=4) as collector:
                tasks = list(range(args.num_envs))
                collector.run(policy, tasks, jax.random.key(0))  # compile
                runs = [collector.run(policy, tasks, jax.random.key(r + 1))[1] for r in range(args.repeats)]
            best = max(runs, key=lambda s: s.turns_per_s)
            print(f"{groups:>6} {best.turns_per_s:9.1f} {statistics.median(r.device_busy_fraction for r in runs):12.2f} "
                  f"{statistics.median(r.env_step_s for r in runs):11.2f} {statistics.median(r.wall_s for r in runs):8.1f}")

        if "budget" in tables:
            compare_budget(args, spec, prompt_cfg, tokenizer, params, config, sampling)


def compare_budget(args, spec, prompt_cfg, tokenizer, params, config, sampling) -> None:
    """One episode per env vs continuous episodes on the same turns per rollout (2 groups)."""
    from hiper_jax.agent.spans import TokenBytes
    from hiper_jax.rollout.collector import Collector
    from hiper_jax.rollout.policies import LLMPolicy

    grammar = None
    if args.constraint == "grammar":
        from hiper_jax.agent.grammar import ResponseGrammar

        grammar = ResponseGrammar(tokenizer, TokenBytes(tokenizer), prompt_cfg.style,
                                  tokenizer.eos_token_id)
    policy = LLMPolicy(params, config, sampling, tokenizer.pad_token_id, length_multiple=512,
                       rows=-(-args.num_envs // 2), grammar=grammar)
    tasks = list(range(args.num_envs))
    kwargs = dict(groups=2, envs_per_worker=4)
    runs = {"episodes": [], "continuous": []}
    with Collector(spec, args.num_envs, prompt_cfg, tokenizer, TokenBytes(tokenizer), args.max_turns,
                   **kwargs) as episodes:
        episodes.run(policy, tasks, jax.random.key(0))  # compile
        first = [episodes.run(policy, tasks, jax.random.key(100 + r))[1] for r in range(2)]
        budget = int(statistics.median(r.turns for r in first))
        with Collector(spec, args.num_envs, prompt_cfg, tokenizer, TokenBytes(tokenizer),
                       args.max_turns, turn_budget=budget, **kwargs) as continuous:
            continuous.run(policy, tasks, jax.random.key(0))  # warm the same shapes
            for r in range(args.repeats):
                runs["episodes"].append(episodes.run(policy, tasks, jax.random.key(r + 1))[1])
                runs["continuous"].append(continuous.run(policy, tasks, jax.random.key(r + 1))[1])
    print(f"\none episode per env vs continuous episodes, {budget} turns per rollout, "
          f"{args.repeats} interleaved rounds, constraint {args.constraint}")
    header = (f"{'mode':>10} {'turns':>6} {'turns/s min':>12} {'median':>8} {'max':>8} "
              f"{'active fraction':>16} {'wall s':>8}")
    print(header + "\n" + "-" * len(header))
    for mode, stats in runs.items():
        rates = [r.turns_per_s for r in stats]
        print(f"{mode:>10} {statistics.median(r.turns for r in stats):6.0f} {min(rates):12.1f} "
              f"{statistics.median(rates):8.1f} {max(rates):8.1f} "
              f"{statistics.median(r.active_fraction for r in stats):16.2f} "
              f"{statistics.median(r.wall_s for r in stats):8.1f}")


if __name__ == "__main__":
    main()
