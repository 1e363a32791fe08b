"""Training configuration: the base ``ml_collections`` config and its validation.

Config files (:mod:`hiper_jax.configs`) start from :func:`base_config` and override what they need.
:func:`validate` runs at start-up, before any compilation or environment start, and names the
field of the first problem it finds: an unknown key, a wrong type, or an impossible value.
"""

from __future__ import annotations

import difflib
import os
from typing import Any, Sequence

import ml_collections

from hiper_jax.rollout.adapters import EnvSettings, adapter_names

from hiper_jax.vocab import (BATCH_AXES, CRITIC_FREE_ESTIMATORS, ESTIMATOR_NAMES, GROUP_ESTIMATORS,
                             KL_ESTIMATORS, MESH_AXES, OLD_LOGP_SOURCES)
DTYPES = ("float32", "bfloat16", "float16")
REMAT_MODES = ("none", "layer")  # ppo.remat: keep every activation, or recompute each layer
CONSTRAINTS = ("none", "grammar")
# The projections LoRA can wrap (hiper_jax.models.qwen2.LORA_TARGETS; this module imports no JAX).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def base_config() -> ml_collections.ConfigDict:
    """Every key the trainer knows, with defaults for a small CPU run."""
    c = ml_collections.ConfigDict()
    c.env = dict(
        name="alfworld",
        num_envs=8,                 # parallel training episodes per iteration (all hosts)
        max_turns=50,               # episode step limit
        success_reward=10.0,
        games_dir="",               # ALFWorld games / WebShop data; "" = generate into out_dir
        num_train_games=64,         # generated when games_dir is ""
        num_eval_games=24,
        task_types=(),              # () = all of the env's task types
        max_receptacles=8,          # ALFWorld generated scenes: receptacles listed at most
        max_distractors=4,          # ALFWorld generated scenes: other object types at most
        env_kwargs={},              # extra keyword arguments for the env constructor
        envs_per_worker=4,
        step_timeout_s=60.0,
        # An episode cut by an env worker that died, hung or raised is played again from its
        # start on a fresh worker up to this many times, then dropped from the update (its
        # batch row masked); 0 = drop at once. Cut episodes are never trained on.
        max_replays=2,
        # A rollout whose fraction of cut episodes exceeds this stops the run with an error.
        max_lost_fraction=0.5,
        # > 0: continuous episodes. Each iteration plays exactly this many training env turns;
        # an env whose episode ends starts the next task at once (the iteration's tasks, in
        # turn), so decode batches stay full. Episodes still running when the budget is spent
        # are cut as truncated (see advantage.bootstrap_truncated). 0 = one episode per env.
        turn_budget=0,
    )
    c.model = dict(
        checkpoint="",              # HF checkpoint directory (config.json + safetensors)
        tokenizer="",               # "" = the checkpoint directory
        param_dtype="float32",
        compute_dtype="float32",
        critic="separate",          # "separate" backbone (as published) or "shared"
        # > 0: LoRA adapters of this rank on lora_targets; only they (and the value heads) train,
        # the checkpoint's weights stay frozen and are the reference policy (no copy), and a
        # separate critic gets adapters of its own on the same frozen weights.
        lora_rank=0,
        lora_alpha=16.0,            # adapter scale = lora_alpha / lora_rank
        lora_targets=LORA_TARGETS,
        # Decoder layers per step of the layer scan in the log-prob/value passes and the
        # update (>= the model's depth: fully unrolled). Same numbers; unrolled is faster on CPU
        # for shallow models and compiles longer as depth grows.
        scan_unroll=1,
        # Qwen2.5-VL checkpoints (model_type "qwen2_5_vl"): the vision tower keeps the
        # checkpoint's weights (True, training it, is not supported yet), and images are padded
        # to a multiple of this many patches (a multiple of the tower's spatial_merge_size**2)
        # so few programs compile.
        train_vision=False,
        patch_multiple=256,
    )
    c.prompt = dict(style="plan_execute", history_turns=2, max_prompt_tokens=2048)
    c.sampling = dict(
        temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=512,
        eval_temperature=0.4, prompt_length_multiple=64,
        # "grammar": responses follow the prompt style's format and name an admissible action
        # (hiper_jax.agent.grammar), with exact log-probs of that constrained distribution in
        # the update; "none": free generation (HiPER's setting, invalid-action penalty).
        constraint="none",
        max_text_tokens=24,         # constrained free text (subgoal, slot fillers) at most
        # True: each host samples on a mesh over its own chips (sampling.mesh), with the
        # weights and KV cache split over them and prompt rows over the rest: every chip of a
        # host works during rollouts, and no host waits on another while envs step. The copy is
        # made from the training weights once per rollout (collective, never whole on one
        # chip) and freed before the update. False: one process samples with the training
        # mesh's arrays as they are, several processes with a whole copy on each host's first
        # chip (the earlier behaviour).
        host_mesh=False,
        # The host mesh's (data, fsdp, tensor) sizes over one host's chips, as in `mesh`: -1
        # takes the rest; tensor=0 (auto) is the largest size that divides both the chips left
        # and the model's KV heads (so the KV cache splits over tensor). Weights split over
        # fsdp (hidden) and tensor (heads, MLP, vocab); prompt rows and the KV cache over
        # data x fsdp.
        mesh=dict(data=-1, fsdp=1, tensor=0),
    )
    c.advantage = dict(
        estimator="hae", gamma=1.0, lam_turn=1.0, lam_seg=0.95, bootstrap_truncated=True,
        keep_penalty=-0.3, keep_penalty_mode="normalized", invalid_action_penalty=0.1,
        keep_consistency_penalty=-0.3, normalize=True,
        rollouts_per_task=1,        # > 1 groups rollouts of one task (needed by grpo/rloo/gigpo)
        gigpo_step_weight=1.0,      # gigpo: weight of the step-level (anchor state) advantage
        gigpo_mode="mean_norm",     # gigpo: "mean_norm" (no std) or "mean_std_norm"
        gigpo_similarity=1.0,       # gigpo: 1 = anchors are equal observations; < 1 = difflib ratio
    )
    c.ppo = dict(
        actor_lr=1e-6, critic_lr=1e-5, weight_decay=0.0, clip_ratio=0.2, dual_clip=3.0,
        kl_coef=0.01, kl_estimator="low_var_kl", entropy_coef=0.001, value_clip=0.5,
        max_grad_norm=1.0, epochs=1, mini_batch_rows=32, micro_batch_rows=8,
        length_multiple=64,
        # Rows of similar length share a mini-batch (and a log-prob/value pass chunk), cut to
        # the bucketed width of its longest row: much less padding, a few compiled widths.
        group_by_length=True,
        # Several turns per update row (segments up to the length bucket; attention stays inside
        # each), for the update and the log-prob/value passes; the same loss, fewer padding tokens.
        pack_rows=False,
        pack_length=0,              # packed row width; 0: the batch's length bucket
        value_coef=1.0,             # value-loss weight; < 1 keeps a shared backbone the policy's
        # The first this many iterations update the critic only (the actor stays the warm
        # start), so the first policy step sees a baseline fitted to the warm start's returns.
        critic_warmup_iterations=0,
        # Memory switches (hiper_jax.memory_plan reads them): "layer" recomputes each decoder
        # layer's activations in the backward pass of the update (keeps only the residual
        # stream at layer boundaries), "none" keeps them all.
        remat="none",
        # dtype of the frozen reference policy's copy (the KL term's log-probs; with LoRA the
        # frozen base is the reference and no copy is made).
        ref_dtype="bfloat16",
        logits_chunk_tokens=128,    # positions per chunk of the loss's logits [rows, chunk, V]
        # Where the update's old log-probs come from: "recompute" (a log-prob pass of the
        # actor over the batch, as published trainers do) or "sampler" (the log-probs the
        # sampler drew the tokens with: the behaviour policy's own, and no pass at all for a
        # critic-free estimator without a KL term). The sampler-vs-learner mismatch is then
        # read at the update's first step.
        old_logp="recompute",
    )
    c.train = dict(
        iterations=150, eval_every=10, eval_episodes=0,  # 0 = every eval game once
        max_env_turns=0,            # > 0: stop once this many training env turns were played
        checkpoint_every=10, keep_checkpoints=3, out_dir="runs/default", seed=0,
        resume=False, tensorboard=True, wandb_project="",
        # On resume, a damaged newest checkpoint is reported and the newest intact one is
        # restored; False: stop with the error instead.
        restore_fallback=True,
        # Stop (non-zero exit) after this many consecutive iterations whose update skipped
        # every step for a non-finite loss or gradient.
        max_skipped_updates=3,
    )
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.distributed = dict(coordinator_address="", num_processes=0, process_id=-1)
    return c


def published_hiper_config(env_name: str, checkpoint: str) -> ml_collections.ConfigDict:
    """The published HiPER setting (128 envs, gamma 1, lam_turn 1, lam_seg 0.95, normalised keep
    penalty -0.3 on ALFWorld / -3.5 on WebShop, keep-consistency -0.3, invalid-action penalty
    0.1, bootstrap on truncation for ALFWorld only, normalised advantages, temperature 1.0,
    prompts <= 2048 and responses <= 512 tokens, 150 iterations, actor/critic lr 1e-6/1e-5)
    for a Qwen2.5 checkpoint on an accelerator mesh (bf16 compute, fp32 master weights, FSDP)."""
    c = base_config()
    alfworld = env_name == "alfworld"
    c.env.name = env_name
    c.env.num_envs = 128
    c.env.max_turns = 50 if alfworld else 15
    c.env.num_train_games = 3600 if alfworld else 1
    c.env.num_eval_games = 140 if alfworld else 500
    c.env.envs_per_worker = 8
    if not alfworld:
        c.env.env_kwargs = {"num_products": 100_000}
    c.model.checkpoint = checkpoint
    c.model.param_dtype = "float32"
    c.model.compute_dtype = "bfloat16"
    c.model.critic = "separate"
    c.prompt.history_turns = 2
    c.prompt.max_prompt_tokens = 2048
    c.sampling.temperature = 1.0
    c.sampling.eval_temperature = 0.4
    c.sampling.max_new_tokens = 512
    c.sampling.prompt_length_multiple = 256
    c.sampling.host_mesh = True  # every chip of a host samples (tensor over the KV heads, rows over the rest)
    c.advantage.estimator = "hae"
    c.advantage.gamma = 1.0
    c.advantage.lam_turn = 1.0
    c.advantage.lam_seg = 0.95
    c.advantage.keep_penalty = -0.3 if alfworld else -3.5
    c.advantage.keep_penalty_mode = "normalized"
    c.advantage.keep_consistency_penalty = -0.3
    c.advantage.invalid_action_penalty = 0.1
    c.advantage.bootstrap_truncated = alfworld
    c.advantage.normalize = True
    c.ppo.actor_lr = 1e-6
    c.ppo.critic_lr = 1e-5
    c.ppo.clip_ratio = 0.2
    c.ppo.dual_clip = 3.0
    c.ppo.kl_coef = 0.01
    c.ppo.kl_estimator = "low_var_kl"
    c.ppo.entropy_coef = 0.001
    c.ppo.value_clip = 0.5
    c.ppo.max_grad_norm = 1.0
    c.ppo.mini_batch_rows = 256
    c.ppo.micro_batch_rows = 16
    c.ppo.length_multiple = 256
    c.ppo.remat = "layer"
    c.train.iterations = 150
    c.train.eval_every = 10
    c.train.checkpoint_every = 5
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    return c


class ConfigError(ValueError):
    """A config problem; the message names the field (``config field section.key: ...``)."""


def _fail(field: str, message: str):
    raise ConfigError(f"config field {field}: {message}")


def _dotted_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every section and key path of ``config`` (``env``, ``env.num_envs``, ...)."""
    keys = []
    for key in config.keys():
        keys.append(f"{prefix}{key}")
        value = config[key]
        if isinstance(value, ml_collections.ConfigDict) and key != "env_kwargs":
            keys += _dotted_keys(value, f"{prefix}{key}.")
    return keys


def closest_key(field: str, reference: ml_collections.ConfigDict | None = None) -> str:
    """The valid dotted key most like ``field`` (e.g. ``train.seeds`` -> ``train.seed``):
    among the siblings in the same section when that section exists, else among all keys."""
    reference = base_config() if reference is None else reference
    parent, _, name = field.rpartition(".")
    node = reference
    for part in parent.split(".") if parent else ():
        node = node[part] if isinstance(node, ml_collections.ConfigDict) and part in node else None
    if isinstance(node, ml_collections.ConfigDict) and len(node):
        best = difflib.get_close_matches(name, list(node.keys()), n=1, cutoff=0.0)[0]
        return f"{parent}.{best}" if parent else best
    return difflib.get_close_matches(field, _dotted_keys(reference), n=1, cutoff=0.0)[0]


def _unknown_key(field: str) -> None:
    _fail(field, f"unknown key; the closest valid key is {closest_key(field)}")


def check_override_paths(argv: Sequence[str], flag: str = "config") -> None:
    """Checks the dotted paths of ``--config.a.b=value`` command-line overrides against the
    known keys before any flag parsing (the parser's own error is a long traceback ending in
    ``AttributeError: 'b'``); raises :class:`ConfigError` for the first unknown one. Keys
    under ``env.env_kwargs`` are free-form and not checked."""
    reference = base_config()
    for arg in argv:
        if not arg.startswith(f"--{flag}."):
            continue
        path = arg[len(flag) + 3:].split("=", 1)[0]
        node, walked = reference, []
        for part in path.split("."):
            walked.append(part)
            if not isinstance(node, ml_collections.ConfigDict) or walked[-2:-1] == ["env_kwargs"]:
                break
            if part not in node:
                _unknown_key(".".join(walked))
            node = node[part]


def _check_types(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict, prefix=""):
    for key in config.keys():
        field = f"{prefix}{key}"
        if key not in reference:
            _unknown_key(field)
        value, default = config[key], reference[key]
        if isinstance(default, ml_collections.ConfigDict) and key != "env_kwargs":
            if not isinstance(value, ml_collections.ConfigDict):
                _fail(field, f"must be a section, got {type(value).__name__}")
            _check_types(value, default, prefix=field + ".")
            continue
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, (tuple, list)):
            ok = isinstance(value, (tuple, list))
        else:
            ok = isinstance(value, type(default))
        if not ok:
            _fail(field, f"expected {type(default).__name__}, got {type(value).__name__} ({value!r})")


def _require(condition: bool, field: str, message: str):
    if not condition:
        _fail(field, message)


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None,
             check_paths: bool = True, num_processes: int | None = None) -> None:
    """Raises :class:`ConfigError` (a ValueError) naming the first bad field; returns None when the config is usable.

    Args:
      num_devices: the global device count the mesh must divide (None: not checked).
      num_processes: the job's process count; with several, mini-batches must split evenly
        over the mesh's batch shards (checked with ``num_devices``).
      check_paths: check that named input paths (checkpoint, games, demos) exist.
    """
    # Imported here, not at the top: config files import this module, and loading one (e.g. in
    # a notebook before choosing a runtime) should not import JAX.
    from hiper_jax.advantages import GIGPO_MODES
    from hiper_jax.hae import KEEP_PENALTY_MODES

    _check_types(config, base_config())
    env, model, adv, ppo, train, mesh = (config.env, config.model, config.advantage, config.ppo,
                                         config.train, config.mesh)
    _require(env.name in adapter_names(), "env.name",
             f"must be a registered env, one of {adapter_names()}, got {env.name!r}")
    for field in ("num_envs", "max_turns", "num_eval_games", "envs_per_worker"):
        _require(env[field] >= 1, f"env.{field}", f"must be >= 1, got {env[field]}")
    _require(env.num_train_games >= 1 or env.games_dir, "env.num_train_games",
             "must be >= 1 when env.games_dir is empty")
    for field in ("param_dtype", "compute_dtype"):
        _require(model[field] in DTYPES, f"model.{field}", f"must be one of {DTYPES}, got {model[field]!r}")
    _require(model.critic in ("separate", "shared"), "model.critic",
             f"must be 'separate' or 'shared', got {model.critic!r}")
    _require(model.patch_multiple >= 1, "model.patch_multiple", f"must be >= 1, got {model.patch_multiple}")
    _require(model.scan_unroll >= 1, "model.scan_unroll", f"must be >= 1, got {model.scan_unroll}")
    _require(model.lora_rank >= 0, "model.lora_rank", f"must be >= 0 (0 = off), got {model.lora_rank}")
    _require(model.lora_alpha > 0, "model.lora_alpha", f"must be > 0, got {model.lora_alpha}")
    unknown = [t for t in model.lora_targets if t not in LORA_TARGETS]
    _require(not unknown, "model.lora_targets", f"unknown projection(s) {unknown}; choose from {LORA_TARGETS}")
    _require(bool(model.lora_targets) or not model.lora_rank, "model.lora_targets",
             "must name at least one projection when model.lora_rank > 0")
    _require(config.prompt.style in ("plan_execute", "flat"), "prompt.style",
             f"must be 'plan_execute' or 'flat', got {config.prompt.style!r}")
    _require(config.prompt.max_prompt_tokens >= 16, "prompt.max_prompt_tokens", "must be >= 16")
    sampling = config.sampling
    for field in ("temperature", "eval_temperature"):
        _require(sampling[field] >= 0, f"sampling.{field}", "must be >= 0 (0 = greedy)")
    _require(0 < sampling.top_p <= 1, "sampling.top_p", f"must be in (0, 1], got {sampling.top_p}")
    _require(sampling.top_k >= 0, "sampling.top_k", "must be >= 0 (0 = off)")
    _require(sampling.max_new_tokens >= 1, "sampling.max_new_tokens", "must be >= 1")
    _require(sampling.constraint in CONSTRAINTS, "sampling.constraint",
             f"must be one of {CONSTRAINTS}, got {sampling.constraint!r}")
    _require(sampling.max_text_tokens >= 1, "sampling.max_text_tokens", "must be >= 1")
    for axis in MESH_AXES:
        size = sampling.mesh[axis]
        allowed = size >= -1 if axis == "tensor" else (size == -1 or size >= 1)
        _require(allowed, f"sampling.mesh.{axis}",
                 f"must be >= 1 or -1 (the rest){' or 0 (auto)' if axis == 'tensor' else ''}, got {size}")
    _require([sampling.mesh[a] for a in MESH_AXES].count(-1) <= 1, "sampling.mesh",
             f"at most one axis may be -1, got {[sampling.mesh[a] for a in MESH_AXES]}")
    if sampling.mesh.tensor == 0:
        _require(-1 in (sampling.mesh.data, sampling.mesh.fsdp), "sampling.mesh.tensor",
                 "0 (auto) needs sampling.mesh.data or sampling.mesh.fsdp to be -1 (the chips "
                 "tensor leaves)")
    if sampling.constraint != "none":
        _require(sampling.top_p == 1 and sampling.top_k == 0, "sampling.constraint",
                 "constrained sampling renormalises over the allowed tokens only; set "
                 "sampling.top_p=1 and sampling.top_k=0 so the update's log-probs stay exact")
    _require(adv.estimator in ESTIMATOR_NAMES, "advantage.estimator",
             f"must be one of {ESTIMATOR_NAMES}, got {adv.estimator!r}")
    for field in ("gamma", "lam_turn", "lam_seg"):
        _require(0 <= adv[field] <= 1, f"advantage.{field}", f"must be in [0, 1], got {adv[field]}")
    _require(adv.keep_penalty_mode in KEEP_PENALTY_MODES, "advantage.keep_penalty_mode",
             f"must be one of {KEEP_PENALTY_MODES}, got {adv.keep_penalty_mode!r}")
    _require(adv.rollouts_per_task >= 1, "advantage.rollouts_per_task", "must be >= 1")
    _require(adv.gigpo_mode in GIGPO_MODES, "advantage.gigpo_mode",
             f"must be one of {GIGPO_MODES}, got {adv.gigpo_mode!r}")
    _require(0 < adv.gigpo_similarity <= 1, "advantage.gigpo_similarity",
             f"must be in (0, 1] (1 = exact match), got {adv.gigpo_similarity}")
    if adv.estimator in GROUP_ESTIMATORS:
        _require(adv.rollouts_per_task >= 2, "advantage.rollouts_per_task",
                 f"must be >= 2 for the group-based estimator {adv.estimator!r}")
    _require(env.num_envs % adv.rollouts_per_task == 0, "env.num_envs",
             f"must be a multiple of advantage.rollouts_per_task={adv.rollouts_per_task}")
    _require(ppo.kl_estimator in KL_ESTIMATORS, "ppo.kl_estimator",
             f"must be one of {KL_ESTIMATORS}, got {ppo.kl_estimator!r}")
    _require(ppo.dual_clip > 1, "ppo.dual_clip", f"must be > 1, got {ppo.dual_clip}")
    for field in ("actor_lr", "critic_lr", "clip_ratio", "value_clip", "max_grad_norm", "value_coef"):
        _require(ppo[field] > 0, f"ppo.{field}", f"must be > 0, got {ppo[field]}")
    _require(ppo.critic_warmup_iterations >= 0, "ppo.critic_warmup_iterations",
             f"must be >= 0, got {ppo.critic_warmup_iterations}")
    if ppo.critic_warmup_iterations:
        _require(adv.estimator not in CRITIC_FREE_ESTIMATORS, "ppo.critic_warmup_iterations",
                 f"the estimator {adv.estimator!r} has no critic to warm up; set it to 0")
    for field in ("epochs", "mini_batch_rows", "micro_batch_rows", "length_multiple"):
        _require(ppo[field] >= 1, f"ppo.{field}", f"must be >= 1, got {ppo[field]}")
    _require(ppo.pack_length >= 0, "ppo.pack_length", f"must be >= 0, got {ppo.pack_length}")
    _require(ppo.remat in REMAT_MODES, "ppo.remat", f"must be one of {REMAT_MODES}, got {ppo.remat!r}")
    _require(ppo.ref_dtype in DTYPES, "ppo.ref_dtype", f"must be one of {DTYPES}, got {ppo.ref_dtype!r}")
    _require(ppo.logits_chunk_tokens >= 1, "ppo.logits_chunk_tokens",
             f"must be >= 1, got {ppo.logits_chunk_tokens}")
    _require(ppo.old_logp in OLD_LOGP_SOURCES, "ppo.old_logp",
             f"must be one of {OLD_LOGP_SOURCES}, got {ppo.old_logp!r}")
    for field in ("iterations", "eval_every", "checkpoint_every", "keep_checkpoints"):
        _require(train[field] >= 0 if field == "iterations" else train[field] >= 1,
                 f"train.{field}", f"must be positive, got {train[field]}")
    _require(env.max_replays >= 0, "env.max_replays", f"must be >= 0, got {env.max_replays}")
    _require(0 <= env.max_lost_fraction <= 1, "env.max_lost_fraction",
             f"must be in [0, 1] (1 = never stop), got {env.max_lost_fraction}")
    _require(train.max_skipped_updates >= 1, "train.max_skipped_updates",
             f"must be >= 1, got {train.max_skipped_updates}")
    _require(env.turn_budget >= 0, "env.turn_budget",
             f"must be >= 0 (0 = one episode per env), got {env.turn_budget}")
    if env.turn_budget:
        _require(adv.rollouts_per_task == 1, "advantage.rollouts_per_task",
                 "must be 1 with env.turn_budget > 0 (continuous episodes form no task groups)")
    _require(train.max_env_turns >= 0, "train.max_env_turns",
             f"must be >= 0 (0 = no budget), got {train.max_env_turns}")
    _require(ppo.mini_batch_rows % ppo.micro_batch_rows == 0, "ppo.mini_batch_rows",
             f"must be a multiple of ppo.micro_batch_rows={ppo.micro_batch_rows}")
    _require(bool(train.out_dir), "train.out_dir", "must not be empty")
    sizes = [mesh[axis] for axis in MESH_AXES]
    _require(all(s == -1 or s >= 1 for s in sizes), "mesh", f"sizes must be >= 1 or -1, got {sizes}")
    _require(sizes.count(-1) <= 1, "mesh", f"at most one axis may be -1, got {sizes}")
    if num_devices is not None:
        fixed = 1
        for s in sizes:
            fixed *= s if s != -1 else 1
        _require(num_devices % fixed == 0 and (-1 in sizes or fixed == num_devices), "mesh",
                 f"data x fsdp x tensor = {sizes} does not fit {num_devices} devices")
        if num_processes is not None and num_processes > 1:
            resolved = dict(zip(MESH_AXES, (s if s != -1 else num_devices // fixed for s in sizes)))
            shards = 1
            for axis in BATCH_AXES:
                shards *= resolved[axis]
            _require(ppo.mini_batch_rows % shards == 0, "ppo.mini_batch_rows",
                     f"must be a multiple of the mesh's {shards} batch shards with several processes")
        if sampling.host_mesh:
            from hiper_jax.mesh_shape import host_mesh_shape

            processes = num_processes or 1
            try:  # tensor=0 resolves against the model's KV heads once it is loaded
                host_mesh_shape(num_devices // processes, **sampling.mesh.to_dict(), kv_heads=1)
            except ValueError as error:
                _fail("sampling.mesh", f"{error} (over one host's {num_devices // processes} devices)")
    if check_paths:
        for field, path in (("model.checkpoint", model.checkpoint), ("model.tokenizer", model.tokenizer),
                            ("env.games_dir", env.games_dir)):
            if path:
                _require(os.path.exists(path), field, f"path does not exist: {path}")
        _require(bool(model.checkpoint), "model.checkpoint", "must name a HF checkpoint directory")


def estimator_options(adv: ml_collections.ConfigDict) -> dict[str, Any]:
    """Keyword options for :func:`hiper_jax.advantages.get_estimator` from the ``advantage``
    section (GiGPO's step weight and mode; none for the other estimators)."""
    if adv.estimator == "gigpo":
        return {"step_weight": float(adv.gigpo_step_weight), "mode": adv.gigpo_mode}
    return {}


def batch_settings(config: ml_collections.ConfigDict):
    """The :class:`hiper_jax.train.batch.BatchSettings` of a config (imports JAX)."""
    from hiper_jax.train.batch import BatchSettings

    return BatchSettings(
        estimator=config.advantage.estimator, estimator_options=estimator_options(config.advantage),
        max_turns=config.env.max_turns, rows=config.ppo.mini_batch_rows,
        length_multiple=config.ppo.length_multiple, group_by_length=config.ppo.group_by_length,
        temperature=config.sampling.temperature or 1.0, reference_pass=bool(config.ppo.kl_coef),
        gigpo_similarity=config.advantage.gigpo_similarity, pack_rows=config.ppo.pack_rows,
        pack_length=config.ppo.pack_length, old_logp=config.ppo.old_logp)


def env_settings(config: ml_collections.ConfigDict) -> EnvSettings:
    """The ``env`` section's entries an env adapter reads (see
    :class:`hiper_jax.rollout.adapters.EnvSettings`)."""
    env = config.env
    kwargs = env.env_kwargs.to_dict() if hasattr(env.env_kwargs, "to_dict") else dict(env.env_kwargs)
    return EnvSettings(kwargs=kwargs, success_reward=env.success_reward, games_dir=env.games_dir,
                       num_train_games=env.num_train_games, num_eval_games=env.num_eval_games,
                       task_types=tuple(env.task_types), max_receptacles=env.max_receptacles,
                       max_distractors=env.max_distractors, seed=config.train.seed)


def to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """A plain JSON-able dict of the config (for saving beside a run)."""
    return config.to_dict()
