"""The multi-turn collector: prompts -> one batched policy call -> parse -> step envs, per turn.

Envs live in host worker processes (:class:`~hiper_jax.rollout.env_pool.EnvPool`). With
``groups=2`` the envs are split into two halves, each with its own pool, and the halves are
pipelined: while the device generates for one half, the host steps the other half's envs and
builds its prompts. Every call of :meth:`Collector.run` plays one episode per env.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np

from hiper_jax.agent.parsing import decide_turn, parse_response
from hiper_jax.agent.prompts import AgentView, PromptConfig, render_prompt
from hiper_jax.agent.spans import TokenBytes, response_spans
from hiper_jax.rollout.env_pool import EnvPool, GymFactory
from hiper_jax.rollout.types import TurnRecord, Trajectory


@dataclasses.dataclass(frozen=True)
class EnvSpec:
    """How to build an env in a worker and how to pick a task at reset.

    Attributes:
      env_id: gymnasium id with its module, e.g. ``"hiper_envs:hiper/WebShop-v0"``.
      kwargs: constructor keyword arguments (picklable; read data inside the worker).
      task_option: the reset option that selects a task by index (``"game"`` for ALFWorld,
        ``"goal_index"`` for WebShop).
    """

    env_id: str
    kwargs: dict
    task_option: str


@dataclasses.dataclass
class _Episode:
    task: str = ""
    task_type: str = ""
    game: Optional[str] = None
    observation: str = ""
    admissible: Sequence[str] = ()
    subgoals: Sequence[str] = ()
    subgoal: Optional[str] = None
    history: list = dataclasses.field(default_factory=list)
    turns: list = dataclasses.field(default_factory=list)
    won: bool = False
    done: bool = False
    info: dict = dataclasses.field(default_factory=dict)  # the kept info keys of the last step

    def view(self) -> AgentView:
        return AgentView(task=self.task, step=len(self.turns), observation=self.observation,
                         admissible_actions=list(self.admissible), subgoal=self.subgoal,
                         history=list(self.history), admissible_subgoals=list(self.subgoals))


@dataclasses.dataclass
class RolloutStats:
    """Timing of one :meth:`Collector.run`."""

    wall_s: float
    device_busy_s: float
    env_step_s: float
    turns: int

    @property
    def device_busy_fraction(self) -> float:
        return self.device_busy_s / max(self.wall_s, 1e-9)

    @property
    def turns_per_s(self) -> float:
        return self.turns / max(self.wall_s, 1e-9)


def _busy_time(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals."""
    total, reach = 0.0, -np.inf
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


class Collector:
    """Runs episodes of ``num_envs`` envs with a policy.

    Args:
      spec: the environment.
      num_envs: parallel episodes per :meth:`run`.
      prompt_cfg: prompt settings (``max_steps`` should equal ``max_turns``).
      tokenizer: the chat tokenizer; ``token_bytes`` its :class:`TokenBytes` table.
      max_turns: turns per episode at most (the env is also built with ``max_steps``).
      groups: 1, or 2 to pipeline generation of one half with env stepping of the other.
      envs_per_worker, step_timeout_s: passed to the env pools.
      info_keys: env ``info`` entries to keep in each turn's record (``TurnRecord.env_info``,
        as they stood before the action), e.g. ``("expert_action", "expert_subgoal")``.
    """

    def __init__(self, spec: EnvSpec, num_envs: int, prompt_cfg: PromptConfig, tokenizer,
                 token_bytes: TokenBytes, max_turns: int, groups: int = 2,
                 envs_per_worker: int = 4, step_timeout_s: float = 60.0,
                 info_keys: Sequence[str] = ()):
        if groups not in (1, 2) or num_envs < groups:
            raise ValueError(f"groups must be 1 or 2 and at most num_envs={num_envs}, got {groups}")
        self.spec = spec
        self.num_envs = num_envs
        self.prompt_cfg = prompt_cfg
        self.tokenizer = tokenizer
        self.token_bytes = token_bytes
        self.max_turns = max_turns
        self.info_keys = tuple(info_keys)
        bounds = np.linspace(0, num_envs, groups + 1).astype(int)
        self.group_rows = [list(range(bounds[g], bounds[g + 1])) for g in range(groups)]
        factory = GymFactory(spec.env_id, **{"max_steps": max_turns, **spec.kwargs})
        self.pools: list[EnvPool] = []
        try:
            for rows in self.group_rows:
                self.pools.append(EnvPool(factory, num_envs=len(rows), envs_per_worker=envs_per_worker,
                                          auto_reset=False, step_timeout_s=step_timeout_s))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for pool in self.pools:
            pool.close()

    def __enter__(self) -> "Collector":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def run(self, policy, task_indices: Sequence[int], key: jax.Array,
            group_ids: Optional[Sequence[int]] = None) -> tuple[list[Trajectory], RolloutStats]:
        """Plays one episode per env on the given tasks; returns trajectories in env order."""
        if len(task_indices) != self.num_envs:
            raise ValueError(f"need {self.num_envs} task indices, got {len(task_indices)}")
        start = time.perf_counter()
        episodes = [_Episode() for _ in range(self.num_envs)]
        for g, rows in enumerate(self.group_rows):
            options = [{self.spec.task_option: int(task_indices[i])} for i in rows]
            for i, (obs, info) in zip(rows, self.pools[g].reset(seeds=[int(task_indices[i]) for i in rows],
                                                                  options=options)):
                episodes[i].task = str(info.get("task", ""))
                episodes[i].task_type = str(info.get("task_type", ""))
                episodes[i].game = info.get("gamefile", info.get("goal_id"))
                episodes[i].observation = obs
                episodes[i].admissible = list(info.get("admissible_actions", ()))
                episodes[i].subgoals = list(info.get("admissible_subgoals", ()))
                episodes[i].info = {k: info.get(k) for k in self.info_keys}
        intervals: list[tuple[float, float]] = []
        env_step_s = 0.0
        pending = {}
        for g in range(len(self.group_rows)):
            pending[g] = self._dispatch(g, policy, episodes, key)
        while pending:
            for g in list(pending):
                handle, rows, inputs = pending.pop(g)
                responses = handle.result()
                intervals.append((handle.dispatched_at, handle.done_at))
                step_start = time.perf_counter()
                self._apply(g, rows, inputs, responses, episodes)
                env_step_s += time.perf_counter() - step_start
                if any(not episodes[i].done for i in self.group_rows[g]):
                    pending[g] = self._dispatch(g, policy, episodes, key)
        trajectories = [
            Trajectory(turns=e.turns, task=e.task, task_type=e.task_type, won=e.won,
                       group_id=int(group_ids[i]) if group_ids is not None else i, game=e.game)
            for i, e in enumerate(episodes)
        ]
        stats = RolloutStats(wall_s=time.perf_counter() - start, device_busy_s=_busy_time(intervals),
                             env_step_s=env_step_s, turns=sum(t.num_turns for t in trajectories))
        return trajectories, stats

    def _dispatch(self, g: int, policy, episodes: list[_Episode], key: jax.Array):
        rows = [i for i in self.group_rows[g] if not episodes[i].done]
        views = [episodes[i].view() for i in rows]
        prompts = [render_prompt(v, self.prompt_cfg, self.tokenizer) for v in views]
        turn = len(episodes[rows[0]].turns)
        handle = policy.dispatch(prompts, views, jax.random.fold_in(key, turn * 2 + g))
        return handle, rows, (prompts, views)

    def _apply(self, g: int, rows: list[int], inputs: tuple[list[list[int]], list[AgentView]],
               responses, episodes: list[_Episode]) -> None:
        """Parses the group's responses, steps its envs and records the turns."""
        prompts, views = inputs
        decisions, texts = {}, {}
        for k, i in enumerate(rows):
            ids = responses.token_ids[k]
            text = self.token_bytes.decode(ids)
            parsed = parse_response(text)
            episode = episodes[i]
            decisions[i] = (parsed, decide_turn(parsed, episode.subgoal, first_turn=not episode.turns))
            texts[i] = text
        local = {i: n for n, i in enumerate(self.group_rows[g])}
        actions = [""] * len(self.group_rows[g])
        for i in rows:
            actions[local[i]] = decisions[i][1].action
        results = self.pools[g].step(actions)
        for k, i in enumerate(rows):
            episode = episodes[i]
            parsed, decision = decisions[i]
            result = results[local[i]]
            info = result.info
            last_turn = len(episode.turns) + 1 >= self.max_turns
            ids = np.asarray(responses.token_ids[k], np.int32)
            allowed = responses.allowed[k] if responses.allowed is not None else (None, None)
            record = TurnRecord(
                prompt_ids=np.asarray(prompts[k], np.int32),
                response_ids=ids,
                response_logp=np.asarray(responses.logprobs[k], np.float32),
                spans=response_spans(ids, self.token_bytes),
                switch=decision.switch,
                keep_changed=decision.keep_changed,
                subgoal=decision.subgoal,
                action=decision.action,
                reward=float(result.reward),
                done=bool(result.terminated),
                truncated=bool(result.truncated or (last_turn and not result.terminated)),
                invalid=not decision.valid or bool(info.get("invalid", False)),
                format_valid=decision.valid,
                response_text=texts[i],
                allowed_mode=allowed[0],
                allowed_ids=allowed[1],
                view=views[k],
                env_info=episode.info,
            )
            episode.history.append((episode.observation, decision.action))
            episode.turns.append(record)
            episode.subgoal = decision.subgoal
            episode.observation = result.observation
            episode.admissible = list(info.get("admissible_actions", ()))
            episode.subgoals = list(info.get("admissible_subgoals", episode.subgoals))
            episode.info = {key: info.get(key) for key in self.info_keys}
            episode.won = episode.won or bool(info.get("won", False))
            episode.done = record.done or record.truncated
