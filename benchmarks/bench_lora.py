"""LoRA vs full fine-tuning on the main job's config (``configs/alfworld_tiny.py``).

    python benchmarks/bench_lora.py --lora-rank 8 --out /tmp/lora_r8
    python benchmarks/bench_lora.py --lora-rank 0 --out /tmp/full

Runs ``--iterations`` iterations with a small evaluation and prints (and writes to
``<out>/bench_lora.json``) the trainable parameters, the optimizer states' bytes, and per
iteration the rollout / update / iteration seconds and the success rates.
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
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

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


if __name__ == "__main__":
    main()
