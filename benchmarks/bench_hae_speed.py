"""HAE + token assignment: the current package code against the previous version, in one run.

Usage: python benchmarks/bench_hae_speed.py [--sizes 128x50x64,1024x50x64] [--rounds 30]
                                            [--calls 20]

The previous version (kept below as the baseline, not in the package) ran the reverse scan with
seven input arrays, four carries and three outputs, each its own array, and assigned token
advantages op by op (not jitted). The current one packs the scan carry into one array, emits
two outputs a step, and jits the assignment. Both share the unchanged shaping and
normalisation code of ``hiper_jax.hae``, and their outputs are checked against each other.

Sizes are B x T x L: B trajectories of T turns (ragged, T/2..T real turns), one token row of L
tokens per real turn. Two measurements per size:

* ``jit``: ``compute_hae`` and ``assign_token_advantages`` inside one jitted function
  (compilation excluded), inputs on the device, result blocked on;
* ``calls``: the two public functions called one after the other, as the trainer calls them.

Rounds are interleaved (old, new, old, new, ...); a round's time is the mean of ``--calls``
back-to-back calls, and the table gives min / median / max over rounds in ms.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmarks.bench_hae import CFG, make_batch  # noqa: E402
from hiper_jax import hae  # noqa: E402


# ---------------------------------------------------------------- baseline (previous version)

def old_hae_scan(rewards, values_low, values_high, switch, dones, mask, gamma, lam_turn, lam_seg,
                 bootstrap_truncated):
    """The previous ``hae.hae_scan``: seven time-major inputs, four carries, three outputs."""
    shift = hae._shift_left
    num_turns = rewards.shape[-1]
    turn = jnp.arange(num_turns)
    start = mask & ((turn == 0) | switch)
    next_is_start = shift(start, False)
    done = dones & mask
    seg_end = mask & (done | next_is_start | ~shift(mask, False))
    links_next_segment = seg_end & next_is_start & ~done
    use_own = bootstrap_truncated & seg_end & ~done & ~next_is_start
    v_high_next = shift(values_high, 0.0)
    last_start = jnp.max(jnp.where(start, turn, 0), axis=-1, keepdims=True)
    v_high_last_start = jnp.take_along_axis(values_high, last_start, axis=-1)
    boot_low = jnp.where(links_next_segment, v_high_next, jnp.where(use_own, values_low, 0.0))
    boot_high = jnp.where(links_next_segment, v_high_next,
                          jnp.where(use_own, v_high_last_start, 0.0))
    next_v_low = jnp.where(seg_end, boot_low, shift(values_low, 0.0))
    inside = (~seg_end).astype(jnp.float32)
    ends = seg_end.astype(jnp.float32)
    is_start = start.astype(jnp.float32)
    xs = (rewards + gamma * next_v_low - values_low, gamma * lam_turn * inside, gamma * inside,
          rewards + gamma * ends * boot_high, gamma * ends * links_next_segment, is_start,
          values_high)

    def step(carry, x):
        adv_low_next, ret_next, link_next, adv_high_next_seg = carry
        delta_t, c_low_t, c_seg_t, o_ret_t, o_link_t, start_t, v_high_t = x
        adv_low = delta_t + c_low_t * adv_low_next
        ret = o_ret_t + c_seg_t * ret_next
        link = o_link_t + c_seg_t * link_next
        adv_high = start_t * (ret - v_high_t + lam_seg * link * adv_high_next_seg)
        adv_high_seg = adv_high + (1.0 - start_t) * adv_high_next_seg
        return (adv_low, ret, link, adv_high_seg), (adv_low, ret, adv_high)

    xs = tuple(jnp.moveaxis(x, -1, 0) for x in xs)
    zero = jnp.zeros_like(xs[0][0])
    _, ys = jax.lax.scan(step, (zero,) * 4, xs, reverse=True)
    adv_low, ret_term, adv_high = (jnp.moveaxis(y, 0, -1) for y in ys)
    return adv_low, ret_term, adv_high, start


def old_hae_body(rewards, values_low, values_high, values_term, switch, dones, mask, invalid,
                 keep_changed, cfg):
    """The previous ``_compute_hae_jit`` (same code, the old scan)."""
    mask = jnp.asarray(mask) != 0
    shaped = hae.shape_rewards(rewards, switch, mask, cfg, invalid=invalid,
                               keep_changed=keep_changed)
    v_low = hae.masked_float32(values_low, mask)
    v_high = hae.masked_float32(values_high, mask)
    adv_low, ret_term, adv_high, boundary = old_hae_scan(
        shaped, v_low, v_high, hae.as_flags(switch, mask), hae.as_flags(dones, mask), mask,
        cfg.gamma, cfg.lam_turn, cfg.lam_seg, cfg.bootstrap_truncated)
    ret_low = jnp.where(mask, adv_low + v_low, 0.0)
    ret_high = jnp.where(boundary, adv_high + v_high, 0.0)
    ret_term = jnp.where(mask, ret_term, 0.0)
    adv_term = jnp.where(mask, ret_term - hae.masked_float32(values_term, mask), 0.0)
    adv_low = jnp.where(mask, adv_low, 0.0)
    if cfg.normalize:
        adv_low = hae.masked_standardize(adv_low, mask)
        adv_high = hae.masked_standardize(adv_high, boundary)
        adv_term = hae.masked_standardize(adv_term, mask)
    return hae.HAEOutput(adv_low, ret_low, adv_high, ret_high, adv_term, ret_term, boundary)


_old_hae_jit = jax.jit(old_hae_body, static_argnames="cfg")


def old_compute_hae(cfg, **batch):
    return _old_hae_jit(cfg=cfg, **batch)


def old_assign(out, traj_index, turn_index, action_mask, subgoal_mask, switch_mask):
    """The previous ``assign_token_advantages`` body, run op by op as it was."""
    def gather(x):
        return x[traj_index, turn_index][:, None]

    return (jnp.where(action_mask, gather(out.adv_low), 0.0)
            + jnp.where(subgoal_mask, gather(jnp.where(out.boundary, out.adv_high, 0.0)), 0.0)
            + jnp.where(switch_mask, gather(out.adv_term), 0.0))


# ---------------------------------------------------------------- measurement

def make_inputs(batch_size: int, turns: int, tokens: int) -> tuple[dict, tuple]:
    """Turn arrays ``[B, T]`` and token inputs ``([N], [N], [N, L] x 3)`` on the device."""
    batch = make_batch(batch_size, turns)
    rng = np.random.default_rng(1)
    traj, turn = np.nonzero(batch["mask"])
    shape = (traj.size, tokens)
    masks = tuple(rng.random(shape) < p for p in (0.3, 0.2, 0.05))
    return jax.device_put(batch), jax.device_put((traj.astype(np.int32), turn.astype(np.int32))
                                                 + masks)


def implementations(batch: dict, token_args: tuple) -> dict:
    """name -> zero-argument callable returning the [N, L] token advantages."""
    def new_jit_fn(b, t):
        return hae.assign_token_advantages(hae.compute_hae(cfg=CFG, **b), *t)

    def old_jit_fn(b, t):
        return old_assign(old_hae_body(cfg=CFG, **b), *t)

    new_jit = jax.jit(new_jit_fn).lower(batch, token_args).compile()
    old_jit = jax.jit(old_jit_fn).lower(batch, token_args).compile()
    return {
        "jit old": lambda: old_jit(batch, token_args),
        "jit new": lambda: new_jit(batch, token_args),
        "calls old": lambda: old_assign(old_compute_hae(CFG, **batch), *token_args),
        "calls new": lambda: hae.assign_token_advantages(hae.compute_hae(cfg=CFG, **batch),
                                                         *token_args),
    }


def time_rounds(fns: dict, rounds: int, calls: int) -> dict:
    """Interleaved rounds; returns name -> list of per-call seconds (one mean per round)."""
    for fn in fns.values():
        for _ in range(3):
            jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                out = fn()
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - start) / calls)
    return times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="128x50x64,1024x50x64")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} "
          f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores); "
          f"{args.rounds} interleaved rounds of {args.calls} calls; config {CFG}")
    header = f"{'B x T x L':>12} {'what':>6} {'impl':>5} {'min ms':>8} {'median ms':>10} {'max ms':>8}"
    print(header)
    print("-" * len(header))
    for size in args.sizes.split(","):
        batch_size, turns, tokens = (int(x) for x in size.lower().split("x"))
        batch, token_args = make_inputs(batch_size, turns, tokens)
        fns = implementations(batch, token_args)
        outs = {name: np.asarray(fn()) for name, fn in fns.items()}
        for name, out in outs.items():
            np.testing.assert_allclose(out, outs["jit old"], atol=1e-5, rtol=1e-5, err_msg=name)
        times = time_rounds(fns, args.rounds, args.calls)
        for name, ts in times.items():
            what, impl = name.split()
            print(f"{size:>12} {what:>6} {impl:>5} {min(ts) * 1e3:8.3f} "
                  f"{statistics.median(ts) * 1e3:10.3f} {max(ts) * 1e3:8.3f}")
        for what in ("jit", "calls"):
            ratio = [o / n for o, n in zip(times[f"{what} old"], times[f"{what} new"])]
            print(f"{size:>12} {what:>6} old/new per round: min {min(ratio):.2f}x, "
                  f"median {statistics.median(ratio):.2f}x, max {max(ratio):.2f}x")


if __name__ == "__main__":
    main()
