"""Time and FLOP accounting: the FLOP formula against a hand count and XLA's own count, the peak
table, MFU of a measured CPU forward, and the run's summary line."""

import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hiper_jax.models import qwen2
from hiper_jax.train import throughput as tp

# 2 layers, hidden 4, 2 query heads and 1 key/value head of width 2, MLP 6, vocab 10.
TINY = qwen2.Qwen2Config(vocab_size=10, hidden_size=4, intermediate_size=6, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=2)


def test_forward_flops_equal_a_hand_count():
    # Per layer: q 4x4, k 4x2, v 4x2, o 4x4, MLP gate/up/down 3 x 4x6: 16+8+8+16+72 = 120
    # weights; 2 layers + LM head 4x10 = 280.
    assert tp.matmul_params(TINY) == 280 and tp.matmul_params(TINY, lm_head=False) == 240
    # Rows of 3 and 1 tokens: 4 tokens, 3*3 + 1*1 = 10 query-key pairs. Attention per pair and
    # layer: 2 (scores) + 2 (values) FLOPs per query channel, 2 heads x 2 channels: 16; 2 layers.
    rows = tp.TokenSet.of_rows([3, 1])
    assert (rows.tokens, rows.attention_pairs) == (4, 10)
    assert tp.forward_flops(TINY, rows) == 2 * 280 * 4 + 32 * 10
    assert tp.forward_flops(TINY, rows, lm_head=False) == 2 * 240 * 4 + 32 * 10
    # A separate critic: its backbone without the LM head plus 3 heads; a shared one: the heads.
    assert tp.critic_forward_flops(TINY, rows, separate=True) == 2 * 240 * 4 + 32 * 10 + 2 * 4 * 3 * 4
    assert tp.critic_forward_flops(TINY, rows, separate=False) == 2 * 4 * 3 * 4


def test_generation_counts_each_new_token_against_its_context():
    prefill, decode = tp.generation_tokens([2, 5], [3, 1])
    assert (prefill.tokens, prefill.attention_pairs) == (7, 4 + 25)
    assert (decode.tokens, decode.attention_pairs) == (4, (3 + 4 + 5) + 6)
    assert tp.generation_flops(TINY, prefill, decode) == (
        tp.forward_flops(TINY, prefill, lm_head=False) + tp.forward_flops(TINY, decode))


def test_iteration_flops_by_stage():
    prefill, decode = tp.generation_tokens([8], [4])
    passes, update = tp.TokenSet.of_rows([12, 6]), tp.TokenSet.of_rows([12, 6]) * 2  # 2 epochs
    common = dict(prefill=prefill, decode=decode, passes=passes, update=update)
    actor_pass = tp.forward_flops(TINY, passes)
    separate = tp.iteration_flops(TINY, **common, separate_critic=True, uses_critic=True, reference_pass=True)
    assert separate["passes"] == 2 * actor_pass + tp.critic_forward_flops(TINY, passes, True)
    assert separate["update"] == 3 * (tp.forward_flops(TINY, update) + tp.critic_forward_flops(TINY, update, True))
    assert separate["total"] == separate["rollout"] + separate["passes"] + separate["update"]
    no_critic = tp.iteration_flops(TINY, **common, separate_critic=True, uses_critic=False, reference_pass=False)
    assert no_critic["passes"] == actor_pass and no_critic["update"] == 3 * tp.forward_flops(TINY, update)
    # The sampler's log-probs as the old ones: no pass at all without a critic or a KL term.
    sampler = tp.iteration_flops(TINY, **common, separate_critic=True, uses_critic=False, reference_pass=False,
                                 actor_pass=False)
    assert sampler["passes"] == 0 and sampler["update"] == no_critic["update"]
    shared = tp.iteration_flops(TINY, **common, separate_critic=False, uses_critic=True, reference_pass=False)
    assert no_critic["total"] < shared["total"] < separate["total"]


# One layer: XLA's cost analysis counts a scanned layer stack's body once.
FORWARD = qwen2.Qwen2Config(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
ROWS, LENGTH = 4, 128


@pytest.fixture(scope="module")
def compiled_forward():
    """The jitted logits of ``FORWARD`` on ``[ROWS, LENGTH]`` tokens, compiled once, and
    random parameters (made on the host: no per-parameter compilation)."""
    shapes = jax.eval_shape(lambda: qwen2.init_params(jax.random.key(0), FORWARD))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)

    def logits(p, tokens):
        hidden, _ = qwen2.forward(p, FORWARD, tokens)
        return qwen2.lm_head(p, FORWARD, hidden)

    tokens = jnp.ones((ROWS, LENGTH), jnp.int32)
    return jax.jit(logits).lower(params, tokens).compile(), params, tokens


def test_forward_flops_match_xla_count_of_the_model(compiled_forward):
    """XLA counts the same matmuls, plus a little elementwise work (norms, RoPE, softmax, SiLU)."""
    analysis = compiled_forward[0].cost_analysis()
    xla = (analysis[0] if isinstance(analysis, list) else analysis)["flops"]
    want = tp.forward_flops(FORWARD, tp.TokenSet.of_rows([LENGTH] * ROWS))
    assert want <= xla <= 1.05 * want, (xla, want)


@pytest.mark.parametrize("kind,flops", [
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5", 459e12), ("TPU v5p", 459e12),
    ("TPU v6 lite", 918e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12), ("NVIDIA L4", 121e12),
    ("NVIDIA L40S", 362e12), ("Tesla T4", 65e12), ("cpu", None), ("Some New Chip", None)])
def test_peak_table_lookup(kind, flops):
    assert tp.table_peak_flops(kind) == flops


def test_device_peak_counts_chips_and_measures_cpu_once():
    chips = [types.SimpleNamespace(device_kind="TPU v5 lite", platform="tpu")] * 8
    peak = tp.device_peak(chips)
    assert peak.flops == 8 * 197e12 and "TPU v5 lite x8" in peak.source
    cpu = tp.device_peak(jax.devices())  # 8 simulated CPU devices share the host's cores
    assert cpu.flops == tp.measured_matmul_flops(1024, "float32") > 0
    assert "measured" in cpu.source


def test_mfu_of_a_measured_cpu_forward_is_a_fraction(compiled_forward):
    """The forward timed against the CPU's measured matmul peak in interleaved rounds (best of
    each, so load from other processes affects both alike)."""
    forward, params, tokens = compiled_forward
    forward(params, tokens).block_until_ready()
    best_s, peak = float("inf"), 0.0
    for _ in range(3):
        peak = max(peak, tp.measured_matmul_flops.__wrapped__(1024, "float32", 2))
        start = time.perf_counter()
        forward(params, tokens).block_until_ready()
        best_s = min(best_s, time.perf_counter() - start)
    flops = tp.forward_flops(FORWARD, tp.TokenSet.of_rows([LENGTH] * ROWS))
    assert 0 < tp.mfu(flops, best_s, peak) <= 1, (flops / best_s, peak)


def record(iteration, **extra):
    base = {"iteration": iteration, "time/iteration_s": 10.0, "time/rollout_s": 4.0, "time/passes_s": 3.0,
            "time/advantages_s": 0.5, "time/update_s": 2.0, "throughput/flops": 1e11,
            "throughput/peak_flops": 1e12, "throughput/generated_tokens": 400.0,
            "throughput/update_tokens": 3000.0, "throughput/update_computed_tokens": 4000.0}
    return {**base, **extra}


def test_summary_line_sums_the_iterations():
    records = [record(0, **{"time/eval_s": 4.0}), record(1, **{"time/checkpoint_s": 1.0}),
               {"iteration": 2, "final": 1.0, "time/eval_s": 5.0, "eval/success": 0.5}]
    line = tp.summary_line(records, "cpu, measured")
    # 20 s of iterations + 9 s of evaluation + 1 s of checkpoint = 30 s.
    assert line.startswith("throughput: 10.0 s per iteration (rollout 27%, log-prob/value 20%, "
                           "advantages 3%, update 13%, eval 30%, checkpoint 3%, other 3%); ")
    assert "100 generated tok/s, 1,500 update tok/s, update rows 75% real tokens" in line
    # 2e11 FLOPs in 20 s of iterations: 10 GFLOP/s of a 1 TFLOP/s peak.
    assert line.endswith("model 10.00 GFLOP/s = MFU 1.00% of 1.00 TFLOP/s (cpu, measured)")
    assert tp.summary_line([{"iteration": 0, "eval/success": 0.5}]) == ""


def test_throughput_metrics_of_an_iteration():
    flops = {"rollout": 1.0e9, "passes": 2.0e9, "update": 3.0e9, "total": 6.0e9}
    metrics = tp.throughput_metrics(flops, {"rollout": 2.0, "update": 1.5, "iteration": 6.0},
                                    generated_tokens=500, update_real_tokens=900,
                                    update_computed_tokens=1200, peak=tp.Peak(1e10, "test"))
    assert metrics["throughput/generated_tokens_per_s"] == 250
    assert metrics["throughput/update_tokens_per_s"] == 600
    assert metrics["throughput/update_real_fraction"] == 0.75
    assert metrics["throughput/mfu"] == pytest.approx(0.1)
    assert metrics["throughput/update_mfu"] == pytest.approx(0.2)
