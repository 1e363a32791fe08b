"""HAE speed: the jitted JAX implementation vs the plain Python loop, in one run.

Usage: python benchmarks/bench_hae.py [--sizes 128x50,1024x50,4096x64,16384x64] [--repeats 20]

For each B x T it reports the compile time, the median run time of the jitted function
(inputs already on the device, result blocked on), turns per second, and the speed-up over two
baselines on the same batch: the plain per-trajectory Python loop (tests/hae_reference.py), and
a NumPy loop over turns vectorised over the batch (how an eager PyTorch/NumPy trainer computes
it), whose output is checked against ours.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from hiper_jax.hae import HAEConfig, compute_hae  # noqa: E402
from tests.hae_reference import hae_ref  # noqa: E402

CFG = HAEConfig(gamma=1.0, lam_turn=1.0, lam_seg=0.95, bootstrap_truncated=True,
                keep_penalty=-0.3, keep_penalty_mode="normalized", invalid_action_penalty=0.1,
                keep_consistency_penalty=-0.3, normalize=True)


def make_batch(batch: int, turns: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(turns // 2, turns + 1, size=batch)
    mask = np.arange(turns)[None, :] < lengths[:, None]
    dones = np.zeros((batch, turns), bool)
    dones[np.arange(batch), lengths - 1] = rng.random(batch) < 0.7
    normal = lambda: rng.normal(size=(batch, turns)).astype(np.float32)
    return dict(rewards=normal(), values_low=normal(), values_high=normal(), values_term=normal(),
                switch=rng.random((batch, turns)) < 0.25, dones=dones, mask=mask,
                invalid=rng.random((batch, turns)) < 0.1,
                keep_changed=rng.random((batch, turns)) < 0.1)


def time_jax(batch: dict, repeats: int) -> tuple[float, float]:
    """Returns (compile_s, median_run_s)."""
    device_batch = jax.device_put(batch)
    fn = lambda kw: compute_hae(cfg=CFG, **kw)
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(device_batch).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(device_batch))
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(device_batch))
        runs.append(time.perf_counter() - start)
    return compile_s, statistics.median(runs)


def time_loop(batch: dict, max_rows: int) -> float:
    """Seconds for the plain loop over the whole batch (timed on at most max_rows rows, scaled)."""
    rows = min(max_rows, batch["rewards"].shape[0])
    sub = {k: v[:rows].tolist() for k, v in batch.items()}
    start = time.perf_counter()
    hae_ref(cfg=CFG, **sub)
    return (time.perf_counter() - start) * batch["rewards"].shape[0] / rows


def hae_numpy_turn_loop(batch: dict, cfg: HAEConfig) -> dict:
    """HAE with a Python loop over turns and NumPy over the batch (no shaping beyond keep/invalid/
    keep-changed, no normalisation). Returns adv_low, adv_high and ret_term as [B, T]."""
    from hiper_jax.hae import shape_rewards

    mask = batch["mask"]
    num_rows, num_turns = mask.shape
    r = np.asarray(shape_rewards(batch["rewards"], batch["switch"], mask, cfg,
                                 batch["invalid"], batch["keep_changed"]))
    v_low = np.where(mask, batch["values_low"], 0.0)
    v_high = np.where(mask, batch["values_high"], 0.0)
    start = mask & (batch["switch"] | (np.arange(num_turns) == 0))
    g = cfg.gamma
    adv_low, adv_high, ret_term = (np.zeros((num_rows, num_turns)) for _ in range(3))
    last_start_value = v_high[np.arange(num_rows), np.where(start, np.arange(num_turns), 0).max(1)]
    a_low = ret = link = a_seg = np.zeros(num_rows)
    for t in reversed(range(num_turns)):
        real, done = mask[:, t], batch["dones"][:, t] & mask[:, t]
        nxt_start = start[:, t + 1] if t + 1 < num_turns else np.zeros(num_rows, bool)
        nxt_real = mask[:, t + 1] if t + 1 < num_turns else np.zeros(num_rows, bool)
        end = real & (done | nxt_start | ~nxt_real)
        links = end & nxt_start & ~done
        own = cfg.bootstrap_truncated & end & ~done & ~nxt_start
        v_high_next = v_high[:, t + 1] if t + 1 < num_turns else 0.0
        v_low_next = v_low[:, t + 1] if t + 1 < num_turns else 0.0
        boot_low = np.where(links, v_high_next, np.where(own, v_low[:, t], 0.0))
        boot_high = np.where(links, v_high_next, np.where(own, last_start_value, 0.0))
        delta = r[:, t] + g * np.where(end, boot_low, v_low_next) - v_low[:, t]
        a_low = delta + g * cfg.lam_turn * ~end * a_low
        ret = r[:, t] + g * np.where(end, boot_high, ret)
        link = g * np.where(end, links, link)
        s = start[:, t]
        high = np.where(s, ret - v_high[:, t] + cfg.lam_seg * link * a_seg, 0.0)
        a_seg = np.where(s, high, a_seg)
        adv_low[:, t], adv_high[:, t], ret_term[:, t] = a_low * real, high, ret * real
    return dict(adv_low=adv_low, adv_high=adv_high, ret_term=ret_term)


def time_numpy(batch: dict, repeats: int) -> float:
    """Median seconds of the NumPy turn loop; checks it against the JAX result."""
    unnormalised = dataclasses.replace(CFG, normalize=False)
    got = hae_numpy_turn_loop(batch, unnormalised)
    want = compute_hae(cfg=unnormalised, **batch)
    for name, value in got.items():
        np.testing.assert_allclose(value, np.asarray(getattr(want, name)), atol=1e-3, rtol=1e-4)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        hae_numpy_turn_loop(batch, unnormalised)
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="128x50,1024x50,4096x64,16384x64")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--loop-rows", type=int, default=4096,
                        help="time the loop on at most this many rows and scale linearly")
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores); config {CFG}")
    header = (f"{'B x T':>10} {'compile s':>10} {'jax ms':>9} {'turns/s':>12} {'loop ms':>10} "
              f"{'vs loop':>8} {'numpy ms':>9} {'vs numpy':>9}")
    print(header)
    print("-" * len(header))
    for size in args.sizes.split(","):
        batch_size, turns = (int(x) for x in size.lower().split("x"))
        batch = make_batch(batch_size, turns)
        compile_s, run_s = time_jax(batch, args.repeats)
        loop_s = time_loop(batch, args.loop_rows)
        numpy_s = time_numpy(batch, max(3, args.repeats // 4))
        real_turns = int(batch["mask"].sum())
        print(f"{size:>10} {compile_s:10.3f} {run_s * 1e3:9.3f} {real_turns / run_s:12.3e} "
              f"{loop_s * 1e3:10.1f} {loop_s / run_s:7.0f}x {numpy_s * 1e3:9.2f} "
              f"{numpy_s / run_s:8.1f}x")


if __name__ == "__main__":
    main()
