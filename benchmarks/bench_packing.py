"""Packed update rows vs one turn per row: real-token fraction and update time on one real batch.

Usage: python benchmarks/bench_packing.py [--config configs/alfworld_tiny.py] [--rounds 3]
                                          [--pack-lengths 0,1152] [--batch /tmp/batch.npz]
                                          [--scan-unrolls 1,6]

Builds one real batch the way a training iteration does (the config's trainer plays one
iteration's episodes, then the log-prob/value passes and the advantages), then times the
jitted update (``ppo_update``, one epoch) and the log-prob/value passes on it in each layout:
one turn per row (grouped by length when the config says so) and packed rows of each width in
``--pack-lengths`` (0: the batch's length bucket). Each layout runs once untimed (compilation),
then the layouts take turns for ``--rounds`` rounds, so a shared machine's load falls on all of
them alike; min/median/max seconds are printed. ``--batch PATH`` keeps the built batch (and
reuses it when the file exists), so a rerun skips the rollout. ``--scan-unrolls`` adds, for
one turn per row, the update and passes with the decoder's layer scan unrolled that many layers
per step (``model.scan_unroll``; the first value is the baseline the speed-ups are against).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def build_batch(trainer, path: str | None):
    """One real :class:`PPOBatch` from the trainer's first iteration (cached at ``path``)."""
    from hiper_jax.train.ppo import PPOBatch

    if path and os.path.exists(path):
        arrays = np.load(path)
        return PPOBatch(**{name: arrays[name] if name in arrays.files else None for name in PPOBatch._fields})
    cfg = trainer.config
    trajectories = trainer.collect(cfg.env.num_envs, jax.random.key(cfg.train.seed))  # iteration 0's
    batch = trainer.build_batch(trajectories).batch
    if path:
        np.savez(path, **{k: np.asarray(v) for k, v in batch._asdict().items() if v is not None})
    return batch


def passes(trainer, batch, pack: bool, pack_length: int, unroll: int = 1) -> float:
    """Seconds of the actor log-prob and value pass over ``batch`` (the trainer's chunking)."""
    from hiper_jax.models import qwen2
    from hiper_jax.train.row_packing import packed_pass
    from hiper_jax.train.ppo import logprob_value_pass
    from hiper_jax.train.batch import chunked

    cfg, state = trainer.config, trainer.state
    model_config = trainer.model_config.replace(scan_unroll=unroll)
    text_mask = trainer.grammar.text_mask if trainer.grammar is not None else None

    def old_pass(t, v, *rest):
        *allowed, r = rest
        allowed = qwen2.AllowedTokens(*allowed, text_mask) if allowed else None
        return logprob_value_pass(state.actor, state.critic, model_config, t, v, r,
                                  trainer.ppo.temperature, allowed)

    multiple = cfg.ppo.length_multiple if cfg.ppo.group_by_length else 0
    run = functools.partial(chunked, rows=cfg.ppo.mini_batch_rows, length_multiple=multiple)
    valid = np.asarray(batch.valid)
    if pack:
        run = packed_pass(run, valid, pack_length or None)
    arrays = (np.asarray(batch.tokens), valid)
    if batch.allowed_mode is not None:
        arrays += (np.asarray(batch.allowed_mode), np.asarray(batch.allowed_ids))
    start = time.perf_counter()
    run(old_pass, arrays, (np.asarray(batch.value_read),), per_token=(True, False))
    return time.perf_counter() - start


def update(trainer, batch, pack: bool, pack_length: int, unroll: int = 1) -> tuple[float, dict]:
    """Seconds of one ``ppo_update`` over ``batch`` from a copy of the trainer's state, and its
    metrics."""
    from hiper_jax.train.ppo import ppo_update

    ppo = dataclasses.replace(trainer.ppo, pack_rows=pack, pack_length=pack_length)
    state = jax.tree.map(jnp.copy, trainer.state)  # the update donates its state
    jax.block_until_ready(state)
    text_mask = trainer.grammar.text_mask if trainer.grammar is not None else None
    start = time.perf_counter()
    state, metrics = ppo_update(state, batch, np.random.default_rng(0),
                                config=trainer.model_config.replace(scan_unroll=unroll),
                                ppo=ppo, actor_tx=trainer.actor_tx, critic_tx=trainer.critic_tx,
                                text_mask=text_mask)
    jax.block_until_ready(state)
    return time.perf_counter() - start, metrics


def main(argv=None) -> None:
    from hiper_jax.train.trainer import Trainer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/alfworld_tiny.py")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pack-lengths", default="0,1152",
                        help="packed row widths to compare, comma-separated (0: the length bucket)")
    parser.add_argument("--batch", default="", help="npz file keeping the built batch")
    parser.add_argument("--turns", type=int, default=0,
                        help="> 0: time on the batch's first this many turn rows only (a loaded "
                             "machine; the lengths keep their distribution)")
    parser.add_argument("--scan-unrolls", default="",
                        help="layer-scan unroll factors to compare with one turn per row, "
                             "comma-separated (e.g. 1,6); empty: the config's")
    parser.add_argument("--out-dir", default="/tmp/bench_packing")
    args = parser.parse_args(argv)

    spec = importlib.util.spec_from_file_location("bench_config", args.config)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.train.out_dir = args.out_dir
    config.env.num_eval_games = 4
    trainer = Trainer(config, progress=False)
    batch = build_batch(trainer, args.batch or None)
    if args.turns:
        real = np.flatnonzero(np.asarray(batch.valid).any(1))[: args.turns]
        batch = jax.tree.map(lambda x: np.asarray(x)[real], batch)
    lengths = np.asarray(batch.valid).sum(1)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}; batch {np.shape(batch.tokens)} "
          f"({int((lengths > 0).sum())} turns, {int(lengths.sum())} tokens)")

    unrolls = [int(u) for u in args.scan_unrolls.split(",") if u] or [trainer.model_config.scan_unroll]
    layouts = [(f"one turn per row, scan unroll {u}" if len(unrolls) > 1 else "one turn per row",
                False, 0, u) for u in unrolls] + [
        (f"packed, width {int(w) or np.shape(batch.tokens)[1]}", True, int(w), unrolls[0])
        for w in args.pack_lengths.split(",") if w]
    times = {name: {"update": [], "passes": []} for name, *_ in layouts}
    metrics = {}
    for name, pack, width, unroll in layouts:  # compilation
        _, metrics[name] = update(trainer, batch, pack, width, unroll)
        passes(trainer, batch, pack, width, unroll)
        print(f"compiled: {name}", flush=True)
    for round_index in range(args.rounds):
        for name, pack, width, unroll in layouts:
            times[name]["update"].append(update(trainer, batch, pack, width, unroll)[0])
            times[name]["passes"].append(passes(trainer, batch, pack, width, unroll))
            print(f"round {round_index}: {name}: update {times[name]['update'][-1]:.2f} s, "
                  f"passes {times[name]['passes'][-1]:.2f} s", flush=True)

    def spread(values):
        return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"

    base = statistics.median(times[layouts[0][0]]["update"])
    print(f"\n| layout | real-token fraction | steps | update s (min / median / max) | "
          f"update speed-up (median) | log-prob/value pass s (min / median / max) |")
    print("|---|---|---|---|---|---|")
    for name, *_ in layouts:
        m = metrics[name]
        median = statistics.median(times[name]["update"])
        print(f"| {name} | {m['real_tokens'] / m['computed_tokens']:.3f} | {m['steps']} | "
              f"{spread(times[name]['update'])} | {base / median:.2f}x | {spread(times[name]['passes'])} |")


if __name__ == "__main__":
    main()
