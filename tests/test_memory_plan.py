"""Memory arithmetic: parameter counts against transformers, a hand-checked plan, README sync."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import transformers

from hiper_jax.memory_plan import (
    ACCELERATORS,
    GIB,
    QWEN2_5,
    ModelShape,
    TrainingSetup,
    memory_plan,
    plan_for_run,
    readme_breakdown,
    readme_table,
)

TINY = ModelShape("tiny", hidden=8, layers=2, heads=2, kv_heads=1, intermediate=16, vocab=32,
                  tied_embeddings=True)


@pytest.mark.parametrize("model", [TINY, *QWEN2_5.values()], ids=lambda m: m.name)
def test_param_count_matches_transformers(model):
    config = transformers.Qwen2Config(
        hidden_size=model.hidden, num_hidden_layers=model.layers,
        num_attention_heads=model.heads, num_key_value_heads=model.kv_heads,
        intermediate_size=model.intermediate, vocab_size=model.vocab,
        tie_word_embeddings=model.tied_embeddings)
    with torch.device("meta"):
        reference = transformers.Qwen2ForCausalLM(config)
    assert model.param_count == sum(p.numel() for p in reference.parameters())


def test_published_sizes_and_kv_bytes():
    assert QWEN2_5["1.5b"].param_count == 1_543_714_304
    assert QWEN2_5["7b"].param_count == 7_615_616_512
    # 2 (K and V) x 28 layers x 4 KV heads x 128 head dim x 2 bytes.
    assert QWEN2_5["7b"].kv_bytes_per_token() == 57_344


def test_plan_by_hand():
    """TINY on (data=1, fsdp=2, tensor=1): 4 envs, 6 prompt + 2 response tokens, 1 row per chip.

    Params: embed 256, norms 32, q 128 (+16 bias), k+v 128 (+16 bias), o 128, mlp 768, final
    norm 8 = 1480. fsdp=2 halves every tensor with a hidden dim (biases stay whole):
    (1480 - 32) / 2 + 32 = 756 per chip. Critic: the same backbone + value heads (8 x 3 split
    by fsdp, 3 biases) = 756 + 12 + 3 = 771.
    """
    setup = TrainingSetup(num_envs=4, prompt_tokens=6, response_tokens=2)
    plan = memory_plan(TINY, data=1, fsdp=2, tensor=1, setup=setup)
    assert plan.resident == {
        "policy params": 756 * 4,
        "policy AdamW": 756 * 8,
        "reference policy": 756 * 2,
        "critic params + AdamW": 771 * 12,
    }
    # Sampling on the training mesh (one host): 4 envs in 2 groups, a call of 2 rows split over
    # fsdp = 1 row per chip, 6 + 2 - 1 = 7 cache slots.
    kv = 1 * 7 * 2 * 2 * 1 * 4 * 2  # rows x slots x (K, V) x layers x kv heads x head dim x 2B
    assert plan.rollout == {
        "sampling weights": 756 * 2,
        "KV cache": kv,
        "KV cache copy": kv,
        # Attention phase (larger than the MLP's 6 x (16 + 48) x 2): 6 tokens x (2 hidden + q 8 +
        # k, v 8) x 2B, plus fp32 scores and softmax: 2 x rows x heads x 6 x 7 x 4.
        "prefill activations": 6 * 32 * 2 + 2 * (1 * 2 * 6 * 7 * 4),
        "logits": 4 * 1 * 32 * 4,
        "FSDP-gathered weights": 2 * 1480 * 2,  # the whole bf16 model, twice
    }
    # One layer's activations per token: 2 hidden + 2 q (8) + 2 kv (4) + 3 mlp (16) = 88.
    # FSDP gathers two layers of (1216 / 2) params and the 8 x 32 vocab projection, in bf16.
    gathered = (2 * 608 + 256) * 2
    assert plan.update == {
        "grads": (756 + 771) * 4,
        "remat checkpoints": 2 * 8 * 8 * 2,         # layers x tokens x hidden x 2B
        "layer activations": 2 * 8 * 88 * 2,
        "attention probs": 2 * 1 * 2 * 8 * 8 * 4,
        "logits": 2 * 8 * 32 * 4,
        "FSDP-gathered weights": gathered,
    }
    assert sum(plan.rollout.values()) == 9448 and sum(plan.update.values()) == 15_196
    assert plan.peak_bytes == 19_836 + 15_196
    assert plan.fits(hbm_gib=35_032 / 0.9 / GIB)
    assert not plan.fits(hbm_gib=35_031 / 0.9 / GIB)


def test_sampling_on_a_host_mesh_by_hand():
    """TINY trained on (1, 8, 1) over 2 hosts of 4 chips; 16 envs -> 8 per host, 4 rows a call.

    Host mesh (1, 1, 4): weights split over tensor where it divides (embed 256 -> 64: vocab 32
    / 4; q 128 + 16 -> 36: 2 heads stay whole; ...), rows whole on every chip. (2, 1, 2): rows
    split over data (2 per chip), heads over 2. (1, 1, 1) on 2 hosts: the earlier first-chip
    copy, the whole model and 4 rows on one chip.
    """
    setup = TrainingSetup(num_envs=16, prompt_tokens=6, response_tokens=2, sampling_mesh=(1, 1, 4))
    plan = memory_plan(TINY, data=1, fsdp=8, tensor=1, setup=setup)
    # embed and mlp split 4 ways; q/k/v/o (2 and 1 heads) and norms whole.
    weights = (256 + 768) / 4 + 128 + 16 + 128 + 16 + 128 + 32 + 8
    assert plan.rollout["sampling weights"] == weights * 2
    assert plan.rollout["KV cache"] == 4 * 7 * 2 * 2 * 1 * 4 * 2  # 1 KV head: not split
    assert plan.rollout["logits"] == 4 * 4 * 8 * 4  # vocab 32 / 4
    assert plan.rollout["FSDP-gathered weights"] == 0
    assert plan.resident == memory_plan(TINY, 1, 8, 1, dataclasses.replace(setup, sampling_mesh=None)).resident

    split = memory_plan(TINY, 1, 8, 1, dataclasses.replace(setup, sampling_mesh=(2, 1, 2)))
    assert split.rollout["KV cache"] == 2 * 7 * 2 * 2 * 1 * 4 * 2
    first_chip = memory_plan(TINY, 1, 8, 1, dataclasses.replace(setup, sampling_mesh=(1, 1, 1), hosts=2))
    assert first_chip.rollout["sampling weights"] == 1480 * 2
    assert first_chip.rollout["KV cache"] == plan.rollout["KV cache"]
    with pytest.raises(ValueError, match=r"sampling mesh \(1, 1, 8\) \(8 chips\) must fit one of the 2"):
        memory_plan(TINY, 1, 8, 1, dataclasses.replace(setup, sampling_mesh=(1, 1, 8), hosts=2))
    with pytest.raises(ValueError, match="sampling_mesh must be three positive sizes"):
        TrainingSetup(sampling_mesh=(1, 0, 1))


def test_plan_for_run_follows_the_sampling_settings():
    from hiper_jax.train.config import published_hiper_config

    config = published_hiper_config("alfworld", "unused")
    assert config.sampling.host_mesh and config.env.num_envs == 128
    model = QWEN2_5["7b"]
    bf16_weights = lambda fsdp, tensor: sum(t.per_chip(fsdp, tensor) for t in model.tensors()) * 2  # noqa: E731
    # v5litepod-32: 8 hosts of 4 chips; sampling.mesh tensor=0 -> (1, 1, 4) (4 KV heads).
    plan = plan_for_run(config, model, (1, 32, 1), hosts=8)
    assert plan.rollout["sampling weights"] == bf16_weights(1, 4)
    # 16 envs per host in 2 groups: 8 rows a call, whole on every chip; KV heads split 4 ways.
    assert plan.rollout["KV cache"] == 8 * (2048 + 512 - 1) * 2 * 28 * 1 * 128 * 2
    config.sampling.host_mesh = False  # several hosts: the whole copy on each host's first chip
    assert plan_for_run(config, model, (1, 32, 1), hosts=8).rollout["sampling weights"] == bf16_weights(1, 1)
    # one host: the training mesh's layout
    assert plan_for_run(config, model, (1, 8, 1)).rollout["sampling weights"] == bf16_weights(8, 1)


def test_tensor_axis_splits_only_what_it_divides():
    setup = TrainingSetup(num_envs=4, prompt_tokens=6, response_tokens=2, separate_critic=False,
                          attention="flash", logits_chunk_tokens=4)
    plan = memory_plan(TINY, data=1, fsdp=1, tensor=2, setup=setup)
    # 1 KV head cannot be split over 2: the cache stays whole (2 rows per call of 4 envs, 7
    # slots); the critic is 3 value heads.
    assert plan.rollout["KV cache"] == 2 * 7 * 2 * 2 * 1 * 4 * 2
    assert plan.resident["critic params + AdamW"] == 27 * 12
    assert plan.update["attention probs"] == 0
    assert plan.update["logits"] == 2 * 4 * 16 * 4
    # embed/q/o/mlp halve, k/v (1 head) and norms stay whole.
    split = (256 + 128 + 16 + 128 + 768) / 2 + 128 + 16 + 32 + 8
    assert plan.resident["policy params"] == split * 4


def test_plan_errors():
    with pytest.raises(ValueError, match=r"num_envs=128 must be a multiple of data x fsdp = 3"):
        memory_plan(QWEN2_5["7b"], data=3, fsdp=1, tensor=1)
    with pytest.raises(ValueError, match="attention"):
        TrainingSetup(attention="ring")


def test_fewer_chips_never_need_less_memory():
    setup = TrainingSetup()
    peaks = [memory_plan(QWEN2_5["7b"], 1, fsdp, 1, setup).peak_bytes for fsdp in (32, 16, 8, 4)]
    assert peaks == sorted(peaks)


def test_readme_shows_the_computed_table():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert readme_table() in readme, "stale README table: paste `python -m hiper_jax.memory_plan`"
    assert readme_breakdown() in readme
    resident_v4_8 = sum(memory_plan(QWEN2_5["7b"], 1, 4, 1).resident.values()) / GIB
    assert f"resident: {resident_v4_8:.1f} GiB per chip" in readme.replace("\n", " ")
    assert {"v4-8", "v5litepod-8", "v5p-16"} <= set(ACCELERATORS)


@pytest.mark.parametrize("model", [TINY, QWEN2_5["0.5b"]], ids=lambda m: m.name)
def test_lora_trainable_params_match_the_adapters_the_port_makes(model):
    from hiper_jax.memory_plan import trainable_params
    from hiper_jax.models import qwen2

    config = qwen2.Qwen2Config(vocab_size=model.vocab, hidden_size=model.hidden,
                               intermediate_size=model.intermediate, num_hidden_layers=model.layers,
                               num_attention_heads=model.heads, num_key_value_heads=model.kv_heads,
                               tie_word_embeddings=model.tied_embeddings, lora_rank=8)
    adapters = qwen2.lora.count_adapter_params(config)
    assert sum(t.numel for t in model.lora_tensors(8)) == adapters
    heads = 3 * model.hidden + 3
    assert trainable_params(model, TrainingSetup(lora_rank=8)) == {"policy": adapters,
                                                                   "critic": adapters + heads}
    assert trainable_params(model, TrainingSetup(lora_rank=8, separate_critic=False))["critic"] == heads


def test_lora_plan_keeps_moments_and_grads_for_the_adapters_only():
    host = TrainingSetup(sampling_mesh=(2, 1, 4))  # one 8-chip host, tensor over the 4 KV heads
    model, setup = QWEN2_5["7b"], dataclasses.replace(host, lora_rank=16)
    full, plan = memory_plan(model, 1, 8, 1, host), memory_plan(model, 1, 8, 1, setup)
    adapters = sum(t.per_chip(8, 1) for t in model.lora_tensors(16))
    heads = sum(t.per_chip(8, 1) for t in model.tensors(value_heads=3)[-2:])
    assert plan.resident["policy AdamW"] == adapters * 8
    assert plan.resident["policy LoRA adapters"] == adapters * 4
    assert plan.resident["critic params + AdamW"] == (adapters + heads) * 12
    assert plan.update["grads"] == (2 * adapters + heads) * 4
    assert "reference policy" not in plan.resident and "reference policy" in full.resident
    assert plan.resident["policy params"] == full.resident["policy params"]  # frozen, still there
    assert plan.rollout == full.rollout
    assert plan.peak_bytes < 0.6 * full.peak_bytes
    with pytest.raises(ValueError, match="lora_rank"):
        TrainingSetup(lora_rank=-1)


def test_shape_comes_from_any_qwen2_config(tmp_path):
    """ModelShape from our Qwen2Config, a transformers config and a config.json on disk: the
    same shape, and the parameter count of the model those configs build."""
    import json

    from hiper_jax.models import qwen2

    config = qwen2.Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf_config()))
    ours = ModelShape.from_config(config, "m")
    assert ours == ModelShape.from_hf(str(tmp_path), "m")
    assert ours == ModelShape.from_config(transformers.Qwen2Config(**config.to_hf_config()), "m")
    assert (ours.hidden, ours.layers, ours.heads, ours.kv_heads, ours.intermediate, ours.vocab) == (32, 3, 4, 2, 64, 96)
    assert ours.param_count == qwen2.count_params(config)
    assert QWEN2_5["0.5b"].param_count == 494_032_768


def test_plan_for_run_follows_the_run_config():
    """The run's switches reach the plan: the reference copy's dtype, remat, the logits chunk,
    the compute dtype and micro-batch rows per chip."""
    from hiper_jax.memory_plan import plan_for_run
    from hiper_jax.train.config import base_config

    model = QWEN2_5["0.5b"]
    run = base_config()
    run.env.num_envs = 16
    run.model.compute_dtype = "bfloat16"
    run.ppo.micro_batch_rows = 8
    run.ppo.remat = "layer"
    bf16 = plan_for_run(run, model, (2, 4, 1))  # 8 batch shards: one row per chip
    assert bf16.resident["reference policy"] == bf16.resident["policy params"] / 2
    assert bf16.update["logits"] == 2 * 128 * model.vocab * 4
    # 4 micro-batches per step: an accumulator beside the gradients; AdamW's fp32 updates.
    assert bf16.update["grad accumulator"] == bf16.update["grads"] == bf16.update["optimizer update"]
    run.ppo.ref_dtype = "float32"
    run.ppo.logits_chunk_tokens = 64
    fp32 = plan_for_run(run, model, (2, 4, 1))
    assert fp32.resident["reference policy"] == fp32.resident["policy params"]
    assert fp32.update["logits"] == 2 * 64 * model.vocab * 4
    run.ppo.remat = "none"
    kept = plan_for_run(run, model, (2, 4, 1))
    assert "remat checkpoints" not in kept.update
    assert kept.update["layer activations"] == (model.layers + 1) / 2 * fp32.update["layer activations"]
    two_rows = plan_for_run(run, model, (1, 4, 1))  # 4 batch shards: two rows per chip
    assert two_rows.update["layer activations"] == 2 * kept.update["layer activations"]
    run.model.lora_rank = 8
    assert "reference policy" not in plan_for_run(run, model, (2, 4, 1)).resident
