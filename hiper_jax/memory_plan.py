"""Per-chip memory arithmetic for PPO training of a Qwen2-shaped policy on a device mesh.

``python -m hiper_jax.memory_plan`` prints the tables of the README's "Running on Cloud TPU"
section (a test checks that the README shows exactly what this module computes).

What is counted, per chip (bytes; ``P`` parameters of a tensor after sharding):

* resident all run long: policy params (fp32 master, or bf16), a bf16 compute copy of the
  policy for sampling, AdamW moments (2 x fp32), the frozen reference policy (bf16), and the
  critic (its own backbone, value heads, fp32 params and AdamW moments) unless it shares the
  policy backbone; with LoRA (``lora_rank``) the moments, gradients and the critic's own
  weights are those of the adapters and heads only, and there is no reference copy;
* rollout phase: the KV cache of every env's sequence (``prompt + response`` tokens, bf16), the
  prefill working set, and the weights FSDP gathers at once;
* update phase: gradients (policy and critic, in the params' dtype; with several micro-batches
  per step also their accumulator), AdamW's update tensors (run plans only), the activations of
  one micro-batch with per-layer rematerialisation, and the weights FSDP gathers at once.

Peak = resident + max(rollout, update). Layout: weights and optimizer states are split over
``fsdp`` along their hidden (embed) dimension and over ``tensor`` along heads, KV heads, MLP
width or vocab, as the model's sharding rules place them; a mesh axis that does not divide a
dimension leaves the tensor whole along it. Batch rows (envs, update rows) are split over
``data x fsdp``. Activation terms (bf16 unless stated):

* remat checkpoints: the residual stream at every layer boundary, ``layers x tokens x hidden``;
* one layer recomputed and differentiated: norm in/out, q/k/v, attention output, MLP gate/up/
  product, twice (values and gradients);
* attention probabilities, float32, ``heads x S x S`` per row, twice (values and gradients), as
  plain dot-product attention materialises them (``attention="flash"``: 0);
* logits, float32 ``tokens x vocab``, twice (logits and their gradient), or only
  ``logits_chunk_tokens`` rows at a time when the loss is computed in chunks;
* FSDP-gathered weights, bf16: two layers (running and prefetched) and the vocab projection.

Shapes come from a Qwen2 config (:meth:`ModelShape.from_config`: our ``Qwen2Config``, a
``transformers`` config or a HF ``config.json``) and the settings from a run's config
(:meth:`TrainingSetup.from_run_config`, :func:`plan_for_run`): ``ppo.remat`` (without remat every
layer's activations are kept), ``ppo.ref_dtype``, ``ppo.logits_chunk_tokens`` and
``model.compute_dtype`` (activations, compute copy, gathered weights; bf16 in the defaults here).
``benchmarks/bench_mesh.py`` compares the update terms with XLA's memory analysis.

Not counted: XLA temporaries beyond these, fragmentation, collective buffers; the ``reserve``
of :meth:`MemoryPlan.fits` (10% of HBM by default) stands for them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any, Optional

GIB = 2**30
FP32, BF16 = 4, 2
DTYPE_BYTES = {"float32": FP32, "bfloat16": BF16, "float16": BF16}


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Qwen2-style decoder (HF ``config.json`` names in comments)."""

    name: str
    hidden: int  # hidden_size
    layers: int  # num_hidden_layers
    heads: int  # num_attention_heads
    kv_heads: int  # num_key_value_heads
    intermediate: int  # intermediate_size
    vocab: int  # vocab_size
    tied_embeddings: bool  # tie_word_embeddings
    head_dim_override: Optional[int] = None  # head_dim, when not hidden / heads

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden // self.heads

    @classmethod
    def from_config(cls, config: Any, name: str = "") -> "ModelShape":
        """The shape of a Qwen2 config: a :class:`hiper_jax.models.qwen2.Qwen2Config`, a
        ``transformers`` config, or a ``config.json`` dict (they share the HF field names)."""
        get = (lambda key, default=None: config.get(key, default)) if isinstance(config, Mapping) \
            else (lambda key, default=None: getattr(config, key, default))
        heads, hidden = int(get("num_attention_heads")), int(get("hidden_size"))
        head_dim = get("head_dim")
        return cls(name or str(get("_name_or_path", "") or "qwen2"), hidden=hidden,
                   layers=int(get("num_hidden_layers")), heads=heads,
                   kv_heads=int(get("num_key_value_heads", heads)),
                   intermediate=int(get("intermediate_size")), vocab=int(get("vocab_size")),
                   tied_embeddings=bool(get("tie_word_embeddings", False)),
                   head_dim_override=None if head_dim in (None, hidden // heads) else int(head_dim))

    @classmethod
    def from_hf(cls, path: str, name: str = "") -> "ModelShape":
        """The shape in a HF ``config.json`` (the file, or the checkpoint directory holding it)."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path, encoding="utf-8") as handle:
            return cls.from_config(json.load(handle), name or os.path.basename(os.path.dirname(path)))

    def tensors(self, lm_head: bool = True, value_heads: int = 0) -> list["Tensor"]:
        """Every parameter tensor, stacked over layers (``lm_head=False``: a critic backbone)."""
        h, n, d, i, v = self.hidden, self.layers, self.head_dim, self.intermediate, self.vocab
        out = [
            Tensor("embed_tokens", v * h, fsdp_dim=h, tensor_dim=v),
            Tensor("input/post_attention_layernorm", 2 * n * h, fsdp_dim=h),
            Tensor("q_proj", n * h * self.heads * d, fsdp_dim=h, tensor_dim=self.heads),
            Tensor("q_proj.bias", n * self.heads * d, tensor_dim=self.heads),
            Tensor("k_proj+v_proj", 2 * n * h * self.kv_heads * d, fsdp_dim=h,
                   tensor_dim=self.kv_heads),
            Tensor("k_proj+v_proj.bias", 2 * n * self.kv_heads * d, tensor_dim=self.kv_heads),
            Tensor("o_proj", n * self.heads * d * h, fsdp_dim=h, tensor_dim=self.heads),
            Tensor("mlp", 3 * n * h * i, fsdp_dim=h, tensor_dim=i),
            Tensor("norm", h, fsdp_dim=h),
        ]
        if lm_head and not self.tied_embeddings:
            out.append(Tensor("lm_head", h * v, fsdp_dim=h, tensor_dim=v))
        if value_heads:
            out.append(Tensor("value_heads", h * value_heads, fsdp_dim=h))
            out.append(Tensor("value_heads.bias", value_heads))
        return out

    def lora_tensors(self, rank: int) -> list["Tensor"]:
        """The LoRA adapters of rank ``rank`` on all seven projections of every layer: ``A [in,
        r]`` and ``B [r, out]``, sharded along ``in`` / ``out`` as their kernel is (the rank
        dimension is replicated)."""
        h, n, i = self.hidden, self.layers, self.intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return [
            Tensor("q_proj.lora_a", n * h * rank, fsdp_dim=h),
            Tensor("q_proj.lora_b", n * rank * q, tensor_dim=self.heads),
            Tensor("k_proj+v_proj.lora_a", 2 * n * h * rank, fsdp_dim=h),
            Tensor("k_proj+v_proj.lora_b", 2 * n * rank * kv, tensor_dim=self.kv_heads),
            Tensor("o_proj.lora_a", n * q * rank, tensor_dim=self.heads),
            Tensor("o_proj.lora_b", n * rank * h, fsdp_dim=h),
            Tensor("gate_proj+up_proj.lora_a", 2 * n * h * rank, fsdp_dim=h),
            Tensor("gate_proj+up_proj.lora_b", 2 * n * rank * i, tensor_dim=i),
            Tensor("down_proj.lora_a", n * i * rank, tensor_dim=i),
            Tensor("down_proj.lora_b", n * rank * h, fsdp_dim=h),
        ]

    @property
    def param_count(self) -> int:
        return sum(t.numel for t in self.tensors())

    def kv_bytes_per_token(self, dtype_bytes: int = BF16) -> int:
        """Keys and values of one token over all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


@dataclasses.dataclass(frozen=True)
class Tensor:
    """A parameter tensor for the arithmetic: element count and the sizes of its sharded dims.

    ``fsdp_dim``/``tensor_dim``: size of the dimension split over ``fsdp``/``tensor`` (0: none).
    """

    name: str
    numel: int
    fsdp_dim: int = 0
    tensor_dim: int = 0

    def per_chip(self, fsdp: int, tensor: int) -> float:
        """Elements held by one chip."""
        split = 1
        if self.fsdp_dim and self.fsdp_dim % fsdp == 0:
            split *= fsdp
        if self.tensor_dim and self.tensor_dim % tensor == 0:
            split *= tensor
        return self.numel / split


# The architecture fields of the Qwen2.5 checkpoints' config.json files (Hugging Face).
QWEN2_5_CONFIGS = {
    "0.5b": {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936,
             "tie_word_embeddings": True},
    "1.5b": {"hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12,
             "num_key_value_heads": 2, "intermediate_size": 8960, "vocab_size": 151936,
             "tie_word_embeddings": True},
    "7b": {"hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
           "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
           "tie_word_embeddings": False},
}
QWEN2_5 = {key: ModelShape.from_config(hf, f"Qwen2.5-{key.upper()}") for key, hf in QWEN2_5_CONFIGS.items()}


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """A Cloud TPU slice type: chips (JAX devices), hosts (TPU VM workers), HBM per chip."""

    name: str
    chips: int
    hosts: int
    hbm_gib: float


ACCELERATORS = {
    a.name: a for a in (
        Accelerator("v4-8", chips=4, hosts=1, hbm_gib=32),
        Accelerator("v4-16", chips=8, hosts=2, hbm_gib=32),
        Accelerator("v4-32", chips=16, hosts=4, hbm_gib=32),
        Accelerator("v5litepod-8", chips=8, hosts=1, hbm_gib=16),
        Accelerator("v5litepod-16", chips=16, hosts=4, hbm_gib=16),
        Accelerator("v5litepod-32", chips=32, hosts=8, hbm_gib=16),
        Accelerator("v5p-8", chips=4, hosts=1, hbm_gib=95),
        Accelerator("v5p-16", chips=8, hosts=2, hbm_gib=95),
        Accelerator("v5p-32", chips=16, hosts=4, hbm_gib=95),
    )
}


@dataclasses.dataclass(frozen=True)
class TrainingSetup:
    """What the run keeps in memory; the defaults are the paper's ALFWorld scale.

    Attributes:
      num_envs: rollout rows (one per env) of a rollout batch.
      prompt_tokens, response_tokens: the longest prompt and response (KV cache length).
      update_rows_per_chip: sequences of ``prompt + response`` tokens per chip per micro-step.
      prefill_rows_per_chip: rows prefilled at once per chip (None: all the chip's envs).
      fp32_master: float32 master params and grads (else bf16 params and grads).
      bf16_compute_copy: keep a bf16 copy of the policy for sampling.
      reference_policy: keep a frozen bf16 reference policy (KL penalty).
      separate_critic: the critic has its own backbone (else value heads on the policy).
      attention: "naive" (float32 probabilities materialised) or "flash" (none kept).
      logits_chunk_tokens: tokens whose logits exist at once in the loss (None: all).
      lora_rank: > 0: LoRA adapters of this rank on all attention and MLP projections. Only
        they and the value heads train (gradients and AdamW moments for them alone); the
        policy's weights are frozen and are the reference policy (no copy); a separate critic
        is adapters of its own on those same weights; sampling runs a merged bf16 copy.
      remat: per-layer rematerialisation in the update (``ppo.remat="layer"``); False keeps
        every layer's activations for the backward pass.
      reference_bytes: bytes per element of the reference copy (``ppo.ref_dtype``).
      activation_bytes: bytes per element of activations, the compute copy and gathered
        weights (``model.compute_dtype``).
      micro_steps: micro-batches per optimizer step (``ppo.mini_batch_rows /
        ppo.micro_batch_rows``); above 1 the step holds a gradient accumulator beside the
        micro-batch's gradients.
      optimizer_temporaries: count AdamW's update tensors (one fp32 tensor per trainable
        parameter, made before they are applied). :meth:`from_run_config` counts them; the
        README tables (the defaults) do not.
    """

    num_envs: int = 128
    prompt_tokens: int = 2048
    response_tokens: int = 512
    update_rows_per_chip: int = 1
    prefill_rows_per_chip: Optional[int] = None
    fp32_master: bool = True
    bf16_compute_copy: bool = True
    reference_policy: bool = True
    separate_critic: bool = True
    attention: str = "naive"
    logits_chunk_tokens: Optional[int] = None
    lora_rank: int = 0
    remat: bool = True
    reference_bytes: int = BF16
    activation_bytes: int = BF16
    micro_steps: int = 1
    optimizer_temporaries: bool = False

    @classmethod
    def from_run_config(cls, config: Any, batch_shards: int = 1) -> "TrainingSetup":
        """What a trainer run keeps, from its ``ml_collections`` config (``hiper_jax.train.config``
        fields) on a mesh with ``batch_shards`` (data x fsdp) row shards."""
        micro_rows = config.ppo.micro_batch_rows
        rows_per_chip = max(micro_rows // batch_shards, 1)
        return cls(
            num_envs=config.env.num_envs, prompt_tokens=config.prompt.max_prompt_tokens,
            response_tokens=config.sampling.max_new_tokens, update_rows_per_chip=rows_per_chip,
            fp32_master=config.model.param_dtype == "float32",
            bf16_compute_copy=True, reference_policy=not config.model.lora_rank,
            separate_critic=config.model.critic == "separate",
            logits_chunk_tokens=rows_per_chip * config.ppo.logits_chunk_tokens,
            lora_rank=config.model.lora_rank, remat=config.ppo.remat == "layer",
            reference_bytes=DTYPE_BYTES[config.ppo.ref_dtype],
            activation_bytes=DTYPE_BYTES[config.model.compute_dtype],
            micro_steps=max(config.ppo.mini_batch_rows // micro_rows, 1), optimizer_temporaries=True)

    def __post_init__(self):
        if self.attention not in ("naive", "flash"):
            raise ValueError(f"attention must be 'naive' or 'flash', got {self.attention!r}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0 = off), got {self.lora_rank}")

    @property
    def sequence_tokens(self) -> int:
        return self.prompt_tokens + self.response_tokens


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-chip bytes by component; see the module doc for what each term counts."""

    resident: dict[str, float]
    rollout: dict[str, float]
    update: dict[str, float]

    @property
    def peak_bytes(self) -> float:
        return sum(self.resident.values()) + max(sum(self.rollout.values()),
                                                 sum(self.update.values()))

    def fits(self, hbm_gib: float, reserve: float = 0.1) -> bool:
        """Whether the peak leaves ``reserve`` (a fraction of HBM) free."""
        return self.peak_bytes <= (1.0 - reserve) * hbm_gib * GIB


def _sharded_params(tensors: list[Tensor], fsdp: int, tensor: int) -> float:
    return sum(t.per_chip(fsdp, tensor) for t in tensors)


def _divide(size: int, ways: int) -> float:
    """``size / ways`` when the mesh axis divides the dimension, else ``size`` (replicated)."""
    return size / ways if size % ways == 0 else float(size)


def _layer_activation_bytes(model: ModelShape, tokens: int, tensor: int,
                            dtype_bytes: int = BF16) -> float:
    """Values of one layer's intermediate activations for ``tokens`` tokens."""
    d = model.head_dim
    q = _divide(model.heads, tensor) * d
    kv = _divide(model.kv_heads, tensor) * d
    per_token = 2 * model.hidden + 2 * q + 2 * kv + 3 * _divide(model.intermediate, tensor)
    return tokens * per_token * dtype_bytes


def _gathered_weight_bytes(model: ModelShape, fsdp: int, tensor: int, dtype_bytes: int = BF16) -> float:
    """bf16 weights that FSDP all-gathers at once: two layers (the one running and the next,
    prefetched) and the vocab projection, each still split over ``tensor``."""
    if fsdp == 1:
        return 0.0
    layer = [t for t in model.tensors() if t.name not in ("embed_tokens", "norm", "lm_head")]
    per_layer = _sharded_params(layer, 1, tensor) / model.layers
    vocab = model.hidden * _divide(model.vocab, tensor)
    return (2 * per_layer + vocab) * dtype_bytes


def _attention_bytes(model: ModelShape, rows: int, query: int, keys: int, tensor: int,
                     setup: TrainingSetup) -> float:
    if setup.attention == "flash":
        return 0.0
    return rows * _divide(model.heads, tensor) * query * keys * FP32


def memory_plan(model: ModelShape, data: int, fsdp: int, tensor: int,
                setup: TrainingSetup = TrainingSetup()) -> MemoryPlan:
    """Per-chip memory of PPO training ``model`` on a ``(data, fsdp, tensor)`` mesh."""
    batch_shards = data * fsdp
    if setup.num_envs % batch_shards:
        raise ValueError(f"num_envs={setup.num_envs} must be a multiple of data x fsdp = "
                         f"{batch_shards}")
    param_bytes = FP32 if setup.fp32_master else BF16
    policy = _sharded_params(model.tensors(), fsdp, tensor)
    heads = _sharded_params(model.tensors(value_heads=3)[-2:], fsdp, tensor)
    if setup.lora_rank:
        trainable = _sharded_params(model.lora_tensors(setup.lora_rank), fsdp, tensor)
        critic = heads + (trainable if setup.separate_critic else 0.0)
    else:
        trainable = policy
        critic = _sharded_params(model.tensors(lm_head=False, value_heads=3), fsdp, tensor) \
            if setup.separate_critic else heads

    resident = {"policy params": policy * param_bytes}
    if setup.lora_rank:
        resident["policy LoRA adapters"] = trainable * param_bytes
    if setup.bf16_compute_copy and (setup.fp32_master or setup.lora_rank):
        resident["policy bf16 copy"] = policy * setup.activation_bytes
    resident["policy AdamW"] = trainable * 2 * FP32
    if setup.reference_policy and not setup.lora_rank:
        resident["reference policy"] = policy * setup.reference_bytes
    resident["critic params + AdamW"] = critic * (param_bytes + 2 * FP32)

    envs_per_chip = setup.num_envs // batch_shards
    prefill_rows = setup.prefill_rows_per_chip or envs_per_chip
    prompt = setup.prompt_tokens
    act = setup.activation_bytes
    gathered = _gathered_weight_bytes(model, fsdp, tensor, act)
    rollout = {
        "KV cache": (envs_per_chip * setup.sequence_tokens * 2 * model.layers
                     * _divide(model.kv_heads, tensor) * model.head_dim * act),
        "prefill activations": (
            _layer_activation_bytes(model, prefill_rows * prompt, tensor, act)
            + _attention_bytes(model, prefill_rows, prompt, prompt, tensor, setup)),
        "FSDP-gathered weights": gathered,
    }

    rows = setup.update_rows_per_chip
    seq = setup.sequence_tokens
    tokens = rows * seq
    logit_tokens = min(tokens, setup.logits_chunk_tokens or tokens)
    layer = _layer_activation_bytes(model, tokens, tensor, act)
    attention = _attention_bytes(model, rows, seq, seq, tensor, setup)
    update = {"grads": (trainable + critic) * param_bytes}
    if setup.micro_steps > 1:
        update["grad accumulator"] = (trainable + critic) * param_bytes
    if setup.optimizer_temporaries:
        update["optimizer update"] = (trainable + critic) * FP32
    if setup.remat:  # boundaries kept; one layer recomputed, its values and gradients live
        update["remat checkpoints"] = model.layers * tokens * model.hidden * act
        update["layer activations"] = 2 * layer
        update["attention probs"] = 2 * attention
    else:  # every layer's values kept for the backward pass, plus one layer's gradients
        update["layer activations"] = (model.layers + 1) * layer
        update["attention probs"] = (model.layers + 1) * attention
    update["logits"] = 2 * logit_tokens * _divide(model.vocab, tensor) * FP32
    update["FSDP-gathered weights"] = gathered
    return MemoryPlan(resident=resident, rollout=rollout, update=update)


def plan_for_run(config: Any, model: Any, mesh_shape: tuple[int, int, int]) -> MemoryPlan:
    """The per-chip plan of a trainer run: ``config`` its ``ml_collections`` config, ``model``
    a Qwen2 config (:class:`~hiper_jax.models.qwen2.Qwen2Config`, HF config or
    ``config.json`` dict) or a :class:`ModelShape`, ``mesh_shape`` ``(data, fsdp, tensor)``."""
    shape = model if isinstance(model, ModelShape) else ModelShape.from_config(model)
    data, fsdp, tensor = mesh_shape
    return memory_plan(shape, data, fsdp, tensor, TrainingSetup.from_run_config(config, data * fsdp))


def trainable_params(model: ModelShape, setup: TrainingSetup = TrainingSetup()) -> dict[str, int]:
    """Parameters that train (and get gradients and AdamW moments), in all: ``policy`` and
    ``critic`` (value heads, plus its backbone or, with LoRA, its own adapters)."""
    heads = sum(t.numel for t in model.tensors(value_heads=3)[-2:])
    if setup.lora_rank:
        policy = sum(t.numel for t in model.lora_tensors(setup.lora_rank))
        return {"policy": policy, "critic": heads + (policy if setup.separate_critic else 0)}
    critic = sum(t.numel for t in model.tensors(lm_head=False, value_heads=3)) \
        if setup.separate_critic else heads
    return {"policy": model.param_count, "critic": critic}


_LORA_7B = {"lora_rank": 16, "fp32_master": False, "prefill_rows_per_chip": 4}

# README tables: (model, accelerator, mesh (data, fsdp, tensor), setup changes, note).
README_PLANS = (
    ("1.5b", "v4-8", (1, 4, 1), {}, ""),
    ("1.5b", "v5litepod-8", (1, 8, 1), {}, ""),
    ("1.5b", "v5p-16", (1, 8, 1), {}, ""),
    ("7b", "v4-8", (1, 4, 1), {}, "too small"),
    ("7b", "v4-32", (1, 16, 1), {}, ""),
    ("7b", "v5litepod-32", (1, 32, 1), {"logits_chunk_tokens": 512}, "chunked logits"),
    ("7b", "v5p-16", (1, 8, 1), {}, "recommended"),
    ("7b", "v4-8", (1, 4, 1), _LORA_7B, "LoRA r=16, bf16 weights, prefill 4 rows"),
    ("7b", "v5litepod-8", (1, 8, 1), _LORA_7B, "LoRA r=16, bf16 weights, prefill 4 rows"),
)


def _gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def readme_table() -> str:
    """The per-chip memory table of the README (Markdown), computed."""
    header = ("| model | slice | mesh (data, fsdp, tensor) | resident | rollout (of which KV) | "
              "update | peak | HBM | fits |")
    lines = [header, "|---|---|---|--:|--:|--:|--:|--:|---|"]
    for key, accel_name, (data, fsdp, tensor), changes, note in README_PLANS:
        accel = ACCELERATORS[accel_name]
        plan = memory_plan(QWEN2_5[key], data, fsdp, tensor, TrainingSetup(**changes))
        fits = "yes" if plan.fits(accel.hbm_gib) else "no"
        lines.append(
            f"| {QWEN2_5[key].name} | {accel_name} ({accel.chips} chips) | "
            f"({data}, {fsdp}, {tensor}) | {_gib(sum(plan.resident.values()))} | "
            f"{_gib(sum(plan.rollout.values()))} ({_gib(plan.rollout['KV cache'])}) | "
            f"{_gib(sum(plan.update.values()))} | "
            f"{_gib(plan.peak_bytes)} | {accel.hbm_gib:g} | {fits}"
            + (f" ({note})" if note else "") + " |")
    return "\n".join(lines)


def breakdown(model: ModelShape, data: int, fsdp: int, tensor: int,
              setup: TrainingSetup = TrainingSetup()) -> str:
    """Every term of :func:`memory_plan` in GiB per chip, one per line."""
    plan = memory_plan(model, data, fsdp, tensor, setup)
    lines = [f"{model.name} ({model.param_count / 1e9:.2f}B params), mesh (data={data}, "
             f"fsdp={fsdp}, tensor={tensor}), GiB per chip:"]
    for phase in ("resident", "rollout", "update"):
        for name, value in getattr(plan, phase).items():
            lines.append(f"  {phase:8s} {name:24s} {_gib(value):>7s}")
    lines.append(f"  peak = resident + max(rollout, update) = {_gib(plan.peak_bytes)}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(QWEN2_5), help="print one model's breakdown")
    parser.add_argument("--mesh", type=int, nargs=3, metavar=("DATA", "FSDP", "TENSOR"),
                        default=(1, 8, 1))
    args = parser.parse_args(argv)
    if args.model:
        print(breakdown(QWEN2_5[args.model], *args.mesh))
    else:
        print(readme_table())
        print()
        print(breakdown(QWEN2_5["7b"], 1, 8, 1))


if __name__ == "__main__":
    main()
