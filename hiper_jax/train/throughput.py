"""Time and FLOP accounting of a run: model FLOPs from the model config, the devices' peak, MFU.

Model FLOPs count what the model must compute for the *real* tokens (padding excluded, no
recomputation under remat), the usual definition behind MFU (PaLM, appendix B):

- forward, per token: ``2 * P`` for the ``P`` weights it multiplies (q/k/v/o projections, the
  MLP, and the LM head where logits are taken; embedding lookups and norms are not matmuls),
  plus ``2 * 2 * layers * S * (heads * head_dim)`` for attention over ``S`` keys (scores and
  the weighted sum of values);
- backward: twice the forward.

A pass over rows of lengths ``l_i`` attends ``S = l_i`` keys per query, as the model computes
(it evaluates the full masked square); a decode step attends to its context so far. So a set
of tokens is summarised by its count and its query-key pairs (:class:`TokenSet`), and FLOPs are
linear in both.

One training iteration (:func:`iteration_flops`) is the rollout's generation (prefill of every
prompt, then one step per generated token), the log-prob/value passes over the update batch
(actor; critic unless the estimator needs none; the reference policy when a KL term is on),
and the PPO steps (forward and backward of the actor, and of the critic's backbone when it is
a separate model; a critic sharing the actor's backbone adds only its heads).

MFU is model FLOPs per second over the peak of the devices that ran them: a table of bf16
dense peaks for TPUs and common GPUs, else (CPU, unknown accelerators) a jitted matmul timed
once per process.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Optional, Sequence

import numpy as np

from hiper_jax.models.qwen2.config import Qwen2Config

NUM_VALUE_HEADS = 3

# bf16 dense peak FLOP/s per chip (no structured sparsity), matched as a lowercase substring of
# ``jax.Device.device_kind``; the first match wins, so longer names come first.
# TPUs: the Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/v2, v3, v4, v5e,
# v5p, v6e): "peak compute per chip (bf16)". JAX names v5e "TPU v5 lite", v5p "TPU v5", v6e
# "TPU v6 lite". GPUs: NVIDIA's data sheets (A100, H100, H200, L4, L40S, A10; the sheets list
# sparse figures with an asterisk, halved here). T4 has no bf16: its fp16 tensor-core peak.
PEAK_FLOPS_TABLE: tuple[tuple[str, float], ...] = (
    ("tpu v6 lite", 918e12), ("tpu v6e", 918e12),
    ("tpu v5 lite", 197e12), ("tpu v5e", 197e12),
    ("tpu v5p", 459e12), ("tpu v5", 459e12),
    ("tpu v4", 275e12), ("tpu v3", 123e12), ("tpu v2", 45e12),
    ("h100 pcie", 756e12), ("h100 nvl", 835e12), ("h100", 989e12), ("h200", 989e12),
    ("a100", 312e12), ("l40s", 362e12), ("l4", 121e12), ("a10", 125e12), ("t4", 65e12),
)


# --- model FLOPs ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TokenSet:
    """The tokens of a model pass: how many, and how many query-key pairs their attention spans.

    Attributes:
      tokens: token positions computed.
      attention_pairs: sum over those tokens of the keys each attends to.
    """

    tokens: float = 0.0
    attention_pairs: float = 0.0

    @classmethod
    def of_rows(cls, lengths) -> "TokenSet":
        """Rows of ``lengths [N]`` real tokens, each token attending to its whole row."""
        lengths = np.asarray(lengths, np.float64)
        return cls(float(lengths.sum()), float(np.square(lengths).sum()))

    def __add__(self, other: "TokenSet") -> "TokenSet":
        return TokenSet(self.tokens + other.tokens, self.attention_pairs + other.attention_pairs)

    def __mul__(self, times: float) -> "TokenSet":
        return TokenSet(self.tokens * times, self.attention_pairs * times)


def matmul_params(config: Qwen2Config, lm_head: bool = True) -> int:
    """Weights one token multiplies in a forward pass (biases, norms and embeddings excluded)."""
    e = config.hidden_size
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    per_layer = e * q + 2 * e * kv + q * e + 3 * e * config.intermediate_size
    return config.num_hidden_layers * per_layer + (e * config.vocab_size if lm_head else 0)


def forward_flops(config: Qwen2Config, tokens: TokenSet, lm_head: bool = True) -> float:
    """Model FLOPs of a forward pass over ``tokens`` (logits at every token when ``lm_head``)."""
    attention = 2 * 2 * config.num_hidden_layers * config.num_attention_heads * config.head_dim
    return 2.0 * matmul_params(config, lm_head) * tokens.tokens + attention * tokens.attention_pairs


def critic_forward_flops(config: Qwen2Config, tokens: TokenSet, separate: bool) -> float:
    """A critic's forward: its own backbone (no LM head) when ``separate``, and the value heads."""
    heads = 2.0 * config.hidden_size * NUM_VALUE_HEADS * tokens.tokens
    return heads + (forward_flops(config, tokens, lm_head=False) if separate else 0.0)


def generation_tokens(prompt_lengths, response_lengths) -> tuple[TokenSet, TokenSet]:
    """``(prefill, decode)`` token sets of generating ``response_lengths [N]`` tokens after
    ``prompt_lengths [N]``: the prompt attends to itself; the j-th new token (j = 1..R) to
    ``P + j`` positions."""
    p = np.asarray(prompt_lengths, np.float64)
    r = np.asarray(response_lengths, np.float64)
    decode_pairs = r * p + r * (r + 1) / 2
    return TokenSet.of_rows(p), TokenSet(float(r.sum()), float(decode_pairs.sum()))


def generation_flops(config: Qwen2Config, prefill: TokenSet, decode: TokenSet) -> float:
    """Model FLOPs of generation: the prefill (logits only at the last prompt token, counted with
    the first new token) and one step per new token, each with logits."""
    return forward_flops(config, prefill, lm_head=False) + forward_flops(config, decode, lm_head=True)


def iteration_flops(config: Qwen2Config, *, prefill: TokenSet, decode: TokenSet, passes: TokenSet,
                    update: TokenSet, separate_critic: bool, uses_critic: bool,
                    reference_pass: bool, actor_pass: bool = True) -> dict[str, float]:
    """Model FLOPs of one training iteration by stage: ``rollout``, ``passes``, ``update``, ``total``.

    Args:
      config: the policy's architecture (a separate critic has the same backbone).
      prefill, decode: the rollout's generation (:func:`generation_tokens`).
      passes: the real tokens of the update batch (one log-prob/value pass over them).
      update: the real tokens the PPO steps trained on, summed over epochs.
      separate_critic: the critic has its own backbone (else heads on the actor's).
      uses_critic: the estimator reads and trains values (False for GRPO/RLOO).
      reference_pass: the reference policy's log-probs are computed (a KL term is on).
      actor_pass: the actor's pass runs (False when the old log-probs are the sampler's and
        no critic needs its values).
    """
    actor = forward_flops(config, passes)
    critic = critic_forward_flops(config, passes, separate_critic) if uses_critic else 0.0
    passes_flops = actor * (int(actor_pass) + int(reference_pass)) + critic
    step_critic = critic_forward_flops(config, update, separate_critic) if uses_critic else 0.0
    update_flops = 3.0 * (forward_flops(config, update) + step_critic)  # forward + 2x backward
    rollout = generation_flops(config, prefill, decode)
    return {"rollout": rollout, "passes": passes_flops, "update": update_flops,
            "total": rollout + passes_flops + update_flops}


# --- peak FLOP/s ----------------------------------------------------------------------------


def table_peak_flops(device_kind: str) -> Optional[float]:
    """The bf16 dense peak FLOP/s of one chip of ``device_kind`` (None when not in the table)."""
    kind = device_kind.lower()
    return next((flops for name, flops in PEAK_FLOPS_TABLE if name in kind), None)


@functools.lru_cache(maxsize=None)
def measured_matmul_flops(size: int = 1024, dtype: str = "float32", repeats: int = 5) -> float:
    """FLOP/s of a jitted ``[size, size] @ [size, size]`` matmul on the default device, best of
    ``repeats`` timed runs after a warm-up; measured once per process and argument set."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size ** 3 / max(best, 1e-12)


@dataclasses.dataclass(frozen=True)
class Peak:
    """Peak FLOP/s of the devices a run uses and where the number comes from."""

    flops: float
    source: str


def device_peak(devices: Optional[Sequence] = None, dtype: str = "float32") -> Peak:
    """The summed peak of ``devices`` (default: all of them): the table's per-chip figure times
    the chip count; else a matmul in ``dtype`` measured here. CPU devices share their host's
    cores (simulated devices too), so a CPU peak is one measurement per host, not per device."""
    import jax

    devices = list(devices) if devices is not None else jax.devices()
    kind = devices[0].device_kind
    per_chip = table_peak_flops(kind)
    if per_chip is not None:
        return Peak(per_chip * len(devices), f"{kind} x{len(devices)}, bf16 dense peak from the table")
    if devices[0].platform == "cpu":
        hosts = len({getattr(d, "process_index", 0) for d in devices})
        return Peak(measured_matmul_flops(1024, dtype) * hosts,
                    f"cpu x{hosts} host(s), measured {dtype} 1024^3 matmul")
    measured = measured_matmul_flops(4096, dtype)
    return Peak(measured * len(devices), f"{kind} x{len(devices)}, measured {dtype} 4096^3 matmul")


def mfu(flops: float, seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the peak."""
    return flops / max(seconds, 1e-12) / max(peak_flops, 1e-12)


# --- per-iteration record and run summary -----------------------------------------------------


def throughput_metrics(flops: dict[str, float], times: dict[str, float], generated_tokens: float,
                       update_real_tokens: float, update_computed_tokens: float,
                       peak: Peak) -> dict[str, float]:
    """The ``throughput/...`` metrics of one iteration.

    Args:
      flops: :func:`iteration_flops`'s output.
      times: seconds of ``rollout``, ``update`` and the whole ``iteration`` (keys of those names).
      generated_tokens: tokens the rollout sampled.
      update_real_tokens, update_computed_tokens: tokens of the PPO steps' rows that are real,
        and all positions those steps computed (padding included), over all epochs.
      peak: the devices' peak.
    """
    return {
        "throughput/generated_tokens": generated_tokens,
        "throughput/generated_tokens_per_s": generated_tokens / max(times["rollout"], 1e-12),
        "throughput/update_tokens": update_real_tokens,
        "throughput/update_computed_tokens": update_computed_tokens,
        "throughput/update_tokens_per_s": update_real_tokens / max(times["update"], 1e-12),
        "throughput/update_real_fraction": update_real_tokens / max(update_computed_tokens, 1.0),
        "throughput/flops": flops["total"],
        "throughput/rollout_flops": flops["rollout"],
        "throughput/passes_flops": flops["passes"],
        "throughput/update_flops": flops["update"],
        "throughput/flops_per_s": flops["total"] / max(times["iteration"], 1e-12),
        "throughput/peak_flops": peak.flops,
        "throughput/mfu": mfu(flops["total"], times["iteration"], peak.flops),
        "throughput/update_mfu": mfu(flops["update"], times["update"], peak.flops),
    }


# The time split of the summary: (label, metric); "other" is what the iteration spent elsewhere
# (packing the batch, assigning token advantages, the host's share of the update).
TIME_SPLIT = (("rollout", "time/rollout_s"), ("log-prob/value", "time/passes_s"),
              ("advantages", "time/advantages_s"), ("update", "time/update_s"),
              ("eval", "time/eval_s"), ("checkpoint", "time/checkpoint_s"))


def summary_line(records: Sequence[dict], peak_source: str = "") -> str:
    """One line on a run's throughput from its metric records ("" when none has the accounting).

    Sums over the training iterations: seconds per iteration and its split (evaluation and
    checkpoints included, as shares of their sum with the iterations), generated and update
    tokens per second, the real-token fraction of the update rows, model FLOP/s and MFU.
    """
    rows = [r for r in records if "throughput/flops" in r]
    if not rows:
        return ""

    def total(key: str) -> float:
        return float(sum(r.get(key, 0.0) for r in records))

    iteration_s = sum(r["time/iteration_s"] for r in rows)
    wall = iteration_s + total("time/eval_s") + total("time/checkpoint_s")
    parts = [(label, total(key)) for label, key in TIME_SPLIT]
    other = iteration_s - sum(seconds for label, seconds in parts if label not in ("eval", "checkpoint"))
    split = ", ".join(f"{label} {seconds / wall:.0%}" for label, seconds in parts + [("other", other)]
                      if seconds > 0)
    flops = sum(r["throughput/flops"] for r in rows)
    peak = rows[-1]["throughput/peak_flops"]
    computed = total("throughput/update_computed_tokens")
    line = (f"throughput: {iteration_s / len(rows):.1f} s per iteration ({split}); "
            f"{total('throughput/generated_tokens') / max(total('time/rollout_s'), 1e-12):,.0f} generated tok/s, "
            f"{total('throughput/update_tokens') / max(total('time/update_s'), 1e-12):,.0f} update tok/s, "
            f"update rows {total('throughput/update_tokens') / max(computed, 1.0):.0%} real tokens; "
            f"model {_si(flops / max(iteration_s, 1e-12))}FLOP/s = MFU {mfu(flops, iteration_s, peak):.2%} "
            f"of {_si(peak)}FLOP/s")
    return line + (f" ({peak_source})" if peak_source else "")


def _si(value: float) -> str:
    """``1.5e12`` -> ``"1.50 T"``."""
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}"
    return f"{value:.2f} "
