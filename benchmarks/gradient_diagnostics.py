"""Why an update helps or hurts: the policy gradient's signal-to-noise ratio and the critic's pull.

    python benchmarks/gradient_diagnostics.py --config configs/alfworld_tiny.py --episodes 32
    python benchmarks/gradient_diagnostics.py --config configs/alfworld_tiny.py \\
        --config.env.games_dir=runs/alfworld_tiny/games --out runs/gradient_diagnostics.json

Plays ``--episodes`` training episodes with the config's policy (the warm start, or a run's
newest checkpoint with ``--checkpoint_dir``), builds the PPO batch as the trainer does and reports:

- ``pg_minibatch``: for each mini-batch size in ``--rows``, ``||E g||^2``, ``tr Cov(g)`` and their
  ratio (SNR) of the on-policy gradient ``-mean(A * grad log pi)`` over ``--minibatches`` draws
  (:func:`hiper_jax.experiments.study.minibatch_gradient_stats`); the cosine of one mini-batch's gradient
  with the mean is about ``sqrt(SNR / (1 + SNR))``.
- ``actor_pull``: on one mini-batch, the actor's gradient of the policy loss alone and of the
  value loss (times ``ppo.value_coef``) alone — with a critic sharing the actor's backbone the
  value loss moves the policy's weights too — their norms and cosine.

Writes the numbers as JSON to ``--out`` and prints them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

_CONFIG = config_flags.DEFINE_config_file("config", None, "a training config under configs/",
                                          lock_config=False)
_EPISODES = flags.DEFINE_integer("episodes", 32, "training episodes to play (one batch)")
_ROWS = flags.DEFINE_list("rows", ["16", "64"], "mini-batch sizes (turn rows) for the SNR")
_MINIBATCHES = flags.DEFINE_integer("minibatches", 12, "mini-batches drawn per size")
_CHECKPOINT_DIR = flags.DEFINE_string("checkpoint_dir", "", "a run's checkpoints/ directory "
                                      "(default: the config's warm start)")
_OUT = flags.DEFINE_string("out", "runs/gradient_diagnostics.json", "JSON output path")


def split_actor_gradient(trainer, mini, text_mask) -> dict:
    """Norms and cosine of the actor's gradient of the policy loss and of the weighted value loss
    on one mini-batch (the loss the update minimises, evaluated with ``value_coef`` 0 and as
    configured: the difference is the value loss's share)."""
    import jax
    import jax.numpy as jnp

    from hiper_jax.experiments.study import flat_vector
    from hiper_jax.train import ppo as ppo_lib

    counts = ppo_lib._counts(mini)
    mask = None if text_mask is None else jnp.asarray(text_mask)

    def actor_grad(value_coef: float) -> np.ndarray:
        cfg = dataclasses.replace(trainer.ppo, value_coef=value_coef)
        loss = lambda params: ppo_lib._loss(params, mini, counts, mask, trainer.model_config, cfg)[0]  # noqa: E731
        return flat_vector(jax.grad(loss)((trainer.state.actor, trainer.state.critic))[0])

    policy = actor_grad(0.0)
    value = actor_grad(trainer.ppo.value_coef) - policy
    norms = float(np.linalg.norm(policy)), float(np.linalg.norm(value))
    return {"policy_norm": norms[0], "value_norm": norms[1], "total_norm": float(np.linalg.norm(policy + value)),
            "cosine": float(policy @ value / max(norms[0] * norms[1], 1e-30)),
            "value_coef": trainer.ppo.value_coef, "shared_backbone": "backbone" not in trainer.state.critic}


def _main(argv) -> None:
    del argv
    import jax
    from absl import logging

    from hiper_jax.experiments.study import minibatch_gradient_stats
    from hiper_jax.train import ppo as ppo_lib
    from hiper_jax.train.trainer import Trainer

    logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    config.env.num_envs = _EPISODES.value
    config.train.out_dir = os.path.join(os.path.dirname(_OUT.value) or ".", "gradient_diagnostics_run")
    config.train.tensorboard = False
    trainer = Trainer(config, progress=True)
    policy_name = "warm start"
    if _CHECKPOINT_DIR.value:
        policy_name = f"{_CHECKPOINT_DIR.value} after {trainer.restore(_CHECKPOINT_DIR.value)} iterations"
    trajectories = trainer.collect(config.env.num_envs, jax.random.key(config.train.seed + 12345))
    text_mask = trainer.grammar.text_mask if trainer.grammar is not None else None
    batch, _, _, stats = trainer.build_batch(trajectories)
    result = {"policy": policy_name, "estimator": config.advantage.estimator, "episodes": len(trajectories),
              "success": float(np.mean([t.won for t in trajectories])), "turn_rows": stats["batch_rows"],
              "pg_minibatch": {}}
    for rows in (int(r) for r in _ROWS.value):
        result["pg_minibatch"][rows] = minibatch_gradient_stats(
            trainer.state.actor, trainer.model_config, batch, rows, _MINIBATCHES.value,
            config.sampling.temperature or 1.0, text_mask=text_mask)
        print(f"{rows:>4} rows: {result['pg_minibatch'][rows]}", flush=True)
    if trainer.ppo.value_heads:
        mini = jax.tree.map(jax.numpy.asarray, next(iter(ppo_lib.mini_batches(
            batch, config.ppo.mini_batch_rows, np.random.default_rng(config.train.seed)))))
        result["actor_pull"] = split_actor_gradient(trainer, mini, text_mask)
        print(f"actor pull: {result['actor_pull']}")
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    with open(_OUT.value, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    print(f"written to {_OUT.value}")


if __name__ == "__main__":
    app.run(_main)
