"""Qwen2.5-VL port vs transformers + torch on this CPU: prefill of text+image sequences, and
greedy decoding after them.

    python benchmarks/bench_vlm.py                    # the tiny and small shapes, 3 rounds
    python benchmarks/bench_vlm.py --models tiny --rounds 5 --repeats 3
    python benchmarks/bench_vlm.py --modes decode --new-tokens 32

One prefill is the whole multimodal forward pass returning all logits: the vision tower over
every image's patches, the placeholders replaced by its features, the 3-D positions, the
language model (ours: ``qwen2_5_vl.compute_logits``, jitted vision tower and decoder plus the
host-side positions; theirs: ``Qwen2_5_VLForConditionalGeneration(...)`` under ``no_grad`` with
its default attention). Both sides load the same random checkpoint (fp32), written once. Each
round runs one process per side, alternating, each timing ``--repeats`` calls after one
warm-up (compilation excluded, reported separately); the table gives min / median / max over the
rounds of each process's best call, in tokens/s (all ``batch x length`` positions) and images/s.

One decode is a whole greedy generation of ``--new-tokens`` tokens per row after the same prompts,
the prefill included (ours: :func:`hiper_jax.models.qwen2_5_vl.sampling.generate`, one jitted
program with the decode loop on the device, patches bucketed; theirs: ``generate(do_sample=False)``
with its KV cache); its rate is new tokens/s (``batch x new_tokens`` per call). Both sides must
emit the same tokens (printed as a check).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

IMAGE, VIDEO, START, END = 4000, 4001, 4002, 4003

MODELS = {
    # name: (text config, vision config, image side in pixels, images per row, batch)
    "tiny": (dict(vocab_size=4096, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                   "mrope_section": [4, 6, 6]}),
             dict(depth=4, hidden_size=64, intermediate_size=176, num_heads=4, patch_size=14,
                  temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                  out_hidden_size=128, fullatt_block_indexes=[1, 3]),
             224, 1, 2),
    "small": (dict(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                   num_attention_heads=6, num_key_value_heads=2,
                   rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                    "mrope_section": [8, 12, 12]}),
              dict(depth=8, hidden_size=256, intermediate_size=704, num_heads=4, patch_size=14,
                   temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                   out_hidden_size=384, fullatt_block_indexes=[3, 7]),
              336, 1, 2),
}
TEXT_TOKENS = 96  # text tokens per row around the image


def _inputs(name: str):
    """``(tokens [B, L], pixel_values [N, C*T*P*P], grid [num_images, 3])`` numpy, seeded."""
    import numpy as np

    _, vision, side, per_row, batch = MODELS[name]
    patch, merge = vision["patch_size"], vision["spatial_merge_size"]
    cells = side // patch
    grid = [(1, cells, cells)] * (per_row * batch)
    placeholders = cells * cells // merge ** 2
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(batch):
        row = rng.integers(10, 3000, TEXT_TOKENS // 2).tolist()
        for _ in range(per_row):
            row += [START] + [IMAGE] * placeholders + [END]
        rows.append(row + rng.integers(10, 3000, TEXT_TOKENS // 2).tolist())
    dim = 3 * vision["temporal_patch_size"] * patch * patch
    pixels = rng.normal(size=(len(grid) * cells * cells, dim)).astype(np.float32)
    return np.array(rows), pixels, np.array(grid)


def worker_save(name: str, path: str) -> dict:
    import torch
    import transformers

    text, vision, *_ = MODELS[name]
    torch.manual_seed(0)
    config = transformers.Qwen2_5_VLConfig(
        text_config=dict(text, bos_token_id=1, eos_token_id=2), vision_config=vision,
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START,
        vision_end_token_id=END)
    model = transformers.Qwen2_5_VLForConditionalGeneration(config)
    model.save_pretrained(path)
    return {"params": sum(p.numel() for p in model.parameters())}


def _timed(run, repeats: int) -> tuple[float, float, list]:
    start = time.perf_counter()
    out = run()
    warmup = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return warmup, min(times), out


def worker_torch(name: str, path: str, repeats: int, threads: int, mode: str,
                 new_tokens: int) -> dict:
    import numpy as np
    import torch
    import transformers

    torch.set_num_threads(threads)
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(path).eval()
    tokens, pixels, grid = _inputs(name)
    ids = torch.as_tensor(tokens)
    kwargs = dict(pixel_values=torch.as_tensor(pixels), image_grid_thw=torch.as_tensor(grid),
                  mm_token_type_ids=(ids == IMAGE).int())

    def prefill():
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False, **kwargs).logits.numpy()

    def decode():
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, eos_token_id=None, pad_token_id=0, **kwargs)
        return out[:, ids.shape[1]:].numpy()

    warmup, best, out = _timed(prefill if mode == "prefill" else decode, repeats)
    return {"warmup_s": warmup, "best_s": best, "checksum": _checksum(out, mode)}


def worker_jax(name: str, path: str, repeats: int, mode: str, new_tokens: int) -> dict:
    import jax
    import numpy as np

    from hiper_jax.models import qwen2_5_vl
    from hiper_jax.models.qwen2_5_vl import sampling as vl_sampling
    from hiper_jax.sampling import SamplingConfig

    config, params = qwen2_5_vl.load_hf_checkpoint(path, progress=False)
    tokens, pixels, grid = _inputs(name)
    greedy = SamplingConfig(max_new_tokens=new_tokens, greedy=True)

    def prefill():
        return np.asarray(jax.block_until_ready(
            qwen2_5_vl.compute_logits(params, config, tokens, pixels, grid)))

    def decode():
        out = vl_sampling.generate(params, config, tokens, None, pixels, grid,
                                   jax.random.key(0), greedy)
        return np.asarray(jax.block_until_ready(out.tokens))

    warmup, best, out = _timed(prefill if mode == "prefill" else decode, repeats)
    return {"warmup_s": warmup, "best_s": best, "checksum": _checksum(out, mode)}


def _checksum(out, mode: str):
    """Prefill: the mean |logit|; decode: the generated tokens."""
    import numpy as np

    return float(np.abs(out).mean()) if mode == "prefill" else np.asarray(out).tolist()


def _spawn(args: list[str], threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), JAX_PLATFORMS="cpu",
               TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, __file__, "--worker", *args], env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _spread(values: list[float]) -> str:
    return f"{min(values):8.1f} / {statistics.median(values):8.1f} / {max(values):8.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--modes", nargs="+", default=["prefill", "decode"],
                        choices=["prefill", "decode"])
    parser.add_argument("--new-tokens", type=int, default=32, help="decode: tokens per row")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved processes per side")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per process")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, name, *rest = args.worker
        if kind == "save":
            result = worker_save(name, rest[0])
        elif kind == "torch":
            result = worker_torch(name, rest[0], int(rest[1]), int(rest[2]), rest[3], int(rest[4]))
        else:
            result = worker_jax(name, rest[0], int(rest[1]), rest[2], int(rest[3]))
        print(json.dumps(result))
        return

    print(f"{'model':6} {'mode':7} {'side':6} {'params':>9} {'B x L':>9} {'images':>6}  "
          f"{'tokens/s min / median / max':>30}  {'images/s median':>15} {'compile s':>9}")
    for name in args.models:
        tokens, _, grid = _inputs(name)
        with tempfile.TemporaryDirectory() as path:
            count = _spawn(["save", name, path], args.threads)["params"]
            for mode in args.modes:
                run = [mode, str(args.new_tokens)]
                results: dict[str, list[dict]] = {"jax": [], "torch": []}
                for _ in range(args.rounds):
                    results["jax"].append(_spawn(["jax", name, path, str(args.repeats), *run],
                                                 args.threads))
                    results["torch"].append(_spawn(["torch", name, path, str(args.repeats),
                                                    str(args.threads), *run], args.threads))
                # Prefill rates count every prompt position; decode rates count new tokens.
                per_call = tokens.size if mode == "prefill" else tokens.shape[0] * args.new_tokens
                for side, runs in results.items():
                    rates = [per_call / r["best_s"] for r in runs]
                    images = statistics.median(len(grid) / r["best_s"] for r in runs)
                    warmup = statistics.median(r["warmup_s"] - r["best_s"] for r in runs)
                    print(f"{name:6} {mode:7} {side:6} {count / 1e6:8.2f}M "
                          f"{tokens.shape[0]:>3} x {tokens.shape[1]:<4} {len(grid):>6}  "
                          f"{_spread(rates):>30}  {images:15.1f} {warmup:9.1f}")
                sums = {side: runs[0]["checksum"] for side, runs in results.items()}
                if mode == "prefill":
                    print(f"{name:6} mean |logit|: jax {sums['jax']:.6f}, "
                          f"torch {sums['torch']:.6f}")
                else:
                    print(f"{name:6} greedy tokens equal: {sums['jax'] == sums['torch']}")


if __name__ == "__main__":
    main()
