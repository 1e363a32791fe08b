"""Per-chip memory arithmetic for PPO training of a Qwen2-shaped policy on a device mesh.

``python -m hiper_jax.memory_plan`` prints the tables of the README's "Running on Cloud TPU"
section (a test checks that the README shows exactly what this module computes).

What is counted, per chip (bytes; ``P`` parameters of a tensor after sharding):

* resident all run long: policy params (fp32 master, or bf16), AdamW moments (2 x fp32), the
  frozen reference policy (bf16), and the critic (its own backbone, value heads, fp32 params
  and AdamW moments) unless it shares the policy backbone; with LoRA (``lora_rank``) the
  moments, gradients and the critic's own weights are those of the adapters and heads only,
  and there is no reference copy;
* rollout phase, on the sampling mesh (:func:`sampling_terms`): the sampler's compute-dtype
  copy of the policy (made for each rollout, freed before the update), the KV cache of one
  generate call's rows (``prompt + response - 1`` slots), the prefill working set, the decode
  logits, and the weights FSDP gathers at once;
* update phase: gradients (policy and critic, in the params' dtype; with several micro-batches
  per step also their accumulator), AdamW's update tensors (run plans only), the activations of
  one micro-batch with per-layer rematerialisation, and the weights FSDP gathers at once.

Peak = resident + max(rollout, update). Layout: weights and optimizer states are split over
``fsdp`` along their hidden (embed) dimension and over ``tensor`` along heads, KV heads, MLP
width or vocab, as the model's sharding rules place them; a mesh axis that does not divide a
dimension leaves the tensor whole along it. Update rows are split over ``data x fsdp``.

Sampling runs on a per-host mesh (``sampling.host_mesh``, ``TrainingSetup.sampling_mesh``):
each host plays ``num_envs / hosts`` envs in two groups (the collector's pipelining), one
generate call of ``ceil(envs / 2)`` rows at a time (rounded up to a multiple of the host mesh's
``data x fsdp``, over which its rows and KV cache are split); the weights are split over the
host mesh's ``fsdp`` and ``tensor``, the KV cache's KV heads over its ``tensor`` where it
divides them. ``sampling_mesh=(1, 1, 1)`` is the whole copy on one chip (several processes
with ``sampling.host_mesh`` off); None plans sampling on the training mesh itself (one host).
Activation terms (bf16 unless stated):

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
``model.compute_dtype`` (activations, compute copy, gathered weights; bf16 in the defaults here),
``sampling.host_mesh`` and ``sampling.mesh``. ``benchmarks/bench_mesh.py`` compares the update
terms and the sampling terms with XLA's memory analysis of the compiled PPO step and of the
compiled sampler.

Not counted: XLA temporaries beyond these, fragmentation, collective buffers; the ``reserve``
of :meth:`MemoryPlan.fits` (10% of HBM by default) stands for them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
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
      prefill_rows_per_chip: rows prefilled at once per chip (None: all the rows of the chip's
        generate call, which is what the sampler does; smaller values are what-ifs for a
        chunked prefill, which is not built).
      fp32_master: float32 master params and grads (else bf16 params and grads).
      sampling_mesh: the ``(data, fsdp, tensor)`` mesh over one host's chips that samples
        (``sampling.host_mesh``); its size sets the hosts (the training mesh's chips / its
        chips), each playing ``num_envs / hosts`` envs. None: the training mesh, one host.
      hosts: the hosts (processes) the envs are split over; 0: the training mesh's chips / the
        sampling mesh's (e.g. ``sampling_mesh=(1, 1, 1), hosts=2``: a whole copy on the first
        chip of each of two hosts).
      rollout_groups: the collector's env groups; one group's rows are generated at a time.
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
    sampling_mesh: Optional[tuple[int, int, int]] = None
    hosts: int = 0
    rollout_groups: int = 2
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
    def from_run_config(cls, config: Any, batch_shards: int = 1,
                        sampling_mesh: Optional[tuple[int, int, int]] = None) -> "TrainingSetup":
        """What a trainer run keeps, from its ``ml_collections`` config (``hiper_jax.train.config``
        fields) on a mesh with ``batch_shards`` (data x fsdp) row shards, sampling on
        ``sampling_mesh`` (see :func:`plan_for_run`)."""
        micro_rows = config.ppo.micro_batch_rows
        rows_per_chip = max(micro_rows // batch_shards, 1)
        return cls(
            num_envs=config.env.num_envs, prompt_tokens=config.prompt.max_prompt_tokens,
            response_tokens=config.sampling.max_new_tokens, update_rows_per_chip=rows_per_chip,
            fp32_master=config.model.param_dtype == "float32",
            sampling_mesh=None if sampling_mesh is None else tuple(sampling_mesh),
            reference_policy=not config.model.lora_rank,
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
        if self.hosts < 0:
            raise ValueError(f"hosts must be >= 0 (0: inferred), got {self.hosts}")
        if self.rollout_groups < 1:
            raise ValueError(f"rollout_groups must be >= 1, got {self.rollout_groups}")
        if self.sampling_mesh is not None and (
                len(self.sampling_mesh) != 3 or min(self.sampling_mesh) < 1):
            raise ValueError(f"sampling_mesh must be three positive sizes (data, fsdp, tensor), "
                             f"got {self.sampling_mesh}")

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


def _prefill_bytes(model: ModelShape, rows: int, prompt: int, slots: int, tensor: int,
                   dtype_bytes: int, setup: "TrainingSetup") -> float:
    """The peak of one layer's prefill: its attention phase or its MLP phase (see
    :func:`sampling_terms`)."""
    tokens = rows * prompt
    d = model.head_dim
    q, kv = _divide(model.heads, tensor) * d, _divide(model.kv_heads, tensor) * d
    attention = (tokens * (2 * model.hidden + q + 2 * kv) * dtype_bytes
                 + 2 * _attention_bytes(model, rows, prompt, slots, tensor, setup))
    mlp = tokens * (2 * model.hidden + 3 * _divide(model.intermediate, tensor)) * dtype_bytes
    return max(attention, mlp)


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
    resident["policy AdamW"] = trainable * 2 * FP32
    if setup.reference_policy and not setup.lora_rank:
        resident["reference policy"] = policy * setup.reference_bytes
    resident["critic params + AdamW"] = critic * (param_bytes + 2 * FP32)

    act = setup.activation_bytes
    gathered = _gathered_weight_bytes(model, fsdp, tensor, act)
    sampling_mesh = setup.sampling_mesh or (data, fsdp, tensor)
    chips, host_chips = data * fsdp * tensor, math.prod(sampling_mesh)
    hosts = setup.hosts or chips // host_chips
    if chips % host_chips or chips % hosts or host_chips > chips // hosts:
        raise ValueError(f"the sampling mesh {sampling_mesh} ({host_chips} chips) must fit one of "
                         f"the {hosts} hosts of the training mesh's {chips} chips")
    rows = sampling_rows_per_chip(setup.num_envs, hosts, sampling_mesh, setup.rollout_groups)
    rollout = sampling_terms(model, sampling_mesh, rows, setup.prompt_tokens,
                             setup.response_tokens, act, setup.attention,
                             setup.prefill_rows_per_chip)

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


def sampling_rows_per_chip(num_envs: int, hosts: int, sampling_mesh: tuple[int, int, int],
                           groups: int = 2) -> int:
    """Rows of one generate call on one chip: each of ``hosts`` plays ``ceil(num_envs /
    hosts)`` envs in ``groups`` groups (fewer when it has fewer envs), one group per call,
    padded to a multiple of the host mesh's ``data x fsdp`` row shards (as the trainer's
    policy pads them) and split over them."""
    envs = math.ceil(num_envs / hosts)
    rows = math.ceil(envs / max(1, min(groups, envs)))
    return math.ceil(rows / (sampling_mesh[0] * sampling_mesh[1]))


def sampling_terms(model: ModelShape, mesh: tuple[int, int, int], rows_per_chip: int,
                   prompt_tokens: int, new_tokens: int, act_bytes: int = BF16,
                   attention: str = "naive", prefill_rows_per_chip: Optional[int] = None
                   ) -> dict[str, float]:
    """Per-chip bytes of one call of the sampler (:func:`hiper_jax.sampling.generate`) on the
    sampling mesh ``(data, fsdp, tensor)``, ``rows_per_chip`` rows of ``prompt_tokens`` prompt
    (left-padded) and ``new_tokens`` new tokens, in ``act_bytes`` (the compute dtype):

    * sampling weights: the unstacked compute-dtype copy, split over ``fsdp`` and ``tensor``;
    * KV cache: ``rows x (prompt + new - 1)`` slots of every layer's K and V, KV heads split
      over ``tensor`` where it divides them; and "KV cache copy", as much again: XLA keeps the
      cache the prefill fills beside the decode loop's copy (seen on one device; on some
      sharded meshes it updates in place, and then this overstates);
    * prefill activations: the larger of a layer's two phases over the prompt tokens, attention
      (residual, normed input, q, k, v and, with plain attention, the float32 scores and their
      softmax, ``rows x heads x prompt x slots`` each) and MLP (residual, normed input, gate,
      up and their product);
    * logits: four float32 ``rows x vocab`` buffers of a decode step (logits, log-probs, the
      sampling noise and its random bits; vocab over tensor);
    * FSDP-gathered weights, when ``fsdp > 1``: twice the whole model split over ``tensor``
      only. The sampler's layers are unrolled and its decode loop reads every weight each step,
      so XLA gathers all layers at once, for the prefill and (hoisted out of the loop) for
      decoding: ``fsdp`` on a sampling mesh costs memory instead of saving it (use ``tensor``
      and ``data``).
    """
    _, fsdp, tensor = mesh
    slots = prompt_tokens + new_tokens - 1
    prefill_rows = prefill_rows_per_chip or rows_per_chip
    setup = TrainingSetup(attention=attention)
    kv = (rows_per_chip * slots * 2 * model.layers * _divide(model.kv_heads, tensor)
          * model.head_dim * act_bytes)
    gathered = 2 * _sharded_params(model.tensors(), 1, tensor) * act_bytes if fsdp > 1 else 0.0
    return {
        "sampling weights": _sharded_params(model.tensors(), fsdp, tensor) * act_bytes,
        "KV cache": kv,
        "KV cache copy": kv,
        "prefill activations": _prefill_bytes(model, prefill_rows, prompt_tokens, slots, tensor,
                                              act_bytes, setup),
        "logits": 4 * rows_per_chip * _divide(model.vocab, tensor) * FP32,
        "FSDP-gathered weights": gathered,
    }


def plan_for_run(config: Any, model: Any, mesh_shape: tuple[int, int, int],
                 hosts: int = 1) -> MemoryPlan:
    """The per-chip plan of a trainer run: ``config`` its ``ml_collections`` config, ``model``
    a Qwen2 config (:class:`~hiper_jax.models.qwen2.Qwen2Config`, HF config or
    ``config.json`` dict) or a :class:`ModelShape`, ``mesh_shape`` ``(data, fsdp, tensor)``
    over ``hosts`` hosts (processes) with equal chips. Sampling: with ``sampling.host_mesh`` on
    ``sampling.mesh`` resolved over one host's chips; otherwise on the training mesh (one
    host) or, with several hosts, whole on each host's first chip."""
    from hiper_jax.mesh_shape import host_mesh_shape

    shape = model if isinstance(model, ModelShape) else ModelShape.from_config(model)
    data, fsdp, tensor = mesh_shape
    chips = data * fsdp * tensor
    if hosts < 1 or chips % hosts:
        raise ValueError(f"hosts={hosts} must divide the mesh's {chips} chips")
    if config.sampling.host_mesh:
        sampling = host_mesh_shape(chips // hosts, **dict(config.sampling.mesh), kv_heads=shape.kv_heads)
    else:
        sampling = None if hosts == 1 else (1, 1, 1)
    setup = TrainingSetup.from_run_config(config, data * fsdp, sampling)
    return memory_plan(shape, data, fsdp, tensor, dataclasses.replace(setup, hosts=hosts))


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


_LORA_7B = {"lora_rank": 16, "fp32_master": False, "num_envs": 64}
_FIRST_CHIP = {"sampling_mesh": (1, 1, 1)}  # sampling.host_mesh=False on several hosts

# README tables: (model, accelerator, mesh (data, fsdp, tensor), setup changes, note). Sampling
# runs on each host's chips with the published configs' sampling.mesh (tensor=0: as many as
# divide the KV heads, data the rest) unless the changes say otherwise.
README_PLANS = (
    ("1.5b", "v4-8", (1, 4, 1), {}, ""),
    ("1.5b", "v5litepod-8", (1, 8, 1), {}, ""),
    ("1.5b", "v5p-16", (1, 8, 1), {}, ""),
    ("7b", "v4-8", (1, 4, 1), {}, "too small"),
    ("7b", "v4-32", (1, 16, 1), {}, ""),
    ("7b", "v5litepod-32", (1, 32, 1), {"logits_chunk_tokens": 512}, "chunked logits"),
    ("7b", "v5litepod-32", (1, 32, 1), dict(_FIRST_CHIP, logits_chunk_tokens=512),
     "each host samples on its first chip"),
    ("7b", "v5p-16", (1, 8, 1), {}, "recommended"),
    ("7b", "v4-8", (1, 4, 1), _LORA_7B, "LoRA r=16, bf16 weights, 64 envs"),
    ("7b", "v5litepod-8", (1, 8, 1), _LORA_7B, "LoRA r=16, bf16 weights, 64 envs"),
)


def host_sampling_setup(model: ModelShape, accelerator: Accelerator, **changes) -> TrainingSetup:
    """The setup of a run on ``accelerator`` that samples on each host's chips with the
    published ``sampling.mesh`` (``data=-1, fsdp=1, tensor=0``), plus ``changes``."""
    from hiper_jax.mesh_shape import host_mesh_shape

    host_chips = accelerator.chips // accelerator.hosts
    mesh = host_mesh_shape(host_chips, data=-1, fsdp=1, tensor=0, kv_heads=model.kv_heads)
    return TrainingSetup(**{"sampling_mesh": mesh, "hosts": accelerator.hosts, **changes})


def _gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def readme_table() -> str:
    """The per-chip memory table of the README (Markdown), computed."""
    header = ("| model | slice | mesh (data, fsdp, tensor) | sampling mesh per host | resident | "
              "rollout (of which weights, KV) | update | peak | HBM | fits |")
    lines = [header, "|---|---|---|---|--:|--:|--:|--:|--:|---|"]
    for key, accel_name, (data, fsdp, tensor), changes, note in README_PLANS:
        accel = ACCELERATORS[accel_name]
        setup = host_sampling_setup(QWEN2_5[key], accel, **changes)
        plan = memory_plan(QWEN2_5[key], data, fsdp, tensor, setup)
        fits = "yes" if plan.fits(accel.hbm_gib) else "no"
        lines.append(
            f"| {QWEN2_5[key].name} | {accel_name} ({accel.chips} chips, {accel.hosts} "
            f"host{'s' if accel.hosts > 1 else ''}) | ({data}, {fsdp}, {tensor}) | "
            f"{tuple(setup.sampling_mesh)} | {_gib(sum(plan.resident.values()))} | "
            f"{_gib(sum(plan.rollout.values()))} ({_gib(plan.rollout['sampling weights'])}, "
            f"{_gib(plan.rollout['KV cache'])}) | {_gib(sum(plan.update.values()))} | "
            f"{_gib(plan.peak_bytes)} | {accel.hbm_gib:g} | {fits}"
            + (f" ({note})" if note else "") + " |")
    return "\n".join(lines)


def breakdown(model: ModelShape, data: int, fsdp: int, tensor: int,
              setup: TrainingSetup = TrainingSetup()) -> str:
    """Every term of :func:`memory_plan` in GiB per chip, one per line."""
    plan = memory_plan(model, data, fsdp, tensor, setup)
    sampling = setup.sampling_mesh or (data, fsdp, tensor)
    hosts = setup.hosts or (data * fsdp * tensor) // math.prod(sampling)
    lines = [f"{model.name} ({model.param_count / 1e9:.2f}B params), mesh (data={data}, "
             f"fsdp={fsdp}, tensor={tensor}), sampling mesh {tuple(sampling)} on each of {hosts} "
             f"host{'s' if hosts > 1 else ''}, GiB per chip:"]
    for phase in ("resident", "rollout", "update"):
        for name, value in getattr(plan, phase).items():
            lines.append(f"  {phase:8s} {name:24s} {_gib(value):>7s}")
    lines.append(f"  peak = resident + max(rollout, update) = {_gib(plan.peak_bytes)}")
    return "\n".join(lines)


README_BREAKDOWN = ("7b", "v5p-16", (1, 8, 1))


def readme_breakdown() -> str:
    """The README's breakdown: Qwen2.5-7B on the recommended v5p-16."""
    key, accel, mesh = README_BREAKDOWN
    return breakdown(QWEN2_5[key], *mesh, host_sampling_setup(QWEN2_5[key], ACCELERATORS[accel]))


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(QWEN2_5), help="print one model's breakdown")
    parser.add_argument("--mesh", type=int, nargs=3, metavar=("DATA", "FSDP", "TENSOR"),
                        default=(1, 8, 1))
    parser.add_argument("--sampling-mesh", type=int, nargs=3, metavar=("DATA", "FSDP", "TENSOR"),
                        help="--model: the per-host sampling mesh (default: the training mesh)")
    parser.add_argument("--hosts", type=int, default=0,
                        help="--model: hosts the chips are on (default: chips / sampling mesh)")
    args = parser.parse_args(argv)
    if args.model:
        setup = TrainingSetup(sampling_mesh=tuple(args.sampling_mesh) if args.sampling_mesh else None,
                              hosts=args.hosts)
        print(breakdown(QWEN2_5[args.model], *args.mesh, setup))
    else:
        print(readme_table())
        print()
        print(readme_breakdown())


if __name__ == "__main__":
    main()
