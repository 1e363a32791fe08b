"""LoRA vs full fine-tuning on the main job's config (``configs/alfworld_tiny.py``).

    python benchmarks/bench_lora.py --lora-rank 8 --out /tmp/lora_r8
    python benchmarks/bench_lora.py --lora-rank 0 --out /tmp/full

Runs ``--iterations`` iterations with a small evaluation and prints (and writes to
``<out>/bench_lora.json``) the trainable parameters, the optimizer states' bytes, and per
iteration the rollout / update / iteration seconds and the success rates.

    python benchmarks/bench_lora.py --step-bench --rows 16 --length 256

times one jitted PPO step of the same model, full and LoRA, alternating (best of ``--rounds``),
so both see the same machine load.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax


def tree_bytes(tree) -> int:
    """Bytes of every array leaf of ``tree``."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lora-rank", type=int, default=8, help="0: full fine-tuning")
    parser.add_argument("--actor-lr", type=float, default=None, help="default: the config's")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--eval-episodes", type=int, default=8)
    parser.add_argument("--out", default="")
    parser.add_argument("--step-bench", action="store_true")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.step_bench:
        step_bench(args)
        return

    from hiper_jax.configs.alfworld_tiny import get_config
    from hiper_jax.train.trainer import Trainer

    config = get_config()
    config.train.iterations = args.iterations
    config.train.eval_every = args.iterations
    config.train.eval_episodes = args.eval_episodes
    config.train.tensorboard = False
    config.train.out_dir = args.out
    config.model.lora_rank = args.lora_rank
    if args.actor_lr is not None:
        config.ppo.actor_lr = args.actor_lr
    start = time.perf_counter()
    trainer = Trainer(config, progress=False)
    result = {
        "lora_rank": args.lora_rank, "actor_lr": config.ppo.actor_lr,
        "setup_s": time.perf_counter() - start,
        "trainable_params": {k: int(sum(x.size for x in jax.tree.leaves(getattr(trainer.state, k))))
                             for k in ("actor", "critic")},
        "optimizer_bytes": {k: tree_bytes(getattr(trainer.state, k)) for k in ("actor_opt", "critic_opt")},
    }
    keep = ("iteration", "train/success", "eval/success", "time/rollout_s", "time/update_s",
            "time/iteration_s", "update/steps", "update/kl")
    result["records"] = [{k: r[k] for k in keep if k in r} for r in trainer.run()]
    with open(os.path.join(args.out, "bench_lora.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1)
    print(json.dumps(result, indent=1))


def step_bench(args) -> None:
    """Seconds per jitted PPO step (one mini-batch of ``rows x length`` tokens, one micro-batch),
    full fine-tuning vs LoRA rank ``--lora-rank``, alternating rounds; best of each."""
    import jax.numpy as jnp
    import numpy as np

    from hiper_jax.assets import TINY_ALFWORLD
    from hiper_jax.models import qwen2
    from hiper_jax.models.value_heads import CriticConfig, init_critic
    from hiper_jax.train.ppo import (PPOBatch, PPOConfig, init_lora_params, init_train_state,
                                     make_optimizer, ppo_step)

    config, base = qwen2.load_hf_checkpoint(TINY_ALFWORLD, progress=False)
    rng = np.random.default_rng(0)
    n, length = args.rows, args.length
    tokens = rng.integers(3, config.vocab_size, size=(n, length)).astype(np.int32)
    valid = np.ones((n, length), bool)
    mask = np.arange(length)[None] >= length // 2
    batch = jax.device_put(PPOBatch(
        tokens=tokens, valid=valid, loss_mask=np.broadcast_to(mask, (n, length)).copy(),
        advantages=rng.normal(size=(n, length)).astype(np.float32),
        old_logp=np.full((n, length), -3.0, np.float32), ref_logp=np.full((n, length), -3.0, np.float32),
        value_read=np.full((n, 3), length // 2, np.int32), value_targets=np.zeros((n, 3), np.float32),
        old_values=np.zeros((n, 3), np.float32), value_mask=np.ones((n, 3), bool)))
    ppo = PPOConfig(kl_coef=0.0, mini_batch_rows=n, micro_batch_rows=n, value_coef=0.1)
    tx = make_optimizer(1e-4, 0.0, 1.0)
    shared = CriticConfig(shared_backbone=True)
    lora_config = config.replace(lora_rank=args.lora_rank)
    actor, critic, frozen = init_lora_params(jax.random.key(0), lora_config, base, shared)
    runs = {
        "full": (config, init_train_state(jax.tree.map(jnp.copy, base),
                                          init_critic(jax.random.key(1), config, base, shared), tx, tx), None),
        f"lora r={args.lora_rank}": (lora_config, init_train_state(actor, critic, tx, tx), frozen),
    }
    states, times = {k: v[1] for k, v in runs.items()}, {k: [] for k in runs}
    for name, (cfg, _, fz) in runs.items():  # compile
        start = time.perf_counter()
        states[name], metrics = ppo_step(states[name], batch, None, fz, config=cfg, ppo=ppo,
                                         actor_tx=tx, critic_tx=tx)
        jax.block_until_ready(metrics)
        print(f"{name}: first step (compile) {time.perf_counter() - start:.1f} s", flush=True)
    for _ in range(args.rounds):
        for name, (cfg, _, fz) in runs.items():
            start = time.perf_counter()
            states[name], metrics = ppo_step(states[name], batch, None, fz, config=cfg, ppo=ppo,
                                             actor_tx=tx, critic_tx=tx)
            jax.block_until_ready(metrics)
            times[name].append(time.perf_counter() - start)
    for name in runs:
        trainable = sum(x.size for x in jax.tree.leaves((states[name].actor, states[name].critic)))
        print(f"{name}: step {min(times[name]):.2f} s (best of {args.rounds}; all "
              f"{', '.join(f'{t:.2f}' for t in times[name])}), trainable {trainable:,}, optimizer "
              f"{tree_bytes((states[name].actor_opt, states[name].critic_opt)) / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
