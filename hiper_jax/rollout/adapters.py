"""Env adapters: everything the trainer needs to know about one environment, by name.

An adapter sits beside its gymnasium id and says how to prepare the env's data (generate or
locate games, build a catalog), how many train and eval tasks there are, which reset option
picks a task, the prompt's introduction, and which ``info`` keys carry the admissible actions
and the task type. The trainer and the collector only ever see an :class:`EnvSpec` and the
counts that :meth:`EnvAdapter.prepare` returns, so adding an environment means writing its
gymnasium env, registering its id, and registering one adapter here (or from the outside with
:func:`register_adapter`, as the tests do with a toy env).

This module imports no JAX and no concrete env (their modules load inside ``prepare``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping

from hiper_jax.agent.prompts import ENV_INTROS

SPLITS = ("train", "eval")


@dataclasses.dataclass(frozen=True)
class EnvSpec:
    """How to build an env in a worker and how to pick a task at reset.

    Attributes:
      env_id: gymnasium id with its module, e.g. ``"hiper_envs:hiper/WebShop-v0"``.
      kwargs: constructor keyword arguments (picklable; read data inside the worker).
      task_option: the reset option that selects a task by index (``"game"`` for ALFWorld,
        ``"goal_index"`` for WebShop).
      admissible_key: the ``info`` key of the admissible actions.
      task_type_key: the ``info`` key of the task type.
      max_steps_key: the constructor keyword of the episode's step limit.
    """

    env_id: str
    kwargs: dict
    task_option: str
    admissible_key: str = "admissible_actions"
    task_type_key: str = "task_type"
    max_steps_key: str = "max_steps"


@dataclasses.dataclass(frozen=True)
class EnvData:
    """A prepared environment: the spec of each split and its number of tasks."""

    train: EnvSpec
    eval: EnvSpec
    num_train_tasks: int
    num_eval_tasks: int

    def as_dict(self) -> dict[str, Any]:
        """``{"train", "eval", "num_train_tasks", "num_eval_tasks"}`` (the trainer's ``data``)."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True)
class EnvSettings:
    """The ``env`` section's entries an adapter reads (plain values, no config object).

    Attributes:
      kwargs: constructor keyword arguments common to both splits (``env.env_kwargs``).
      success_reward: the reward of a won episode (passed as the adapter's ``reward_key``).
      games_dir: existing data to use ("" = generate into ``out_dir``).
      num_train_games, num_eval_games: games to generate when ``games_dir`` is "".
      task_types: task types to generate (() = all).
      max_receptacles, max_distractors: generated ALFWorld scenes.
      seed: the generator's seed.
    """

    kwargs: Mapping[str, Any]
    success_reward: float = 10.0
    games_dir: str = ""
    num_train_games: int = 64
    num_eval_games: int = 24
    task_types: tuple[str, ...] = ()
    max_receptacles: int = 8
    max_distractors: int = 4
    seed: int = 0


# prepare(adapter, settings, out_dir, progress) -> EnvData
Prepare = Callable[["EnvAdapter", EnvSettings, str, bool], EnvData]


@dataclasses.dataclass(frozen=True)
class EnvAdapter:
    """One environment, as the trainer sees it.

    Attributes:
      name: the ``env.name`` that selects it.
      env_id: gymnasium id with its module.
      task_option: the reset option that selects a task by index.
      intro: the prompt's system introduction.
      prepare: ``(adapter, settings, out_dir, progress) -> EnvData``: finds or makes the
        data and counts the tasks of each split (build specs with :meth:`spec`).
      admissible_key, task_type_key: the ``info`` keys of the admissible actions and task type.
      reward_key, max_steps_key: the constructor keywords of the success reward and the step
        limit.
    """

    name: str
    env_id: str
    task_option: str
    intro: str
    prepare: Prepare
    admissible_key: str = "admissible_actions"
    task_type_key: str = "task_type"
    reward_key: str = "success_reward"
    max_steps_key: str = "max_steps"

    def spec(self, kwargs: Mapping[str, Any]) -> EnvSpec:
        """The :class:`EnvSpec` of this env built with ``kwargs``."""
        return EnvSpec(self.env_id, dict(kwargs), self.task_option, self.admissible_key,
                       self.task_type_key, self.max_steps_key)

    def common_kwargs(self, settings: EnvSettings) -> dict[str, Any]:
        """Constructor keywords of both splits: ``settings.kwargs`` and the success reward."""
        return dict(settings.kwargs, **{self.reward_key: settings.success_reward})

    def prepare_data(self, settings: EnvSettings, out_dir: str, progress: bool = True) -> EnvData:
        """Finds or makes the env's data (see :attr:`prepare`)."""
        return self.prepare(self, settings, out_dir, progress)


_ADAPTERS: dict[str, EnvAdapter] = {}


def register_adapter(adapter: EnvAdapter, replace: bool = False) -> EnvAdapter:
    """Makes ``adapter`` selectable as ``env.name``; returns it. Raises ValueError when the name
    is taken (unless ``replace``)."""
    if adapter.name in _ADAPTERS and not replace and _ADAPTERS[adapter.name] != adapter:
        raise ValueError(f"an env adapter named {adapter.name!r} is registered already")
    _ADAPTERS[adapter.name] = adapter
    return adapter


def get_adapter(name: str) -> EnvAdapter:
    """The adapter registered as ``name``; ValueError naming the known ones otherwise."""
    if name not in _ADAPTERS:
        raise ValueError(f"unknown env {name!r}; registered: {adapter_names()}")
    return _ADAPTERS[name]


def adapter_names() -> tuple[str, ...]:
    """The registered env names, in registration order."""
    return tuple(_ADAPTERS)


def same_for_both_splits(count: Callable[[Mapping[str, Any]], int]) -> Prepare:
    """A ``prepare`` for envs with no data to make whose splits are the same task set;
    ``count(kwargs)`` is its number of tasks."""

    def prepare(adapter: EnvAdapter, settings: EnvSettings, out_dir: str, progress: bool = True) -> EnvData:
        del out_dir, progress
        kwargs = adapter.common_kwargs(settings)
        num_tasks = int(count(kwargs))
        return EnvData(adapter.spec(kwargs), adapter.spec(kwargs), num_tasks, num_tasks)

    return prepare


def per_split(count: Callable[[Mapping[str, Any]], int]) -> Prepare:
    """A ``prepare`` for envs that take a ``split`` keyword (``"train"`` or ``"eval"``);
    ``count(kwargs)`` counts the tasks of the split the kwargs name."""

    def prepare(adapter: EnvAdapter, settings: EnvSettings, out_dir: str, progress: bool = True) -> EnvData:
        del out_dir, progress
        kwargs = {split: dict(adapter.common_kwargs(settings), split=split) for split in SPLITS}
        return EnvData(adapter.spec(kwargs["train"]), adapter.spec(kwargs["eval"]),
                       int(count(kwargs["train"])), int(count(kwargs["eval"])))

    return prepare


# --- the environments of hiper_envs ------------------------------------------------------------


def _prepare_alfworld(adapter: EnvAdapter, settings: EnvSettings, out_dir: str,
                      progress: bool = True) -> EnvData:
    """``games_dir`` with ``train/`` and ``eval/`` folders of games (for the official data, link
    ``json_2.1.1/train`` and ``valid_unseen`` there) or, when empty, games generated into
    ``out_dir/games`` (by process 0; the other processes wait for them)."""
    import jax

    from hiper_envs.alfworld.games import find_games
    from hiper_envs.alfworld.generate import TASK_TYPES, GeneratorConfig, generate_games
    from hiper_jax import distributed

    games_dir = settings.games_dir or os.path.join(out_dir, "games")
    task_types = tuple(settings.task_types) or TASK_TYPES
    for split, count in (("train", settings.num_train_games), ("eval", settings.num_eval_games)):
        split_dir = os.path.join(games_dir, split)
        if settings.games_dir:
            if not os.path.isdir(split_dir):
                raise FileNotFoundError(f"env.games_dir has no {split}/ folder: {split_dir}")
            continue
        existing = find_games(split_dir) if os.path.isdir(split_dir) else []
        if len(existing) != count and distributed.is_main_process():
            scenes = GeneratorConfig(max_receptacles=settings.max_receptacles,
                                     max_distractors=settings.max_distractors)
            generate_games(games_dir, count, seed=settings.seed, task_types=task_types,
                           split=split, config=scenes, workers=2, progress=progress)
    if jax.process_count() > 1:  # the other hosts wait for process 0's games
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("hiper_jax: generated games ready")
    common = adapter.common_kwargs(settings)
    specs = {split: adapter.spec(dict(common, games=os.path.join(games_dir, split)))
             for split in SPLITS}
    counts = {split: len(find_games(os.path.join(games_dir, split))) for split in SPLITS}
    return EnvData(specs["train"], specs["eval"], counts["train"], counts["eval"])


def _webshop_goals(kwargs: Mapping[str, Any]) -> int:
    """Goals of the split (``data_dir`` for the official data, else a generated catalog)."""
    from hiper_envs.webshop.env import WebShopEnv

    return len(WebShopEnv(**kwargs).goals)


def _medvista_questions(kwargs: Mapping[str, Any]) -> int:
    from hiper_envs.medvista.env import MedVistaEnv

    return len(MedVistaEnv(**kwargs).items)


register_adapter(EnvAdapter("alfworld", "hiper_envs:hiper/ALFWorld-v0", "game", ENV_INTROS["alfworld"],
                            _prepare_alfworld))
register_adapter(EnvAdapter("webshop", "hiper_envs:hiper/WebShop-v0", "goal_index", ENV_INTROS["webshop"],
                            per_split(_webshop_goals)))
register_adapter(EnvAdapter("choose_word", "hiper_envs:hiper/ChooseWord-v0", "task",
                            ENV_INTROS["choose_word"],
                            same_for_both_splits(lambda kwargs: kwargs.get("num_tasks", 8))))
register_adapter(EnvAdapter(
    "medvista", "hiper_envs:hiper/MedVista-v0", "index",
    "You are an agent reading a medical image with tools. Answer the question about the image.",
    per_split(_medvista_questions), reward_key="correct_reward", max_steps_key="max_turns"))
