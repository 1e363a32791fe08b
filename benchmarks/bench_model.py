"""Qwen2 port vs transformers + torch on this CPU: prefill, decode, a train step, loading.

    python benchmarks/bench_model.py                 # 10M, 50M and Qwen2.5-0.5B shapes
    python benchmarks/bench_model.py --models 10m --modes decode train --rounds 5

Each measurement runs in a fresh subprocess with random weights and the same thread count on
both sides; peak memory is the largest anonymous RSS sampled while the workload runs (model
included). Prefill: one forward pass over ``batch x prompt`` tokens
returning all logits (jitted ``compute_logits`` vs ``model(input_ids)``). Decode: greedy
generation of ``new`` tokens after a ``batch x prompt`` prompt, prefill included (jitted
``sampling.generate`` vs ``model.generate``); tokens/s counts generated tokens. Load: our
streaming ``load_hf_checkpoint`` of a random checkpoint, peak memory growth vs the weights' size.
Backward (JAX only): one jitted ``value_and_grad`` of the mean token log-prob (``forward`` +
``token_logprobs``, as the PPO loss runs them) over ``batch x prompt`` tokens.
``--compare DIR`` runs our side only, this checkout against the ``hiper_jax`` package in
``DIR`` (e.g. an older checkout), in alternating processes, and prints min/median/max tokens/s
of each side over the rounds.
Train: one SFT step, mean next-token cross-entropy over ``batch x prompt`` tokens, backward and
AdamW (jitted, donated state vs ``loss.backward(); AdamW.step()``); tokens/s counts the batch's
tokens. Each of ``--rounds`` interleaved rounds starts one fresh process per side (torch, then
each JAX variant), which times ``--repeats`` runs after one warm-up (compilation excluded and
reported separately) and reports its best; the table gives min / median / max over the rounds,
the ratio of the medians and the range of the per-round ratios (runs of one round met the same
machine). Decode runs on both parameter layouts: stacked
(``lax.scan`` over layers) and unstacked (unrolled layers); train on stacked weights with the
layer scan looped and unrolled (``unrolled``: ``Qwen2Config.scan_unroll`` = the depth, the
trainer's ``model.scan_unroll``). Torch runs in float32; the JAX
bfloat16 rows (bf16 weights and compute, as the sampler runs on TPU) are for information, not
part of the like-for-like comparison.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import os
import subprocess
import sys
import tempfile
import threading
import time

MODELS = {
    # name: (HF config kwargs, prefill batch, decode batch)
    "10m": (dict(vocab_size=16384, hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True), 8, 8),
    "50m": (dict(vocab_size=32768, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True), 8, 8),
    "0.5b": (dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True), 2, 2),
}
PROMPT_TOKENS = 256
DECODE_PROMPT_TOKENS = 64
NEW_TOKENS = 32


def _rss_mib(field: str = "VmRSS") -> float:
    """Resident memory of this process in MiB (``RssAnon``: without file-backed pages)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


class _AnonPeak:
    """Samples anonymous RSS every 5 ms in a thread; ``peak`` is the largest seen.

    safetensors reads through mmap, so file pages inflate plain RSS (and ru_maxrss) by the
    checkpoint size although the kernel can drop them at any time; anonymous memory is what the
    loader itself holds."""

    def __init__(self) -> None:
        self.peak = _rss_mib("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_mib("RssAnon"))

    def __enter__(self) -> "_AnonPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _measure(run, count: int, repeats: int) -> dict:
    """Warm-up (compilation) then the best of ``repeats`` runs; anonymous memory is sampled
    throughout, so the peak covers the workload with the model loaded (not its creation)."""
    with _AnonPeak() as anon:
        start = time.perf_counter()
        run()
        warmup = time.perf_counter() - start
        best = _best_time(run, repeats)
    return dict(tokens_per_s=count / best, best_s=best, warmup_s=warmup,
                peak_anon_mib=anon.peak)


def worker_torch(name: str, mode: str, repeats: int, threads: int) -> dict:
    import torch
    import transformers

    torch.set_num_threads(threads)
    kwargs, prefill_batch, decode_batch = MODELS[name]
    config = transformers.Qwen2Config(**kwargs, rope_theta=1e6, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(0)
    if mode == "prefill":
        tokens = torch.randint(3, config.vocab_size, (prefill_batch, PROMPT_TOKENS), generator=gen)

        def run():
            with torch.inference_mode():
                model(input_ids=tokens).logits.sum().item()
        count = prefill_batch * PROMPT_TOKENS
    elif mode == "train":
        # One SFT step: forward over every position, cross-entropy on the next tokens,
        # backward, AdamW (dropout is 0 in this config, so train mode changes nothing else).
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
        tokens = torch.randint(3, config.vocab_size, (prefill_batch, PROMPT_TOKENS), generator=gen)

        def run():
            optimizer.zero_grad(set_to_none=True)
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            optimizer.step()
            loss.item()
        count = prefill_batch * PROMPT_TOKENS
    else:
        tokens = torch.randint(3, config.vocab_size, (decode_batch, DECODE_PROMPT_TOKENS),
                               generator=gen)

        def run():
            with torch.inference_mode():
                out = model.generate(input_ids=tokens, attention_mask=torch.ones_like(tokens),
                                     max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                     do_sample=False, pad_token_id=0)
            assert out.shape[1] == DECODE_PROMPT_TOKENS + NEW_TOKENS
        count = decode_batch * NEW_TOKENS
    return _measure(run, count, repeats)


def worker_jax(name: str, mode: str, repeats: int, threads: int, layout: str,
               dtype: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from hiper_jax.models import qwen2
    from hiper_jax.sampling import SamplingConfig, generate

    kwargs, prefill_batch, decode_batch = MODELS[name]
    config = qwen2.Qwen2Config(**kwargs, rope_theta=1e6, param_dtype=dtype, compute_dtype=dtype)
    params = qwen2.init_params(jax.random.key(0), config)
    if layout == "unstacked":
        params = qwen2.unstack_layers(params)
    elif layout == "unrolled":  # stacked weights, the layer scan unrolled (model.scan_unroll)
        config = config.replace(scan_unroll=config.num_hidden_layers)
    jax.block_until_ready(params)
    rng = np.random.default_rng(0)
    if mode == "prefill":
        tokens = jnp.asarray(rng.integers(3, config.vocab_size, (prefill_batch, PROMPT_TOKENS)),
                             jnp.int32)
        run = lambda: qwen2.compute_logits(params, config, tokens).block_until_ready()
        count = prefill_batch * PROMPT_TOKENS
    elif mode == "backward":
        tokens = jnp.asarray(rng.integers(3, config.vocab_size, (prefill_batch, PROMPT_TOKENS)),
                             jnp.int32)

        def loss(p):
            hidden, _ = qwen2.forward(p, config, tokens)
            return jnp.mean(qwen2.token_logprobs(p, config, hidden[:, :-1], tokens[:, 1:]).logprobs)

        step = jax.jit(jax.value_and_grad(loss))
        run = lambda: jax.block_until_ready(step(params))
        count = prefill_batch * PROMPT_TOKENS
    elif mode == "train":
        import optax

        # The torch side's SFT step: mean next-token cross-entropy, backward, AdamW.
        tokens = jnp.asarray(rng.integers(3, config.vocab_size, (prefill_batch, PROMPT_TOKENS)),
                             jnp.int32)

        def loss(p):
            hidden, _ = qwen2.forward(p, config, tokens)
            return -jnp.mean(qwen2.token_logprobs(p, config, hidden[:, :-1], tokens[:, 1:]).logprobs)

        tx = optax.adamw(1e-4, weight_decay=0.0)

        @functools.partial(jax.jit, donate_argnums=(0, 1))
        def train_step(p, opt_state):
            value, grads = jax.value_and_grad(loss)(p)
            updates, opt_state = tx.update(grads, opt_state, p)
            return optax.apply_updates(p, updates), opt_state, value

        state = [params, tx.init(params)]

        def run():
            state[0], state[1], value = train_step(*state)
            value.block_until_ready()
        count = prefill_batch * PROMPT_TOKENS
    else:
        tokens = jnp.asarray(rng.integers(3, config.vocab_size,
                                          (decode_batch, DECODE_PROMPT_TOKENS)), jnp.int32)
        sampling = SamplingConfig(max_new_tokens=NEW_TOKENS, greedy=True)

        def run():
            out = generate(params, config, tokens, None, jax.random.key(0), sampling)
            assert int(out.lengths.min()) == NEW_TOKENS
        count = decode_batch * NEW_TOKENS
    return _measure(run, count, repeats)


def worker_save(name: str, path: str) -> dict:
    import jax

    from hiper_jax.models import qwen2

    config = qwen2.Qwen2Config(**MODELS[name][0], rope_theta=1e6)
    qwen2.save_hf_checkpoint(qwen2.init_params(jax.random.key(0), config), config, path,
                             progress=False)
    return dict(param_mib=qwen2.count_params(config) * 4 / 2 ** 20)


def worker_load(path: str) -> dict:
    import jax

    from hiper_jax.models import qwen2

    jax.block_until_ready(jax.numpy.zeros(1))
    anon_before = _rss_mib("RssAnon")
    start = time.perf_counter()
    with _AnonPeak() as anon:
        config, params = qwen2.load_hf_checkpoint(path, progress=False)
        jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    per_tensor = [x.nbytes / (config.num_hidden_layers if path[0].key == "layers" else 1)
                  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]]
    return dict(load_s=seconds, anon_growth_mib=anon.peak - anon_before,
                param_mib=qwen2.count_params(config) * 4 / 2 ** 20,
                largest_mib=max(per_tensor) / 2 ** 20)


def _spread(values: list[float]) -> str:
    """``min / median / max`` of tokens/s."""
    return f"{min(values):.1f} / {statistics.median(values):.1f} / {max(values):.1f}"


def _spawn(args: list[str], threads: int, package_dir: str = "") -> dict:
    """Runs one worker in a fresh process; ``package_dir``: import ``hiper_jax`` from there."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")
    env.pop("XLA_FLAGS", None)
    if package_dir:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_dir, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, __file__, "--worker", *args], env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"worker {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(args: argparse.Namespace) -> None:
    """This checkout's model code against the one in ``args.compare``: alternating processes,
    min / median / max over the rounds of each process's best-of-repeats tokens/s."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sides = {"this": here, "other": os.path.abspath(args.compare)}
    print(f"this: {here}\nother: {sides['other']}\nthreads={args.threads}, {args.rounds} "
          f"alternating rounds x best of {args.repeats} runs; tokens/s min / median / max")
    cases = [("prefill", "stacked"), ("decode", "stacked"), ("decode", "unstacked"),
             ("backward", "stacked")]
    for name in args.models:
        for mode, layout in cases:
            rates: dict[str, list[float]] = {side: [] for side in sides}
            for _ in range(args.rounds):
                for side, package_dir in sides.items():
                    result = _spawn(["jax", name, mode, layout, "float32", "--repeats",
                                     str(args.repeats)], args.threads, package_dir)
                    if os.path.dirname(result["package"]) != package_dir:
                        raise RuntimeError(f"{side} imported {result['package']}")
                    rates[side].append(result["tokens_per_s"])
            stats = {side: (min(r), statistics.median(r), max(r)) for side, r in rates.items()}
            print(f"{name:6} {mode:8} {layout:9} "
                  + "  ".join(f"{side} {lo:8.1f} {mid:8.1f} {hi:8.1f}"
                              for side, (lo, mid, hi) in stats.items())
                  + f"  median ratio {stats['this'][1] / stats['other'][1]:.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per process")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved processes per side (min / median / max over them)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["prefill", "decode", "train"],
                        choices=["prefill", "decode", "train"])
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument("--compare", metavar="DIR",
                        help="JAX only: this checkout against the hiper_jax package in DIR")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        kind, *rest = args.worker
        if kind == "jax":
            import hiper_jax

            name, mode, layout, dtype = rest
            result = worker_jax(name, mode, args.repeats, args.threads, layout, dtype)
            print(json.dumps(dict(result, package=os.path.dirname(hiper_jax.__file__))))
        elif kind == "torch":
            name, mode = rest
            print(json.dumps(worker_torch(name, mode, args.repeats, args.threads)))
        elif kind == "save":
            print(json.dumps(worker_save(*rest)))
        else:
            print(json.dumps(worker_load(*rest)))
        return

    if args.compare:
        compare(args)
        return
    print(f"threads={args.threads}, {args.rounds} interleaved rounds (a fresh process per side "
          f"per round, each its best of {args.repeats} runs); tokens/s min / median / max over the "
          f"rounds; prefill and train {PROMPT_TOKENS} tokens/row; decode {DECODE_PROMPT_TOKENS}-token "
          f"prompt + {NEW_TOKENS} new, greedy; ratio: of the medians, and min-max of the per-round ratios")
    header = (f"{'model':6} {'mode':8} {'jax layers':10} {'jax dtype':9} {'batch':>5} "
              f"{'jax tok/s (min/med/max)':>26} {'torch tok/s (min/med/max)':>26} {'ratio':>6} "
              f"{'per round':>12} {'jax peak MiB':>12} {'torch peak MiB':>14} {'jax compile s':>13}")
    print(header)
    print("-" * len(header))
    for name in args.models:
        for mode in args.modes:
            batch = MODELS[name][2 if mode == "decode" else 1]
            repeats = ["--repeats", str(args.repeats)]
            variants = {"prefill": [("stacked", "float32"), ("stacked", "bfloat16")],
                        "decode": [("stacked", "float32"), ("unstacked", "float32"), ("unstacked", "bfloat16")],
                        "train": [("stacked", "float32"), ("unrolled", "float32")]}[mode]
            # Interleaved rounds: in each, every side runs once, so the per-round ratios compare
            # runs that met the same machine.
            results: dict = {}
            for _ in range(args.rounds):
                runs = {"torch": ["torch", name, mode, *repeats]}
                runs.update({variant: ["jax", name, mode, *variant, *repeats]
                             for variant in variants})
                for side, worker_args in runs.items():
                    results.setdefault(side, []).append(_spawn(worker_args, args.threads))
            theirs = [r["tokens_per_s"] for r in results["torch"]]
            for layout, dtype in variants:
                ours = [r["tokens_per_s"] for r in results[(layout, dtype)]]
                per_round = [a / b for a, b in zip(ours, theirs)]
                best = max(results[(layout, dtype)], key=lambda r: r["tokens_per_s"])
                torch_best = max(results["torch"], key=lambda r: r["tokens_per_s"])
                print(f"{name:6} {mode:8} {layout:10} {dtype:9} {batch:5d} {_spread(ours):>26} "
                      f"{_spread(theirs):>26} {statistics.median(ours) / statistics.median(theirs):5.2f}x "
                      f"{min(per_round):5.2f}-{max(per_round):5.2f}x "
                      f"{best['peak_anon_mib']:12.0f} {torch_best['peak_anon_mib']:14.0f} "
                      f"{best['warmup_s'] - best['best_s']:13.1f}", flush=True)
    if args.skip_load:
        return
    print("\ncheckpoint loading (fp32, one device): peak anonymous memory growth while loading")
    for name in args.models:
        with tempfile.TemporaryDirectory() as path:
            _spawn(["save", name, path], args.threads)
            load = _spawn(["load", path], args.threads)
        growth = load["anon_growth_mib"]
        print(f"{name:6} weights {load['param_mib']:8.0f} MiB  peak growth {growth:8.0f} MiB "
              f"({growth / load['param_mib']:.2f}x)  largest tensor {load['largest_mib']:.0f} MiB"
              f"  {load['load_s']:.1f} s", flush=True)


if __name__ == "__main__":
    main()
