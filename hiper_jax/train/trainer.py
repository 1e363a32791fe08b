"""The training loop: collect -> log-probs and values -> advantages -> PPO update -> metrics.

Everything random is derived from ``(train.seed, iteration)``: the rollout key, the task order
and the mini-batch shuffles. A checkpoint therefore only needs the train state and the
iteration, and a resumed run continues exactly as an uninterrupted one would.

Faults: env episodes cut by worker deaths or hangs are replayed or dropped by the collector and
counted per iteration (``rollout/*`` metrics and a warning line). SIGTERM or SIGINT (to this
process or its whole group; env workers ignore both) abandons a rollout in progress after its
current env step, or lets an update in progress finish, then checkpoints the last complete
iteration and returns with :attr:`Trainer.stop_signal` set (the command line then exits with
:data:`EXIT_INTERRUPTED`); a second signal stops at once. Checkpoints carry a manifest that
restore verifies (:mod:`hiper_jax.train.checkpoints`).

Accounting: every iteration logs the split of its seconds (``time/...``: rollout, log-prob/value
passes, advantages, update; evaluation and checkpoints) and its throughput (``throughput/...``:
generated and update tokens per second, the real-token fraction of the update rows, model FLOPs
and MFU, :mod:`hiper_jax.train.throughput`).
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import math
import os
import shutil
import signal
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from hiper_jax import distributed
from hiper_jax.advantages import TurnBatch, anchor_state_ids, get_estimator
from hiper_jax.agent.grammar import ResponseGrammar, forced_tokens
from hiper_jax.agent.prompts import PromptConfig
from hiper_jax.agent.spans import TokenBytes
from hiper_jax.hae import HAEConfig, assign_token_advantages
from hiper_jax.models import qwen2
from hiper_jax.models.value_heads import CriticConfig, critic_param_shardings, init_critic
from hiper_jax.rollout.collector import Collector, EnvSpec, FaultCounts, RolloutInterrupted
from hiper_jax.rollout.metrics import rollout_metrics
from hiper_jax.rollout.packing import pack_tokens, pack_turns
from hiper_jax.rollout.policies import LLMPolicy
from hiper_jax.rollout.types import Trajectory
from hiper_jax.train import checkpoints as checkpoint_lib
from hiper_jax.train import config as config_lib
from hiper_jax.train import throughput
from hiper_jax.train.packing import packed_pass
from hiper_jax.train.logger import MetricsLogger
from hiper_jax.train.plots import plot_run
from hiper_jax.train.ppo import (
    PPOBatch,
    PPOConfig,
    TrainState,
    init_lora_params,
    init_train_state,
    logprob_pass,
    logprob_value_pass,
    make_optimizer,
    ppo_update,
    row_lengths,
    with_frozen,
)

HEADS = ("low", "high", "term")
# Exit status of a run stopped by SIGTERM/SIGINT after checkpointing (EX_TEMPFAIL: try again,
# i.e. resume with --config.train.resume=True).
EXIT_INTERRUPTED = 75


class TrainingDivergedError(RuntimeError):
    """Too many consecutive updates skipped every step for a non-finite loss or gradient."""


# --- environments and tasks ------------------------------------------------------------------


def prepare_env_data(config: ml_collections.ConfigDict, out_dir: str, progress: bool = True) -> dict:
    """Finds or makes the env data; returns ``{"train": EnvSpec, "eval": EnvSpec,
    "num_train_tasks": int, "num_eval_tasks": int}``.

    ALFWorld: ``env.games_dir`` with ``train/`` and ``eval/`` folders of games (for the official
    data, link ``json_2.1.1/train`` and ``valid_unseen`` there) or, when empty, games generated
    into ``out_dir/games``.
    WebShop: ``env.env_kwargs`` go to the env (``data_dir`` for the official data, else a
    generated catalog); the task count is read from a catalog built here. ChooseWord: the
    sanity-check task (``env_kwargs.num_tasks`` tasks, the same in both splits).
    """
    env = config.env
    common = dict(env.env_kwargs.to_dict() if hasattr(env.env_kwargs, "to_dict") else env.env_kwargs)
    common["success_reward"] = env.success_reward
    if env.name == "alfworld":
        from hiper_envs.alfworld.games import find_games
        from hiper_envs.alfworld.generate import TASK_TYPES, GeneratorConfig, generate_games

        games_dir = env.games_dir or os.path.join(out_dir, "games")
        task_types = tuple(env.task_types) or TASK_TYPES
        for split, count in (("train", env.num_train_games), ("eval", env.num_eval_games)):
            split_dir = os.path.join(games_dir, split)
            if env.games_dir:
                if not os.path.isdir(split_dir):
                    raise FileNotFoundError(f"env.games_dir has no {split}/ folder: {split_dir}")
                continue
            existing = find_games(split_dir) if os.path.isdir(split_dir) else []
            if len(existing) != count and distributed.is_main_process():
                scenes = GeneratorConfig(max_receptacles=env.max_receptacles,
                                         max_distractors=env.max_distractors)
                generate_games(games_dir, count, seed=config.train.seed, task_types=task_types,
                               split=split, config=scenes, workers=2, progress=progress)
        if jax.process_count() > 1:  # the other hosts wait for process 0's games
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("hiper_jax: generated games ready")
        specs = {split: EnvSpec("hiper_envs:hiper/ALFWorld-v0",
                                dict(common, games=os.path.join(games_dir, split)), "game")
                 for split in ("train", "eval")}
        counts = {split: len(find_games(os.path.join(games_dir, split))) for split in ("train", "eval")}
    elif env.name == "choose_word":
        spec = EnvSpec("hiper_envs:hiper/ChooseWord-v0", common, "task")
        specs = {"train": spec, "eval": spec}
        num_tasks = int(common.get("num_tasks", 8))
        counts = {"train": num_tasks, "eval": num_tasks}
    else:
        from hiper_envs.webshop.env import WebShopEnv

        specs, counts = {}, {}
        for split in ("train", "eval"):
            specs[split] = EnvSpec("hiper_envs:hiper/WebShop-v0", dict(common, split=split), "goal_index")
            counts[split] = len(WebShopEnv(**dict(common, split=split)).goals)
    return {"train": specs["train"], "eval": specs["eval"],
            "num_train_tasks": counts["train"], "num_eval_tasks": counts["eval"]}


@dataclasses.dataclass(frozen=True)
class TaskSchedule:
    """Which tasks iteration i trains on: epochs over a seeded permutation of the tasks, each
    task played ``rollouts_per_task`` times (same group id)."""

    num_tasks: int
    num_envs: int
    rollouts_per_task: int
    seed: int

    def tasks(self, iteration: int) -> tuple[list[int], list[int]]:
        per_iteration = self.num_envs // self.rollouts_per_task
        start = iteration * per_iteration
        chosen = []
        while len(chosen) < per_iteration:
            epoch, offset = divmod(start + len(chosen), self.num_tasks)
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_tasks)
            chosen.append(int(order[offset]))
        tasks = [t for t in chosen for _ in range(self.rollouts_per_task)]
        groups = [k for k in range(per_iteration) for _ in range(self.rollouts_per_task)]
        return tasks, groups


# --- batches --------------------------------------------------------------------------------


def _chunked(fn, token_arrays: tuple, row_arrays: tuple, rows: int, mesh=None, length_multiple: int = 0,
             per_token: tuple[bool, ...] = (True,)) -> tuple[np.ndarray, ...]:
    """Applies a jitted row-wise ``fn(*token_arrays, *row_arrays)`` in chunks of ``rows`` rows.

    ``token_arrays`` are ``[N, L, ...]`` (the second is ``valid``), ``row_arrays`` ``[N, ...]``;
    ``fn`` returns a tuple whose outputs are per token (``[rows, L_c, ...]``) or per row where
    ``per_token`` says so. Only rows with real tokens are computed; with ``length_multiple > 0``
    rows of similar length go together, each chunk cut to the bucketed width of its longest row
    (a few compiled shapes, little padding), and per-token outputs are padded back to ``L``
    (zeros elsewhere, as for padding rows).

    With several processes, every process holds the same arrays: each chunk goes in as global
    arrays split over ``mesh``'s batch axes and comes back whole on every process.
    """
    from hiper_jax.train.ppo import length_groups, row_lengths

    num_rows, width = token_arrays[0].shape[:2]
    lengths = row_lengths(token_arrays[1])
    real = np.flatnonzero(lengths > 0)
    if length_multiple > 0:
        groups = [(real[index], cut) for index, cut in length_groups(lengths[real], rows, length_multiple, width)]
    else:
        groups = [(real[i: i + rows], width) for i in range(0, len(real), rows)]
    multihost = mesh is not None and jax.process_count() > 1
    outs = None
    for index, cut in groups:
        full = np.resize(index, rows)  # the last chunk repeats rows to keep the compiled shape
        chunk = tuple(a[full][:, :cut] for a in token_arrays) + tuple(a[full] for a in row_arrays)
        if multihost:
            results = distributed.gather_to_all_hosts(fn(*distributed.global_from_host_copy(chunk, mesh)))
        else:
            results = jax.tree.map(np.asarray, fn(*chunk))
        if outs is None:
            outs = tuple(np.zeros((num_rows, width) + r.shape[2:] if tok else (num_rows,) + r.shape[1:], r.dtype)
                         for r, tok in zip(results, per_token))
        for out, result, tok in zip(outs, results, per_token):
            if tok:
                out[index, :cut] = result[: len(index)]
            else:
                out[index] = result[: len(index)]
    return outs


def _estimate(spec, turn_batch: TurnBatch, hae_cfg: HAEConfig, mesh=None):
    """The estimator's output as NumPy. On a mesh with several batch shards, HAE and turn-GAE
    run under ``shard_map`` with trajectories split over the batch axes (normalisation
    statistics reduced across devices); GRPO/RLOO/GiGPO need whole groups and run unsharded."""
    shards = distributed.num_batch_shards(mesh) if mesh is not None else 1
    rows = np.shape(turn_batch.rewards)[0]
    if shards == 1 or spec.needs_groups or rows % shards:
        return jax.tree.map(np.asarray, spec.fn(turn_batch, hae_cfg))
    placed = distributed.global_from_host_copy(turn_batch, mesh)
    return distributed.gather_to_all_hosts(distributed.sharded_estimator(spec.fn, mesh)(placed, hae_cfg))


def logp_mismatch(sampled: np.ndarray, recomputed: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """|sampler log-prob - learner log-prob| per response token (``[N, L]`` arrays): mean and
    max. Far from 0, the update trains a distribution other than the one that sampled."""
    diff = np.abs(np.asarray(sampled) - np.asarray(recomputed))[mask]
    return {"logp_mismatch_mean": float(diff.mean()) if diff.size else 0.0,
            "logp_mismatch_max": float(diff.max()) if diff.size else 0.0}


def turn_observations(trajectories) -> list[list[str]]:
    """The env observation each turn's prompt showed (its view's), per trajectory."""
    return [[t.view.observation if t.view is not None else "" for t in traj.turns] for traj in trajectories]


def build_ppo_batch(trajectories, state: TrainState, ref_params, model_config: qwen2.Qwen2Config,
                    cfg: ml_collections.ConfigDict, hae_cfg: HAEConfig, pad_id: int, mesh=None,
                    text_mask: Optional[np.ndarray] = None):
    """Packs trajectories, runs the log-prob and value passes, computes advantages; returns
    ``(PPOBatch, turn arrays, estimator output, stats)``; ``stats`` holds the seconds the passes
    (``passes_s``) and the estimator with the token assignment (``advantages_s``) took.
    ``mesh`` is needed only with several processes (each holds all trajectories; the passes run
    on the global mesh). ``text_mask``: the grammar's, when the trajectories were sampled with a
    constraint (log-probs are then those of the constrained distribution)."""
    spec = get_estimator(cfg.advantage.estimator, **config_lib.estimator_options(cfg.advantage))
    rows = cfg.ppo.mini_batch_rows
    turns = pack_turns(trajectories, cfg.env.max_turns)
    tokens = pack_tokens(trajectories, pad_id, row_multiple=rows, length_multiple=cfg.ppo.length_multiple)
    temperature = cfg.sampling.temperature or 1.0
    arrays = (tokens.tokens, tokens.valid)
    if tokens.allowed_mode is not None:
        arrays += (tokens.allowed_mode, tokens.allowed_ids)
    multiple = cfg.ppo.length_multiple if cfg.ppo.group_by_length else 0

    reads = np.stack([tokens.v_low_read, tokens.v_high_read, tokens.v_term_read], axis=1)

    def allowed_of(allowed: tuple):
        return qwen2.AllowedTokens(*allowed, text_mask) if allowed else None

    # The actor's log-probs and the critic's values of the batch, one chunked pass.
    def old_pass(t, v, *rest):
        *allowed, r = rest
        if not spec.value_heads:
            return logprob_pass(state.actor, model_config, t, v, temperature, allowed_of(allowed)), r
        return logprob_value_pass(state.actor, state.critic, model_config, t, v, r, temperature,
                                  allowed_of(allowed))

    def ref_pass(t, v, *allowed):
        return (logprob_pass(ref_params, model_config, t, v, temperature, allowed_of(allowed)),)

    passes_start = time.perf_counter()
    run = functools.partial(_chunked, rows=rows, mesh=mesh, length_multiple=multiple)
    if cfg.ppo.pack_rows:
        run = packed_pass(run, tokens.valid, cfg.ppo.pack_length or None)
    old_logp, values = run(old_pass, arrays, (reads,), per_token=(True, False))
    if not spec.value_heads:
        values = np.zeros(reads.shape, np.float32)
    # Without a KL term the reference policy is never used: skip its pass.
    ref_logp = run(ref_pass, arrays, ())[0] if cfg.ppo.kl_coef else np.zeros_like(old_logp)
    passes_s = time.perf_counter() - passes_start
    valid_rows = tokens.row_valid
    values_bt = np.zeros(turns.mask.shape + (3,), np.float32)
    values_bt[tokens.traj_index[valid_rows], tokens.turn_index[valid_rows]] = values[valid_rows]
    turn_batch = TurnBatch(
        rewards=turns.rewards, values_low=values_bt[..., 0], values_high=values_bt[..., 1],
        switch=turns.switch, dones=turns.dones, mask=turns.mask, values_term=values_bt[..., 2],
        invalid=turns.invalid, keep_changed=turns.keep_changed, group_ids=turns.group_ids,
        state_ids=anchor_state_ids(turn_observations(trajectories), turns.group_ids, cfg.env.max_turns,
                                   cfg.advantage.gigpo_similarity)
        if spec.needs_states else None)
    advantages_start = time.perf_counter()
    out = _estimate(spec, turn_batch, hae_cfg, mesh)
    advantages = np.asarray(assign_token_advantages(out, tokens.traj_index, tokens.turn_index,
                                                    tokens.action_mask, tokens.subgoal_mask,
                                                    tokens.switch_mask))
    advantages_s = time.perf_counter() - advantages_start
    blocks = tokens.action_mask | tokens.subgoal_mask | tokens.switch_mask
    b, t = tokens.traj_index, tokens.turn_index
    targets = np.stack([np.asarray(out.ret_low)[b, t], np.asarray(out.ret_high)[b, t],
                        np.asarray(out.ret_term)[b, t]], axis=1).astype(np.float32)
    boundary = np.asarray(out.boundary)[b, t]
    value_mask = np.stack([valid_rows & ("low" in spec.value_heads),
                           valid_rows & boundary & ("high" in spec.value_heads),
                           valid_rows & ("term" in spec.value_heads)], axis=1)
    loss_mask = blocks & tokens.response_mask
    if tokens.allowed_mode is not None:
        # A token the grammar forced is no decision: its log-prob is 0 under every policy, so
        # it would only dilute the token means of the loss.
        loss_mask &= ~forced_tokens(tokens.allowed_mode, tokens.allowed_ids)
    batch = PPOBatch(tokens=tokens.tokens, valid=tokens.valid, loss_mask=loss_mask,
                     advantages=advantages.astype(np.float32), old_logp=old_logp, ref_logp=ref_logp,
                     value_read=reads.astype(np.int32), value_targets=targets,
                     old_values=values.astype(np.float32), value_mask=value_mask,
                     allowed_mode=tokens.allowed_mode, allowed_ids=tokens.allowed_ids)
    adv_tokens = advantages[batch.loss_mask]
    stats = {"batch_rows": float(valid_rows.sum()), "batch_tokens": float(tokens.valid.sum()),
             "token_length": float(tokens.tokens.shape[1]),
             "advantage_mean": float(adv_tokens.mean()) if adv_tokens.size else 0.0,
             "advantage_std": float(adv_tokens.std()) if adv_tokens.size else 0.0,
             "value_mean": float(values[valid_rows, 0].mean()) if valid_rows.any() else 0.0}
    stats.update(logp_mismatch(tokens.old_logp, old_logp, tokens.response_mask))
    stats.update(passes_s=passes_s, advantages_s=advantages_s)
    return batch, turns, out, stats


# --- the trainer ------------------------------------------------------------------------------


class Trainer:
    """Sets up a run from a validated config and runs it (see the module docstring).

    Args:
      config: the run's ``ml_collections`` config (validated here before anything starts).
      progress: show progress bars.
    """

    def __init__(self, config: ml_collections.ConfigDict, progress: bool = True):
        config_lib.validate(config, num_devices=None)
        self.config = config
        self.progress = progress
        cfg = config
        distributed.initialize(cfg.distributed.coordinator_address or None,
                               cfg.distributed.num_processes or None,
                               cfg.distributed.process_id if cfg.distributed.process_id >= 0 else None)
        config_lib.validate(config, num_devices=jax.device_count())
        self.is_main = distributed.is_main_process()
        self.out_dir = cfg.train.out_dir
        os.makedirs(self.out_dir, exist_ok=True)
        if self.is_main:
            with open(os.path.join(self.out_dir, "config.json"), "w", encoding="utf-8") as handle:
                json.dump(config_lib.to_dict(cfg), handle, indent=2, default=str)
        self.mesh = distributed.make_mesh(**cfg.mesh)
        # With several processes each plays its share of the envs (rows of the batch its devices
        # hold); trajectories are then gathered so every process builds the same global batch.
        self.multihost = jax.process_count() > 1
        self.env_share = distributed.host_share(self.mesh, cfg.env.num_envs) if self.multihost else None
        if self.multihost and cfg.ppo.mini_batch_rows % distributed.num_batch_shards(self.mesh):
            config_lib._fail("ppo.mini_batch_rows", f"must be a multiple of the mesh's "
                             f"{distributed.num_batch_shards(self.mesh)} batch shards with several processes")
        self.estimator = get_estimator(cfg.advantage.estimator)
        self.hae_cfg = HAEConfig(
            gamma=cfg.advantage.gamma, lam_turn=cfg.advantage.lam_turn, lam_seg=cfg.advantage.lam_seg,
            bootstrap_truncated=cfg.advantage.bootstrap_truncated,
            keep_penalty=cfg.advantage.keep_penalty, keep_penalty_mode=cfg.advantage.keep_penalty_mode,
            invalid_action_penalty=cfg.advantage.invalid_action_penalty,
            keep_consistency_penalty=cfg.advantage.keep_consistency_penalty,
            normalize=cfg.advantage.normalize)
        self.ppo = PPOConfig(
            clip_ratio=cfg.ppo.clip_ratio, dual_clip=cfg.ppo.dual_clip, kl_coef=cfg.ppo.kl_coef,
            kl_estimator=cfg.ppo.kl_estimator, entropy_coef=cfg.ppo.entropy_coef,
            value_clip=cfg.ppo.value_clip, epochs=cfg.ppo.epochs, mini_batch_rows=cfg.ppo.mini_batch_rows,
            micro_batch_rows=cfg.ppo.micro_batch_rows, temperature=cfg.sampling.temperature or 1.0,
            value_heads=self.estimator.value_heads,
            length_multiple=cfg.ppo.length_multiple if cfg.ppo.group_by_length else 0,
            value_coef=cfg.ppo.value_coef, pack_rows=cfg.ppo.pack_rows, pack_length=cfg.ppo.pack_length)
        if cfg.ppo.critic_warmup_iterations and not self.estimator.value_heads:
            raise config_lib.ConfigError(
                f"config field ppo.critic_warmup_iterations: the estimator {cfg.advantage.estimator!r} "
                "has no critic to warm up; set it to 0")
        self._load_model()
        self.data = prepare_env_data(cfg, self.out_dir, progress=progress)
        self.schedule = TaskSchedule(self.data["num_train_tasks"], cfg.env.num_envs,
                                     cfg.advantage.rollouts_per_task, cfg.train.seed)
        self.prompt_cfg = PromptConfig(env=cfg.env.name, style=cfg.prompt.style,
                                       history_turns=cfg.prompt.history_turns,
                                       max_prompt_tokens=cfg.prompt.max_prompt_tokens,
                                       max_steps=cfg.env.max_turns)
        self._checkpoints = None
        self.stop_signal: Optional[int] = None  # the SIGTERM/SIGINT that stopped run()
        self._policies: dict[float, LLMPolicy] = {}
        self.restored_env_turns: Optional[float] = None  # set by restore()

    # set-up -----------------------------------------------------------------------------------

    def _load_model(self) -> None:
        from hiper_jax.tokenization import load_tokenizer

        cfg = self.config
        self.tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.checkpoint)
        self.model_config, actor = qwen2.load_hf_checkpoint(
            cfg.model.checkpoint, dtype=jnp.dtype(cfg.model.param_dtype),
            compute_dtype=jnp.dtype(cfg.model.compute_dtype), mesh=self.mesh, progress=False)
        critic_config = CriticConfig(shared_backbone=cfg.model.critic == "shared")
        self.frozen = None  # LoRA: the (actor, critic) weights under the trainable adapters
        if cfg.model.lora_rank:
            # The checkpoint's weights stay frozen and, without adapters, are the reference.
            self.model_config = self.model_config.replace(
                lora_rank=cfg.model.lora_rank, lora_alpha=float(cfg.model.lora_alpha),
                lora_targets=tuple(cfg.model.lora_targets))
            self.ref_params = actor
            actor, critic, self.frozen = init_lora_params(
                jax.random.key(cfg.train.seed), self.model_config, actor, critic_config, self.mesh)
        else:
            self.ref_params = jax.tree.map(jnp.copy, actor)
            critic = init_critic(jax.random.key(cfg.train.seed), self.model_config, actor, critic_config)
            critic = jax.device_put(critic, critic_param_shardings(self.model_config, critic_config, self.mesh))
        self.actor_tx = make_optimizer(cfg.ppo.actor_lr, cfg.ppo.weight_decay, cfg.ppo.max_grad_norm)
        self.critic_tx = make_optimizer(cfg.ppo.critic_lr, cfg.ppo.weight_decay, cfg.ppo.max_grad_norm)
        self.state = init_train_state(actor, critic, self.actor_tx, self.critic_tx)
        self.token_bytes = TokenBytes(self.tokenizer, vocab_size=self.model_config.vocab_size)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        stops = {self.tokenizer.eos_token_id}
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != self.tokenizer.unk_token_id:
            stops.add(im_end)
        self.stop_ids = tuple(sorted(s for s in stops if s is not None))
        self.grammar = None
        if cfg.sampling.constraint == "grammar":
            self.grammar = ResponseGrammar(self.tokenizer, self.token_bytes, cfg.prompt.style,
                                           self.tokenizer.eos_token_id, cfg.sampling.max_text_tokens)

    def _sampling(self, temperature: float):
        from hiper_jax.sampling import SamplingConfig

        cfg = self.config.sampling
        greedy = temperature == 0
        return SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=temperature if not greedy else 1.0,
                              top_k=cfg.top_k, top_p=cfg.top_p, greedy=greedy,
                              stop_token_ids=self.stop_ids, pad_token_id=self.pad_id)

    @property
    def local_envs(self) -> int:
        """Envs this process plays (all of ``env.num_envs`` in a single process)."""
        return self.env_share.rows if self.multihost else self.config.env.num_envs

    def _policy(self, temperature: float) -> LLMPolicy:
        """The sampling policy at ``temperature`` with the current actor. One policy per
        temperature lives as long as the trainer, so its padded shapes (which only grow) and
        compiled sampler carry over from iteration to iteration."""
        dtype = jnp.dtype(self.config.model.compute_dtype)
        # LoRA: the sampler runs the adapters merged into the weights (the compute-dtype copy
        # it makes anyway), at the base model's speed.
        actor = qwen2.lora.merge_lora(self.full_state().actor, self.model_config)
        if self.multihost:
            # Each process samples for its own envs with a compute-dtype copy of the actor on
            # its first device, so env stepping never waits on another host.
            actor = distributed.local_copy(jax.tree.map(lambda x: x.astype(dtype), actor))
        params = qwen2.unstack_layers(actor, dtype)
        policy = self._policies.get(temperature)
        if policy is None:
            policy = self._policies[temperature] = LLMPolicy(
                params, self.model_config, self._sampling(temperature), self.pad_id,
                length_multiple=self.config.sampling.prompt_length_multiple,
                rows=math.ceil(self.local_envs / 2), grammar=self.grammar)
        policy.params = params
        return policy

    def full_state(self) -> TrainState:
        """The train state with whole actor and critic trees (LoRA: the adapters over the frozen
        weights, nothing copied); the state itself when every weight trains."""
        actor, critic = with_frozen((self.state.actor, self.state.critic), self.frozen)
        return self.state._replace(actor=actor, critic=critic)

    def _collector(self, split: str | EnvSpec) -> Collector:
        """A collector for ``"train"``, ``"eval"`` or another :class:`EnvSpec`."""
        cfg = self.config.env
        spec = self.data[split] if isinstance(split, str) else split
        budget = cfg.turn_budget if split == "train" else 0  # evaluation plays each task once
        if budget and self.multihost:
            raise ValueError("env.turn_budget > 0 needs a single process")
        return Collector(spec, self.local_envs, self.prompt_cfg, self.tokenizer, self.token_bytes,
                         cfg.max_turns, groups=2 if self.local_envs >= 2 else 1,
                         envs_per_worker=cfg.envs_per_worker, step_timeout_s=cfg.step_timeout_s,
                         max_replays=cfg.max_replays, max_lost_fraction=cfg.max_lost_fraction,
                         should_stop=lambda: self.stop_signal is not None, turn_budget=budget)

    def _collect(self, collector: Collector, policy: LLMPolicy, tasks: list[int], key: jax.Array,
                 groups: Optional[list[int]] = None):
        """Plays ``tasks`` (one per env of the whole job); returns all trajectories in task order
        and the rollout stats. Each process plays its share with its own sampling key."""
        if not self.multihost:
            return collector.run(policy, tasks, key, groups)
        rows = self.env_share.row_indices
        local, stats = collector.run(policy, [tasks[i] for i in rows],
                                     jax.random.fold_in(key, jax.process_index()),
                                     None if groups is None else [groups[i] for i in rows])
        by_row, turns = {}, {}
        parts = distributed.gather_objects((rows, local, stats))
        for part_rows, part, part_stats in parts:
            by_row.update(zip(part_rows, part))
            turns[part_rows] = part_stats.turns  # hosts sharing rows played the same episodes
        merged = dataclasses.replace(
            stats, wall_s=max(p[2].wall_s for p in parts), turns=sum(turns.values()),
            device_busy_s=float(np.mean([p[2].device_busy_s for p in parts])),
            env_step_s=float(np.mean([p[2].env_step_s for p in parts])))
        return [by_row[i] for i in range(len(tasks))], merged

    # checkpoints --------------------------------------------------------------------------------

    @property
    def checkpoint_dir(self) -> str:
        return os.path.abspath(os.path.join(self.out_dir, "checkpoints"))

    def _checkpoint_manager(self):
        import orbax.checkpoint as ocp

        if self._checkpoints is None:
            if self.is_main:  # folders of saves cut short by a kill or a full disk
                checkpoint_lib.remove_tmp_dirs(self.checkpoint_dir)
            self._checkpoints = ocp.CheckpointManager(
                self.checkpoint_dir,
                options=ocp.CheckpointManagerOptions(max_to_keep=self.config.train.keep_checkpoints,
                                                     create=True, cleanup_tmp_directories=True))
        return self._checkpoints

    def save(self, iteration: int, env_turns_total: float = 0.0) -> None:
        """Checkpoints the train state after ``iteration`` iterations, with a manifest.

        Raises:
          DiskFullError: the disk filled up; the partial checkpoint is removed and the previous
            ones are kept (the message names the newest).
        """
        import orbax.checkpoint as ocp

        manager = self._checkpoint_manager()
        meta = {"iteration": iteration, "seed": self.config.train.seed,
                "task_cursor": iteration * (self.config.env.num_envs // self.config.advantage.rollouts_per_task),
                "env_turns_total": float(env_turns_total)}
        try:
            manager.save(iteration, args=ocp.args.Composite(state=ocp.args.StandardSave(self.state),
                                                            meta=ocp.args.JsonSave(meta)), force=True)
            manager.wait_until_finished()
            if self.is_main:
                checkpoint_lib.write_manifest(os.path.join(self.checkpoint_dir, str(iteration)))
        except Exception as error:
            if not checkpoint_lib.is_disk_full(error):
                raise
            kept = [s for s in manager.all_steps(read=True) if s != iteration] if self.is_main else []
            # Closing the manager joins orbax's writer threads, so none of them writes into the
            # folders removed below after they are gone; the next save opens a new manager.
            self._checkpoints = None
            try:
                manager.close()
            except Exception:  # noqa: BLE001 - the save failed already; its threads repeat the error
                pass
            if self.is_main:
                checkpoint_lib.remove_tmp_dirs(self.checkpoint_dir)
                shutil.rmtree(os.path.join(self.checkpoint_dir, str(iteration)), ignore_errors=True)
            raise checkpoint_lib.DiskFullError(
                errno.ENOSPC, f"no space left on device writing checkpoint {iteration} to "
                f"{self.checkpoint_dir}; the newest complete checkpoint is "
                f"{max(kept) if kept else 'none'}: free space and resume with "
                "--config.train.resume=True") from None

    def restore(self, directory: Optional[str] = None) -> int:
        """Restores the newest intact checkpoint if there is one; returns the iteration to start at.

        Each checkpoint, newest first, is checked against its manifest and then restored; a
        damaged one is reported (naming the bad file) and, on this run's own folder, moved to
        ``checkpoints_damaged/``, and the next older one is tried (with
        ``train.restore_fallback=False`` the first damaged one raises instead).

        Args:
          directory: another run's ``checkpoints/`` folder to restore from (default: this run's).
            The state is restored onto this trainer's mesh, whatever mesh wrote it.

        Raises:
          CheckpointDamagedError: the newest checkpoint is damaged and fallback is off, or none
            is intact.
        """
        import orbax.checkpoint as ocp

        own = directory is None
        if own:
            root, manager = self.checkpoint_dir, self._checkpoint_manager()
        else:
            if not os.path.isdir(directory):
                raise FileNotFoundError(f"no checkpoint folder at {directory}")
            root, manager = os.path.abspath(directory), ocp.CheckpointManager(os.path.abspath(directory))
        steps = sorted(manager.all_steps(read=True), reverse=True)
        if not steps:
            return 0
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, self.state)
        damaged, restored = [], None
        for step in steps:
            problem = checkpoint_lib.verify_step(os.path.join(root, str(step)))
            if problem is None:
                try:
                    restored = manager.restore(step, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
                    int(restored["meta"]["iteration"])
                except Exception as error:  # noqa: BLE001 - any failure to read it is damage
                    restored = None
                    problem = f"{os.path.join(root, str(step))}: cannot be restored ({checkpoint_lib.short_error(error)})"
            if restored is not None:
                break
            damaged.append(step)
            if not self.config.train.restore_fallback:
                raise checkpoint_lib.CheckpointDamagedError(
                    f"checkpoint {step} is damaged: {problem} (train.restore_fallback=False; set it "
                    "to True to restore the newest intact checkpoint instead)")
            if self.is_main:
                tqdm.write(f"checkpoint {step} is damaged: {problem}; trying an older one")
        if restored is None:
            raise checkpoint_lib.CheckpointDamagedError(
                f"no intact checkpoint in {root} (damaged: {', '.join(map(str, damaged))})")
        if damaged and own and self.is_main and jax.process_count() == 1:
            moved = [checkpoint_lib.move_aside(os.path.join(root, str(step))) for step in damaged]
            manager.reload()
            tqdm.write(f"restored checkpoint {step}; moved the damaged one(s) to {', '.join(moved)}")
        self.state = restored["state"]
        self.restored_env_turns = restored["meta"].get("env_turns_total")
        return int(restored["meta"]["iteration"])

    # the loop ----------------------------------------------------------------------------------

    def evaluate(self, iteration: int, collector: Collector) -> dict[str, float]:
        """Plays every eval task once (``train.eval_episodes`` of them when > 0) at the eval
        temperature; returns ``eval/...`` metrics."""
        cfg = self.config
        num_tasks = self.data["num_eval_tasks"]
        if cfg.train.eval_episodes:
            num_tasks = min(num_tasks, cfg.train.eval_episodes)
        key = jax.random.fold_in(jax.random.key(cfg.train.seed + 1), iteration)
        trajectories = self.play_tasks(collector, list(range(num_tasks)), key, cfg.sampling.eval_temperature)
        return {f"eval/{k}": v for k, v in rollout_metrics(trajectories).items()}

    def play_tasks(self, collector: Collector | EnvSpec, tasks: list[int], key: jax.Array,
                   temperature: float, progress: bool = False) -> list[Trajectory]:
        """Plays each of ``tasks`` once with the current actor at ``temperature``, in batches
        of ``env.num_envs`` (the last one filled up with repeats); returns the trajectories in
        task order. ``collector``: an open one (kept open), or the :class:`EnvSpec` of the
        tasks (a collector is opened for the call)."""
        if isinstance(collector, EnvSpec):
            with self._collector(collector) as opened:
                return self.play_tasks(opened, tasks, key, temperature, progress)
        policy = self._policy(temperature)
        num_envs = self.config.env.num_envs
        trajectories = []
        bar = tqdm(total=len(tasks), desc="episodes", disable=not (progress and self.is_main))
        for start in range(0, len(tasks), num_envs):
            chunk = [tasks[(start + k) % len(tasks)] for k in range(num_envs)]
            batch, _ = self._collect(collector, policy, chunk, jax.random.fold_in(key, start))
            trajectories.extend(batch[: len(tasks) - start])
            bar.update(min(num_envs, len(tasks) - start))
        bar.close()
        return trajectories

    @functools.cached_property
    def peak(self) -> throughput.Peak:
        """Peak FLOP/s of the mesh's devices (measured once on CPU), for MFU."""
        return throughput.device_peak(list(self.mesh.devices.flat), self.config.model.compute_dtype)

    def iteration_accounting(self, trajectories: list[Trajectory], batch: PPOBatch, update: dict,
                             times: dict[str, float], peak: throughput.Peak) -> dict[str, float]:
        """The ``throughput/...`` metrics of one iteration: tokens per second, the real-token
        fraction of the update rows, model FLOPs by stage and MFU (see
        :mod:`hiper_jax.train.throughput`). ``times``: seconds of ``rollout``, ``update`` and
        the whole ``iteration``; ``peak``: the devices'."""
        turns = [turn for traj in trajectories for turn in traj.turns]
        prefill, decode = throughput.generation_tokens([len(t.prompt_ids) for t in turns],
                                                       [len(t.response_ids) for t in turns])
        flops = throughput.iteration_flops(
            self.model_config, prefill=prefill, decode=decode,
            passes=throughput.TokenSet.of_rows(row_lengths(batch.valid)),
            update=throughput.TokenSet(update["real_tokens"], update["real_attention_pairs"]),
            separate_critic="backbone" in self.state.critic, uses_critic=bool(self.ppo.value_heads),
            reference_pass=bool(self.config.ppo.kl_coef))
        return throughput.throughput_metrics(flops, times, decode.tokens, update["real_tokens"],
                                             update["computed_tokens"], peak)

    def train_iteration(self, iteration: int, collector: Collector) -> dict[str, Any]:
        """One collect + update iteration; returns its metrics (``time/...`` the split of its
        seconds, ``throughput/...`` its accounting)."""
        cfg = self.config
        peak = self.peak  # measured (once) before the clock starts
        start = time.perf_counter()
        tasks, groups = self.schedule.tasks(iteration)
        key = jax.random.fold_in(jax.random.key(cfg.train.seed), iteration)
        trajectories, rollout = self._collect(collector, self._policy(cfg.sampling.temperature), tasks, key, groups)
        rollout_s = time.perf_counter() - start
        text_mask = self.grammar.text_mask if self.grammar is not None else None
        batch, _, _, batch_stats = build_ppo_batch(trajectories, self.full_state(), self.ref_params,
                                                   self.model_config, cfg, self.hae_cfg, self.pad_id,
                                                   mesh=self.mesh, text_mask=text_mask)
        update_start = time.perf_counter()
        warmup = iteration < cfg.ppo.critic_warmup_iterations
        ppo = dataclasses.replace(self.ppo, train_actor=False) if warmup else self.ppo
        self.state, update = ppo_update(self.state, batch, np.random.default_rng([cfg.train.seed, iteration]),
                                        config=self.model_config, ppo=ppo,
                                        actor_tx=self.actor_tx, critic_tx=self.critic_tx,
                                        place=self._place_batch if self.multihost else None,
                                        frozen=self.frozen,
                                        text_mask=text_mask)
        record = {f"train/{k}": v for k, v in rollout_metrics(trajectories).items()}
        record.update({f"update/{k}": v for k, v in update.items()})
        record["update/critic_only"] = float(warmup)
        end = time.perf_counter()
        times = {"time/passes_s": batch_stats.pop("passes_s"),
                 "time/advantages_s": batch_stats.pop("advantages_s")}
        record.update({f"batch/{k}": v for k, v in batch_stats.items()})
        record.update(times)
        record.update({"time/rollout_s": rollout_s, "time/batch_s": update_start - start - rollout_s,
                       "time/update_s": end - update_start, "time/iteration_s": end - start,
                       "time/device_busy_fraction": rollout.device_busy_fraction,
                       "time/decode_active_fraction": rollout.active_fraction,
                       "env_turns": float(rollout.turns)})
        record.update(self.iteration_accounting(
            trajectories, batch, update,
            {"rollout": rollout_s, "update": end - update_start, "iteration": end - start}, peak))
        if update["skipped"] > 0:
            tqdm.write(f"iteration {iteration}: {update['skipped']:.0%} of the update steps had a "
                       "non-finite loss or gradient and were skipped")
        return record

    def _place_batch(self, mini: PPOBatch) -> PPOBatch:
        return distributed.global_from_host_copy(mini, self.mesh)

    def _on_signal(self, signum, frame) -> None:
        """SIGTERM/SIGINT: stop after the current env step (see the module docstring); a second
        one stops at once. Prints nothing: the handler may interrupt a print."""
        del frame
        if self.stop_signal is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping at once")
        self.stop_signal = signum

    def _iteration_faults(self, collectors: list[Collector]) -> FaultCounts:
        """The env faults every collector (of every process) saw since the last call."""
        faults = FaultCounts()
        for collector in collectors:
            faults.add(collector.faults)
            collector.faults = FaultCounts()
        if self.multihost:
            total = FaultCounts()
            for part in distributed.gather_objects(faults):
                total.add(part)
            faults = total
        return faults

    def run(self) -> list[dict]:
        """Trains for ``train.iterations`` iterations (resuming if asked); returns the metrics.

        Returns early, with :attr:`stop_signal` set, after SIGTERM or SIGINT (the last complete
        iteration is checkpointed).

        A record holds the seconds of its evaluation (``time/eval_s``) and of the checkpoint
        written after the previous iteration (``time/checkpoint_s``): a record is logged before
        its own checkpoint, so a checkpoint never exists without its iteration's record.

        Raises:
          RolloutFaultError: a rollout lost more than ``env.max_lost_fraction`` of its episodes.
          TrainingDivergedError: ``train.max_skipped_updates`` consecutive updates were skipped.
          DiskFullError: a checkpoint did not fit on the disk.
        """
        cfg = self.config
        self.stop_signal = None
        start_iteration = self.restore() if cfg.train.resume else 0
        logger = MetricsLogger(self.out_dir, enabled=self.is_main, tensorboard=cfg.train.tensorboard,
                               wandb_project=cfg.train.wandb_project,
                               resume_from=start_iteration if cfg.train.resume else None,
                               config=config_lib.to_dict(cfg))
        previous = {signum: signal.signal(signum, self._on_signal) for signum in (signal.SIGTERM, signal.SIGINT)}
        collectors: list[Collector] = []
        try:
            train_collector = self._collector("train")
            collectors.append(train_collector)
            eval_collector = self._collector("eval")
            collectors.append(eval_collector)
            env_turns = 0.0
            if start_iteration:  # from the checkpoint (every process has it), else from the log
                env_turns = self.restored_env_turns
                if env_turns is None:
                    env_turns = sum(r.get("env_turns", 0.0) for r in logger.history())
            budget = cfg.train.max_env_turns  # 0: none

            def budget_spent(turns: float) -> bool:
                return 0 < budget <= turns

            bar = tqdm(range(start_iteration, cfg.train.iterations), desc="HiPER training",
                       initial=start_iteration, total=cfg.train.iterations,
                       disable=not (self.progress and self.is_main))
            done = saved = start_iteration
            checkpoint_s = None  # the last save's seconds, logged with the next record
            skipped_in_a_row = 0
            for iteration in bar:
                if budget_spent(env_turns) or self.stop_signal is not None:  # budget: by the last
                    break                                                    # iteration or a resume
                record = {"iteration": iteration}
                if checkpoint_s is not None:
                    record["time/checkpoint_s"], checkpoint_s = checkpoint_s, None
                try:
                    if iteration % cfg.train.eval_every == 0:
                        eval_start = time.perf_counter()
                        record.update(self.evaluate(iteration, eval_collector))
                        record["time/eval_s"] = time.perf_counter() - eval_start
                    record.update(self.train_iteration(iteration, train_collector))
                except RolloutInterrupted:  # a signal mid-rollout: this iteration is discarded
                    break
                faults = self._iteration_faults(collectors)
                record.update(faults.metrics())
                if faults.worker_restarts or faults.lost_episodes:
                    tqdm.write(f"iteration {iteration}: {faults.worker_restarts} env worker restart(s); "
                               f"{faults.lost_episodes} episode(s) cut by env faults, "
                               f"{faults.replayed_episodes} replayed, {faults.dropped_episodes} dropped "
                               f"from the update (last error: {faults.last_error})")
                env_turns += record["env_turns"]
                record["env_turns_total"] = env_turns
                logger.log(record)
                bar.set_postfix(success=f"{record['train/success']:.2f}",
                                eval=f"{record.get('eval/success', float('nan')):.2f}")
                done = iteration + 1
                if (done % cfg.train.checkpoint_every == 0 or done == cfg.train.iterations
                        or self.stop_signal is not None or budget_spent(env_turns)):
                    save_start = time.perf_counter()
                    self.save(done, env_turns)
                    checkpoint_s = time.perf_counter() - save_start
                    saved = done
                skipped_in_a_row = skipped_in_a_row + 1 if record.get("update/skipped", 0.0) >= 1.0 else 0
                if skipped_in_a_row >= cfg.train.max_skipped_updates:
                    raise TrainingDivergedError(
                        f"the updates of the last {skipped_in_a_row} iterations ({done - skipped_in_a_row}"
                        f"..{done - 1}) skipped every step for a non-finite loss or gradient "
                        f"(train.max_skipped_updates={cfg.train.max_skipped_updates}); the parameters "
                        f"are those after iteration {done - skipped_in_a_row}")
            bar.close()
            if self.stop_signal is None:
                final = {"iteration": done, "final": 1.0, "env_turns_total": env_turns}
                if checkpoint_s is not None:
                    final["time/checkpoint_s"] = checkpoint_s
                try:
                    eval_start = time.perf_counter()
                    final.update(self.evaluate(done, eval_collector))
                    final["time/eval_s"] = time.perf_counter() - eval_start
                    final.update(self._iteration_faults(collectors).metrics())
                except RolloutInterrupted:
                    final = None
            if self.stop_signal is not None:
                if saved != done:
                    self.save(done, env_turns)
                name = signal.Signals(self.stop_signal).name
                where = (f"checkpoint {done} holds the last complete iteration" if done
                         else "no iteration completed, nothing to checkpoint")
                tqdm.write(f"{name}: stopped; {where}; resume with --config.train.resume=True")
                return logger.history()
            logger.log(final)
            history = logger.history()
            if self.is_main:
                plot_run(history, os.path.join(self.out_dir, "plots"),
                         title=f"{cfg.env.name} / {cfg.advantage.estimator}")
            return history
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            for collector in collectors:
                collector.close()
            logger.close()
