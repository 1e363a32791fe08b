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
from hiper_jax.advantages import get_estimator
from hiper_jax.agent.grammar import ResponseGrammar
from hiper_jax.agent.prompts import PromptConfig
from hiper_jax.agent.spans import TokenBytes
from hiper_jax.hae import HAEConfig
from hiper_jax.models import qwen2, qwen2_5_vl
from hiper_jax.models.value_heads import CriticConfig, critic_param_shardings, init_critic
from hiper_jax.rollout.adapters import EnvSpec, get_adapter
from hiper_jax.rollout.collector import Collector, FaultCounts, RolloutInterrupted
from hiper_jax.rollout.images import ImagePrompter
from hiper_jax.rollout.metrics import rollout_metrics
from hiper_jax.rollout.policies import LLMPolicy
from hiper_jax.rollout.types import Trajectory
from hiper_jax.rollout.vlm_policy import VLMPolicy
from hiper_jax.train import checkpoints as checkpoint_lib
from hiper_jax.train import config as config_lib
from hiper_jax.train import throughput
from hiper_jax.train.batch import BuiltBatch, build_ppo_batch
from hiper_jax.train.logger import MetricsLogger
from hiper_jax.train.plots import plot_run
from hiper_jax.train.ppo import (
    PPOBatch,
    PPOConfig,
    TrainState,
    init_lora_params,
    init_train_state,
    make_optimizer,
    ppo_update,
    reference_params,
    row_lengths,
    freeze_vision,
    with_frozen,
)
from hiper_jax.train.vision_batch import build_vision_ppo_batch

# Exit status of a run stopped by SIGTERM/SIGINT after checkpointing (EX_TEMPFAIL: try again,
# i.e. resume with --config.train.resume=True).
EXIT_INTERRUPTED = 75


class TrainingDivergedError(RuntimeError):
    """Too many consecutive updates skipped every step for a non-finite loss or gradient."""


# --- the policy model --------------------------------------------------------------------------


def is_vision_checkpoint(path: str) -> bool:
    """Whether the HF checkpoint directory holds a Qwen2.5-VL model (``model_type`` in its
    ``config.json``); anything else is loaded as a Qwen2 language model."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as handle:
            return json.load(handle).get("model_type") == "qwen2_5_vl"
    except (OSError, ValueError):
        return False  # the Qwen2 loader reports a missing or unreadable config.json


def check_vision_run(config: ml_collections.ConfigDict, num_processes: int) -> None:
    """What a Qwen2.5-VL policy does not support yet, refused before anything loads.

    Raises:
      ValueError: naming the config field.
    """
    refusals = {
        "model.lora_rank": (config.model.lora_rank > 0, "LoRA on Qwen2.5-VL is not supported yet; set 0"),
        "model.critic": (config.model.critic != "shared", "a Qwen2.5-VL policy's critic is value heads "
                         "on its hidden states; set 'shared'"),
        "model.train_vision": (bool(config.model.train_vision), "training the vision tower is not "
                               "supported yet (its features are computed once per batch); set False"),
        "ppo.pack_rows": (bool(config.ppo.pack_rows), "packed rows are not supported for a Qwen2.5-VL policy"),
        "sampling.host_mesh": (bool(config.sampling.host_mesh), "not supported for a Qwen2.5-VL policy"),
        "distributed": (num_processes > 1, "a Qwen2.5-VL policy trains in one process, on one device"),
    }
    for field, (refused, why) in refusals.items():
        if refused:
            raise ValueError(f"config field {field}: {why} (model.checkpoint "
                             f"{config.model.checkpoint} is a Qwen2.5-VL model)")


# --- environments and tasks ------------------------------------------------------------------


def prepare_env_data(config: ml_collections.ConfigDict, out_dir: str, progress: bool = True) -> dict:
    """Finds or makes the data of ``env.name``'s adapter (:mod:`hiper_jax.rollout.adapters`);
    returns ``{"train": EnvSpec, "eval": EnvSpec, "num_train_tasks": int, "num_eval_tasks": int}``."""
    adapter = get_adapter(config.env.name)
    return adapter.prepare_data(config_lib.env_settings(config), out_dir, progress).as_dict()


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
        config_lib.validate(config, num_devices=jax.device_count(), num_processes=jax.process_count())
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
            value_coef=cfg.ppo.value_coef, pack_rows=cfg.ppo.pack_rows, pack_length=cfg.ppo.pack_length,
            remat=cfg.ppo.remat == "layer", logits_chunk=cfg.ppo.logits_chunk_tokens)
        self.batch_settings = config_lib.batch_settings(cfg)
        self._load_model()
        # sampling.host_mesh: every host samples on a mesh over its own chips only.
        self.sampling_mesh = (distributed.host_sampling_mesh(
            **cfg.sampling.mesh.to_dict(), kv_heads=self.text_config.num_key_value_heads)
            if cfg.sampling.host_mesh else None)
        self.data = prepare_env_data(cfg, self.out_dir, progress=progress)
        self.schedule = TaskSchedule(self.data["num_train_tasks"], cfg.env.num_envs,
                                     cfg.advantage.rollouts_per_task, cfg.train.seed)
        self.prompt_cfg = PromptConfig(env=cfg.env.name, style=cfg.prompt.style,
                                       history_turns=cfg.prompt.history_turns,
                                       max_prompt_tokens=cfg.prompt.max_prompt_tokens,
                                       max_steps=cfg.env.max_turns,
                                       intro=get_adapter(cfg.env.name).intro)
        self._checkpoints = None
        self.stop_signal: Optional[int] = None  # the SIGTERM/SIGINT that stopped run()
        self._policies: dict[float, LLMPolicy] = {}
        self.restored_env_turns: Optional[float] = None  # set by restore()

    # set-up -----------------------------------------------------------------------------------

    def _load_model(self) -> None:
        from hiper_jax.tokenization import load_tokenizer

        cfg = self.config
        self.tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.checkpoint)
        self.is_vision = is_vision_checkpoint(cfg.model.checkpoint)
        if self.is_vision:
            check_vision_run(cfg, jax.process_count())
        # A Qwen2.5-VL policy trains on one device (its batch and step do not shard yet; params
        # spread over a mesh would make every device repeat the whole computation).
        family = qwen2_5_vl if self.is_vision else qwen2
        self.model_config, actor = family.load_hf_checkpoint(
            cfg.model.checkpoint, dtype=jnp.dtype(cfg.model.param_dtype),
            compute_dtype=jnp.dtype(cfg.model.compute_dtype), mesh=None if self.is_vision else self.mesh,
            progress=False)
        if self.is_vision:
            text = self.model_config.text.replace(scan_unroll=int(cfg.model.scan_unroll))
            self.model_config = dataclasses.replace(self.model_config, text=text)
        else:
            self.model_config = self.model_config.replace(scan_unroll=int(cfg.model.scan_unroll))
        # The language model's architecture (the whole model for a text policy).
        self.text_config = self.model_config.text if self.is_vision else self.model_config
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
            self.ref_params = reference_params(actor, cfg.ppo.ref_dtype)
            critic = init_critic(jax.random.key(cfg.train.seed), self.text_config, actor, critic_config)
            if not self.is_vision:
                critic = jax.device_put(critic, critic_param_shardings(self.text_config, critic_config, self.mesh))
        self.actor_tx = make_optimizer(cfg.ppo.actor_lr, cfg.ppo.weight_decay, cfg.ppo.max_grad_norm)
        if self.is_vision:  # the tower keeps the checkpoint's weights (model.train_vision=False)
            self.actor_tx = freeze_vision(self.actor_tx)
        self.critic_tx = make_optimizer(cfg.ppo.critic_lr, cfg.ppo.weight_decay, cfg.ppo.max_grad_norm)
        self.state = init_train_state(actor, critic, self.actor_tx, self.critic_tx)
        self.token_bytes = TokenBytes(self.tokenizer, vocab_size=self.text_config.vocab_size)
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
        compiled sampler carry over from iteration to iteration. Its weights are a fresh
        compute-dtype copy (the only one: the other policies' copies are dropped first)."""
        self.release_sampling_copies()
        params = self.sampling_copy()
        policy = self._policies.get(temperature)
        if policy is None and self.is_vision:
            policy = self._policies[temperature] = VLMPolicy(
                params, self.model_config, self._sampling(temperature), self.pad_id,
                length_multiple=self.config.sampling.prompt_length_multiple,
                rows=math.ceil(self.local_envs / 2), grammar=self.grammar,
                patch_multiple=self.config.model.patch_multiple)
        elif policy is None:
            policy = self._policies[temperature] = LLMPolicy(
                params, self.model_config, self._sampling(temperature), self.pad_id,
                length_multiple=self.config.sampling.prompt_length_multiple,
                rows=math.ceil(self.local_envs / 2), grammar=self.grammar, mesh=self.sampling_mesh)
        policy.params = params
        return policy

    def sampling_copy(self) -> qwen2.Params:
        """The sampler's weights made from the current actor: unstacked, in the compute dtype
        (LoRA: the adapters merged in, so sampling runs at the base model's speed).

        ``sampling.host_mesh``: on :attr:`sampling_mesh`, this host's chips, each parameter
        split by the model's sharding rules (:func:`hiper_jax.sampling.sampling_copy`; with
        several processes a collective reshard, never whole on one chip). Otherwise: one
        process keeps the training mesh's layout; several processes put a whole copy on each
        host's first chip. Either way env stepping never waits on another host."""
        from hiper_jax.sampling import sampling_copy

        dtype = jnp.dtype(self.config.model.compute_dtype)
        if self.is_vision:  # one process (check_vision_run): the actor as it is, in the compute dtype
            return jax.tree.map(lambda x: x.astype(dtype), self.state.actor)
        actor = qwen2.lora.merge_lora(self.full_state().actor, self.model_config)
        if self.sampling_mesh is not None:
            return sampling_copy(actor, self.model_config, self.sampling_mesh, dtype)
        if self.multihost:
            actor = distributed.local_copy(jax.tree.map(lambda x: x.astype(dtype), actor))
        return qwen2.unstack_layers(actor, dtype)

    def release_sampling_copies(self) -> None:
        """Drops the policies' weight copies (the next :meth:`_policy` call makes a new one), so
        the update's memory holds no sampling copy."""
        for policy in self._policies.values():
            policy.params = None

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
                         should_stop=lambda: self.stop_signal is not None, turn_budget=budget,
                         prompter=ImagePrompter(self.model_config, self.tokenizer) if self.is_vision else None)

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
        with tqdm(total=len(tasks), desc="episodes", disable=not (progress and self.is_main)) as bar:
            for start in range(0, len(tasks), num_envs):
                chunk = [tasks[(start + k) % len(tasks)] for k in range(num_envs)]
                batch, _ = self._collect(collector, policy, chunk, jax.random.fold_in(key, start))
                trajectories.extend(batch[: len(tasks) - start])
                bar.update(min(num_envs, len(tasks) - start))
        return trajectories

    def collect(self, num_episodes: int, key: jax.Array, *, split: str = "train",
                temperature: Optional[float] = None) -> list[Trajectory]:
        """Plays episodes with the current actor, in whole batches of ``env.num_envs``
        (``ceil(num_episodes / env.num_envs)`` batches, batch ``k`` sampled with
        ``fold_in(key, k)``); returns their trajectories in batch order.

        ``split="train"``: batch ``k`` plays the tasks the training schedule gives iteration
        ``k`` (rollouts of a task share a group id, numbered on across batches).
        ``split="eval"``: the eval tasks in order, wrapping around, each episode its own group.
        ``temperature``: default the training one (``"train"``) or the eval one (``"eval"``).
        """
        cfg = self.config
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        if temperature is None:
            temperature = cfg.sampling.temperature if split == "train" else cfg.sampling.eval_temperature
        num_envs = cfg.env.num_envs
        per_batch = num_envs // cfg.advantage.rollouts_per_task
        trajectories: list[Trajectory] = []
        with self._collector(split) as collector:
            policy = self._policy(temperature)
            for k in range(math.ceil(num_episodes / num_envs)):
                if split == "train":
                    tasks, groups = self.schedule.tasks(k)
                    groups = [g + k * per_batch for g in groups]
                else:
                    tasks = [(k * num_envs + i) % self.data["num_eval_tasks"] for i in range(num_envs)]
                    groups = list(range(k * num_envs, (k + 1) * num_envs))
                batch, _ = self._collect(collector, policy, tasks, jax.random.fold_in(key, k), groups)
                trajectories.extend(batch)
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
            self.text_config, prefill=prefill, decode=decode,
            passes=throughput.TokenSet.of_rows(row_lengths(batch.valid)),
            update=throughput.TokenSet(update["real_tokens"], update["real_attention_pairs"]),
            separate_critic="backbone" in self.state.critic, uses_critic=bool(self.ppo.value_heads),
            reference_pass=bool(self.config.ppo.kl_coef),
            actor_pass=self.batch_settings.old_logp == "recompute" or bool(self.ppo.value_heads))
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
        self.release_sampling_copies()
        text_mask = self.grammar.text_mask if self.grammar is not None else None
        batch, _, _, batch_stats = self.build_batch(trajectories)
        update_start = time.perf_counter()
        warmup = iteration < cfg.ppo.critic_warmup_iterations
        ppo = dataclasses.replace(self.ppo, train_actor=False) if warmup else self.ppo
        self.state, update = ppo_update(self.state, batch, np.random.default_rng([cfg.train.seed, iteration]),
                                        config=self.model_config, ppo=ppo,
                                        actor_tx=self.actor_tx, critic_tx=self.critic_tx,
                                        mesh=None if self.is_vision else self.mesh,
                                        frozen=self.frozen,
                                        text_mask=text_mask)
        if self.batch_settings.old_logp == "sampler":
            # No pass recomputed the log-probs: the update's first step, at the parameters that
            # sampled, measures the mismatch (over its mini-batch's loss tokens).
            batch_stats["logp_mismatch_mean"] = update["first_step_abs_log_ratio"]
            batch_stats["logp_mismatch_max"] = update["first_step_max_abs_log_ratio"]
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

    def build_batch(self, trajectories: list[Trajectory], settings=None) -> BuiltBatch:
        """The PPO batch of ``trajectories`` under the current actor and critic
        (:func:`hiper_jax.train.batch.build_ppo_batch`, or for a Qwen2.5-VL policy
        :func:`hiper_jax.train.vision_batch.build_vision_ppo_batch`); ``settings`` default to
        the config's."""
        text_mask = self.grammar.text_mask if self.grammar is not None else None
        if self.is_vision:
            return build_vision_ppo_batch(trajectories, self.full_state(), self.ref_params, self.model_config,
                                          settings or self.batch_settings, self.hae_cfg, self.pad_id,
                                          text_mask=text_mask, patch_multiple=self.config.model.patch_multiple)
        return build_ppo_batch(trajectories, self.full_state(), self.ref_params, self.model_config,
                               settings or self.batch_settings, self.hae_cfg, self.pad_id, mesh=self.mesh,
                               text_mask=self.grammar.text_mask if self.grammar is not None else None)

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
        bar = None
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
            if bar is not None:  # also when an error ends the loop (tqdm's close is idempotent)
                bar.close()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            for collector in collectors:
                collector.close()
            logger.close()
