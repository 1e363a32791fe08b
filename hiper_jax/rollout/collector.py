"""The multi-turn collector: prompts -> one batched policy call -> parse -> step envs, per turn.

Envs live in host worker processes (:class:`~hiper_jax.rollout.env_pool.EnvPool`). With
``groups=2`` the envs are split into two halves, each with its own pool, and the halves are
pipelined: while the device generates for one half, the host steps the other half's envs and
builds its prompts. Every call of :meth:`Collector.run` plays one episode per env.

With ``turn_budget`` set, :meth:`Collector.run` instead plays a fixed number of env turns:
an env whose episode ends starts its next one at once (tasks taken in turn from the given
list, wrapping around), so the decode batches stay full instead of dwindling to the last slow
episodes. When the budget is spent, the episodes still running are cut: their last turn is
marked truncated (not done), so the update bootstraps them when
``advantage.bootstrap_truncated`` is on and counts their missing future as 0 otherwise. In
this mode a cut by an env fault drops the episode (no replays: the budget goes on to the
next episode), episodes that played no turn are not returned, and every episode is its own
group.

Episodes cut by a fault (the env's worker died or hung and was restarted, or the env raised)
are never returned as ordinary truncated episodes: each is played again from its start, on the
same task with a fresh worker, up to ``max_replays`` times, and otherwise returned with no turns
and ``lost=True`` (its batch row stays masked). The counts are in :class:`RolloutStats` and
accumulate in :attr:`Collector.faults`; a rollout that loses more than ``max_lost_fraction`` of
its episodes raises :class:`RolloutFaultError`. ``should_stop`` (checked after every env step)
abandons a rollout with :class:`RolloutInterrupted`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from hiper_jax.agent.parsing import decide_turn, parse_response
from hiper_jax.agent.prompts import AgentView, PromptConfig, render_prompt
from hiper_jax.agent.spans import TokenBytes, response_spans
from hiper_jax.rollout.adapters import EnvSpec
from hiper_jax.rollout.env_pool import EnvPool, GymFactory
from hiper_jax.rollout.types import TurnRecord, Trajectory


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
    lost: Optional[str] = None  # why a fault cut the episode short (None: not cut)
    info: dict = dataclasses.field(default_factory=dict)  # the kept info keys of the last step
    images: list = dataclasses.field(default_factory=list)  # env images so far (with a prompter)

    def view(self) -> AgentView:
        return AgentView(task=self.task, step=len(self.turns), observation=self.observation,
                         admissible_actions=list(self.admissible), subgoal=self.subgoal,
                         history=list(self.history), admissible_subgoals=list(self.subgoals))


class RolloutFaultError(RuntimeError):
    """Too many episodes of one rollout were cut by env worker faults."""


class RolloutInterrupted(Exception):
    """The rollout was abandoned because ``should_stop`` asked for it (e.g. after SIGTERM)."""


@dataclasses.dataclass
class FaultCounts:
    """Env faults seen by a collector (cumulative) or one rollout.

    Attributes:
      worker_restarts: env worker processes restarted after dying, hanging or failing to reset.
      lost_episodes: episode plays cut short by a fault (a replay cut again counts again).
      replayed_episodes: replays of lost episodes that were played to their end.
      dropped_episodes: episodes given up after ``max_replays`` replays (masked rows).
      last_error: the first line of the last fault's error ("" when none).
    """

    worker_restarts: int = 0
    lost_episodes: int = 0
    replayed_episodes: int = 0
    dropped_episodes: int = 0
    last_error: str = ""

    def add(self, other: "FaultCounts") -> None:
        self.worker_restarts += other.worker_restarts
        self.lost_episodes += other.lost_episodes
        self.replayed_episodes += other.replayed_episodes
        self.dropped_episodes += other.dropped_episodes
        self.last_error = other.last_error or self.last_error

    def metrics(self) -> dict[str, float]:
        """``rollout/...`` metric keys and values."""
        return {"rollout/worker_restarts": float(self.worker_restarts),
                "rollout/lost_episodes": float(self.lost_episodes),
                "rollout/replayed_episodes": float(self.replayed_episodes),
                "rollout/dropped_episodes": float(self.dropped_episodes)}


@dataclasses.dataclass
class RolloutStats:
    """Timing and faults of one :meth:`Collector.run` (``turns`` counts kept episodes' turns)."""

    wall_s: float
    device_busy_s: float
    env_step_s: float
    turns: int
    faults: FaultCounts = dataclasses.field(default_factory=FaultCounts)
    active_fraction: float = 0.0  # mean over decode batches of active envs / envs in the group

    @property
    def device_busy_fraction(self) -> float:
        return self.device_busy_s / max(self.wall_s, 1e-9)

    @property
    def turns_per_s(self) -> float:
        return self.turns / max(self.wall_s, 1e-9)


def _error_summary(error: str) -> str:
    """The last non-empty line of a traceback (the exception), else its first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else 0.0


def _busy_time(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals."""
    total, reach = 0.0, -np.inf
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total



def _updated_images(images: list, info: dict) -> list:
    """An episode's images after a reset or step: ``info["images"]`` (all so far) when the env
    sends them, else ``images`` and the step's ``info["new_images"]``."""
    if "images" in info:
        return list(info["images"])
    return list(images) + list(info.get("new_images", ()))


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
      max_replays: replays of an episode cut by a fault before it is dropped (0: drop at once).
      max_lost_fraction: raise :class:`RolloutFaultError` when more than this fraction of a
        rollout's episodes is cut by faults (1: never).
      should_stop: called after every env step; True abandons the rollout
        (:class:`RolloutInterrupted`).
      info_keys: env ``info`` entries to keep in each turn's record (``TurnRecord.env_info``,
        as they stood before the action), e.g. ``("expert_action", "expert_subgoal")``.
      turn_budget: 0 plays one episode per env per :meth:`run`; > 0 plays exactly this many
        env turns per :meth:`run` with continuous episodes (see the module doc).
      prompter: for a vision-language policy, an
        :class:`~hiper_jax.rollout.images.ImagePrompter`: each episode keeps the images its env
        sends (``info["images"]``, all so far, or ``info["new_images"]``, the step's new ones,
        appended), each rendered prompt becomes an
        :class:`~hiper_jax.rollout.images.ImagePrompt` with them, and each turn records its
        images and grid. None (the default): text prompts, no images kept.
    """

    def __init__(self, spec: EnvSpec, num_envs: int, prompt_cfg: PromptConfig, tokenizer,
                 token_bytes: TokenBytes, max_turns: int, groups: int = 2,
                 envs_per_worker: int = 4, step_timeout_s: float = 60.0, max_replays: int = 2,
                 max_lost_fraction: float = 1.0, should_stop: Optional[Callable[[], bool]] = None,
                 info_keys: Sequence[str] = (), turn_budget: int = 0, prompter=None):
        if turn_budget < 0:
            raise ValueError(f"turn_budget must be >= 0, got {turn_budget}")
        self.turn_budget = int(turn_budget)
        if groups not in (1, 2) or num_envs < groups:
            raise ValueError(f"groups must be 1 or 2 and at most num_envs={num_envs}, got {groups}")
        if max_replays < 0 or not 0 <= max_lost_fraction <= 1:
            raise ValueError(f"need max_replays >= 0 and max_lost_fraction in [0, 1], got "
                             f"{max_replays}, {max_lost_fraction}")
        self.max_replays = max_replays
        self.max_lost_fraction = max_lost_fraction
        self.should_stop = should_stop
        self.faults = FaultCounts()
        self.spec = spec
        self.num_envs = num_envs
        self.prompt_cfg = prompt_cfg
        self.tokenizer = tokenizer
        self.token_bytes = token_bytes
        self.max_turns = max_turns
        self.info_keys = tuple(info_keys)
        self.prompter = prompter
        bounds = np.linspace(0, num_envs, groups + 1).astype(int)
        self.group_rows = [list(range(bounds[g], bounds[g + 1])) for g in range(groups)]
        factory = GymFactory(spec.env_id, **{spec.max_steps_key: max_turns, **spec.kwargs})
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
        """Plays one episode per env on the given tasks; returns trajectories in env order.

        With ``turn_budget`` > 0 it plays exactly that many env turns with continuous episodes
        instead (``task_indices`` of any length: env i starts on the i-th, each next episode
        takes the next task, wrapping around; ``group_ids`` are not used) and returns the
        episodes that played a turn, ordered by env and then by start, ``group_id`` being the
        episode's start number (see the module doc).

        Raises:
          RolloutFaultError: more than ``max_lost_fraction`` of the episodes were cut by faults.
          RolloutInterrupted: ``should_stop()`` became true.
        """
        if self.turn_budget:  # group_ids are not used: every episode is its own group
            return self._run_budget(policy, task_indices, key)
        if len(task_indices) != self.num_envs:
            raise ValueError(f"need {self.num_envs} task indices, got {len(task_indices)}")
        start = time.perf_counter()
        restarts_before = self._worker_restarts()
        episodes = [_Episode() for _ in range(self.num_envs)]
        rows = list(range(self.num_envs))
        intervals: list[tuple[float, float]] = []
        timing = {"env_step_s": 0.0, "active": []}
        faults = FaultCounts()
        self._play(policy, episodes, rows, task_indices, key, intervals, timing)
        lost = [i for i in rows if episodes[i].lost]
        faults.lost_episodes = len(lost)
        if lost:
            faults.last_error = _error_summary(episodes[lost[-1]].lost)
        if len(lost) > self.max_lost_fraction * self.num_envs:
            faults.worker_restarts = self._worker_restarts() - restarts_before
            self.faults.add(faults)
            raise RolloutFaultError(
                f"{len(lost)} of {self.num_envs} episodes were cut by env worker faults "
                f"({faults.worker_restarts} worker restarts), more than env.max_lost_fraction="
                f"{self.max_lost_fraction}; last error: {faults.last_error}")
        for replay in range(1, self.max_replays + 1):
            if not lost:
                break
            for i in lost:
                episodes[i] = _Episode()
            self._play(policy, episodes, lost, task_indices, jax.random.fold_in(key, 1_000_003 * replay),
                       intervals, timing)
            still_lost = [i for i in lost if episodes[i].lost]
            faults.lost_episodes += len(still_lost)
            faults.replayed_episodes += len(lost) - len(still_lost)
            if still_lost:
                faults.last_error = _error_summary(episodes[still_lost[-1]].lost)
            lost = still_lost
        faults.dropped_episodes = len(lost)
        faults.worker_restarts = self._worker_restarts() - restarts_before
        self.faults.add(faults)
        trajectories = [
            Trajectory(turns=[] if e.lost else e.turns, task=e.task, task_type=e.task_type,
                       won=e.won and not e.lost,
                       group_id=int(group_ids[i]) if group_ids is not None else i, game=e.game,
                       lost=e.lost is not None)
            for i, e in enumerate(episodes)
        ]
        stats = RolloutStats(wall_s=time.perf_counter() - start, device_busy_s=_busy_time(intervals),
                             env_step_s=timing["env_step_s"],
                             turns=sum(t.num_turns for t in trajectories), faults=faults,
                             active_fraction=_mean(timing["active"]))
        return trajectories, stats

    def _run_budget(self, policy, task_indices: Sequence[int], key: jax.Array
                    ) -> tuple[list[Trajectory], RolloutStats]:
        """Plays ``turn_budget`` env turns with continuous episodes; returns the episodes that
        played a turn, by env and then in play order (``group_id``: the episode's number)."""
        if not task_indices:
            raise ValueError("need at least one task index")
        start = time.perf_counter()
        restarts_before = self._worker_restarts()
        intervals: list[tuple[float, float]] = []
        timing = {"env_step_s": 0.0, "active": []}
        played: list[tuple[int, int, _Episode]] = []  # (env, episode number, episode)
        serial = {"next": 0}
        episodes = [_Episode() for _ in range(self.num_envs)]
        number = [0] * self.num_envs

        def start_episodes(rows: list[int]) -> None:
            tasks = []
            for i in rows:
                number[i] = serial["next"]
                tasks.append(int(task_indices[serial["next"] % len(task_indices)]))
                serial["next"] += 1
                episodes[i] = _Episode()
            by_env = dict(zip(rows, tasks))
            self._reset(rows, lambda i: by_env[i], episodes)
            for i in rows:
                played.append((i, number[i], episodes[i]))

        start_episodes(list(range(self.num_envs)))
        budget = {"left": self.turn_budget}
        pending = {}

        def dispatch(g: int) -> None:
            # Cut to the turns left: the envs left out (last dispatch only) are still stepped by
            # the pool, but their episodes end at their last recorded turn.
            rows = [i for i in self.group_rows[g] if not episodes[i].done][:budget["left"]]
            if rows:
                budget["left"] -= len(rows)
                timing["active"].append(len(rows) / len(self.group_rows[g]))
                pending[g] = self._dispatch(g, policy, episodes, key, rows=rows,
                                            step=len(timing["active"]))

        def restart_ended(g: int) -> None:
            ended = [i for i in self.group_rows[g] if episodes[i].done]
            if ended and budget["left"] > 0:
                start_episodes(ended)

        def redispatch(g: int) -> None:
            if budget["left"] > 0:
                dispatch(g)

        for g in range(len(self.group_rows)):
            dispatch(g)
        self._drive(pending, episodes, intervals, timing, redispatch, after_apply=restart_ended)
        faults = FaultCounts()
        trajectories = []
        for i, n, e in sorted(played, key=lambda p: p[:2]):
            if e.lost:
                faults.lost_episodes += 1
                faults.dropped_episodes += 1
                faults.last_error = _error_summary(e.lost)
                continue
            if not e.turns:
                continue
            if not e.done:  # still running when the budget was spent: cut as truncated
                e.turns[-1] = dataclasses.replace(e.turns[-1], truncated=True)
            trajectories.append(Trajectory(turns=e.turns, task=e.task, task_type=e.task_type,
                                           won=e.won, group_id=n, game=e.game, lost=False))
        faults.worker_restarts = self._worker_restarts() - restarts_before
        self.faults.add(faults)
        if faults.lost_episodes > self.max_lost_fraction * max(len(played), 1):
            raise RolloutFaultError(
                f"{faults.lost_episodes} of {len(played)} episodes were cut by env worker faults "
                f"({faults.worker_restarts} worker restarts), more than env.max_lost_fraction="
                f"{self.max_lost_fraction}; last error: {faults.last_error}")
        stats = RolloutStats(wall_s=time.perf_counter() - start, device_busy_s=_busy_time(intervals),
                             env_step_s=timing["env_step_s"],
                             turns=sum(t.num_turns for t in trajectories), faults=faults,
                             active_fraction=_mean(timing["active"]))
        return trajectories, stats

    def _worker_restarts(self) -> int:
        return sum(pool.restarts for pool in self.pools)

    def _play(self, policy, episodes: list[_Episode], rows: Sequence[int], task_indices: Sequence[int],
              key: jax.Array, intervals: list, timing: dict) -> None:
        """Resets the envs of ``rows`` on their tasks and plays them to the end; the other
        episodes must be done already."""
        self._reset(sorted(set(rows)), lambda i: int(task_indices[i]), episodes)
        pending = {}

        def dispatch(g: int) -> None:
            if any(not episodes[i].done for i in self.group_rows[g]):
                pending[g] = self._dispatch(g, policy, episodes, key)
                timing["active"].append(len(pending[g][1]) / len(self.group_rows[g]))

        for g in range(len(self.group_rows)):
            dispatch(g)
        self._drive(pending, episodes, intervals, timing, dispatch)

    def _drive(self, pending: dict, episodes: list[_Episode], intervals: list, timing: dict,
               redispatch: Callable[[int], None],
               after_apply: Optional[Callable[[int], None]] = None) -> None:
        """Until no group has a generation in flight: waits on each group's in turn, steps its
        envs with the responses (then ``after_apply(g)``, both timed as env stepping), checks
        ``should_stop`` and lets ``redispatch(g)`` send the group's next prompts (it puts them
        in ``pending``). Records device intervals in ``intervals`` and env seconds in ``timing``."""
        while pending:
            for g in list(pending):
                handle, active, inputs = pending.pop(g)
                responses = handle.result()
                intervals.append((handle.dispatched_at, handle.done_at))
                step_start = time.perf_counter()
                self._apply(g, active, inputs, responses, episodes)
                if after_apply is not None:
                    after_apply(g)
                timing["env_step_s"] += time.perf_counter() - step_start
                if self.should_stop is not None and self.should_stop():
                    raise RolloutInterrupted("the rollout was stopped between env steps")
                redispatch(g)

    def _reset(self, rows: Sequence[int], task_of: Callable[[int], int],
               episodes: list[_Episode]) -> None:
        """Resets the envs of ``rows`` (ascending) on ``task_of(row)`` into ``episodes``."""
        rows = set(rows)
        for g, group in enumerate(self.group_rows):
            mine = [i for i in group if i in rows]
            if not mine:
                continue
            local = [i - group[0] for i in mine]
            options = [{self.spec.task_option: task_of(i)} for i in mine]
            answers = self.pools[g].reset(seeds=[task_of(i) for i in mine], options=options,
                                          indices=local)
            for i, (obs, info) in zip(mine, answers):
                episode = episodes[i]
                episode.task = str(info.get("task", ""))
                episode.task_type = str(info.get(self.spec.task_type_key, ""))
                episode.game = info.get("gamefile", info.get("goal_id"))
                episode.observation = obs
                episode.admissible = list(info.get(self.spec.admissible_key, ()))
                episode.subgoals = list(info.get("admissible_subgoals", ()))
                episode.info = {k: info.get(k) for k in self.info_keys}
                if self.prompter is not None:
                    episode.images = _updated_images([], info)
                if info.get("env_crashed") or info.get("env_error"):  # the reset itself failed
                    episode.lost, episode.done = str(info.get("error", "reset failed")), True

    def _dispatch(self, g: int, policy, episodes: list[_Episode], key: jax.Array,
                  rows: Optional[list[int]] = None, step: Optional[int] = None):
        """Sends the prompts of ``rows`` (default: the group's running episodes) to the policy;
        the sampling key folds in ``step`` (default: the first row's turn number)."""
        if rows is None:
            rows = [i for i in self.group_rows[g] if not episodes[i].done]
        views = [episodes[i].view() for i in rows]
        prompts = [render_prompt(v, self.prompt_cfg, self.tokenizer) for v in views]
        if self.prompter is not None:
            prompts = [self.prompter(p, episodes[i].images) for p, i in zip(prompts, rows)]
        turn = len(episodes[rows[0]].turns) if step is None else step
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
            if info.get("env_crashed") or info.get("env_error"):
                # The env never completed this step (its worker died, hung or raised): the
                # episode is cut, not truncated, and is replayed or dropped by run().
                episode.lost, episode.done = str(info.get("error", "env worker fault")), True
                continue
            last_turn = len(episode.turns) + 1 >= self.max_turns
            ids = np.asarray(responses.token_ids[k], np.int32)
            allowed = responses.allowed[k] if responses.allowed is not None else (None, None)
            prompt = prompts[k]
            images, grid = (), None
            if self.prompter is not None:
                prompt, images, grid = prompt.token_ids, prompt.images, prompt.grid
            record = TurnRecord(
                prompt_ids=np.asarray(prompt, np.int32),
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
                images=images,
                image_grid=grid,
            )
            episode.history.append((episode.observation, decision.action))
            episode.turns.append(record)
            episode.subgoal = decision.subgoal
            episode.observation = result.observation
            episode.admissible = list(info.get(self.spec.admissible_key, ()))
            episode.subgoals = list(info.get("admissible_subgoals", episode.subgoals))
            episode.info = {key: info.get(key) for key in self.info_keys}
            if self.prompter is not None:
                episode.images = _updated_images(episode.images, info)
            episode.won = episode.won or bool(info.get("won", False))
            episode.done = record.done or record.truncated
