"""A pool of text environments stepped in batches across host worker processes.

    pool = EnvPool(GymFactory("hiper_envs.alfworld:hiper/ALFWorld-v0", games="games/train"),
                   num_envs=16, envs_per_worker=4)
    first = pool.reset(seeds=range(16))                  # [(obs, info)] * 16
    results = pool.step(actions)                         # [StepResult(obs, reward, terminated,
                                                         #             truncated, info)] * 16
    pool.close()

Environment-agnostic: envs come from a picklable factory (any picklable zero-argument callable,
or one per env; `GymFactory` wraps `gymnasium.make`). Workers start with the "spawn" (or
"forkserver") method, never fork, since the host usually runs multithreaded JAX.

Episodes that end are, with `auto_reset=True` (default), reset in the same call: the result
holds the new episode's first observation and reset info, with the ending step's observation
and info under `info["final_observation"]` and `info["final_info"]` (gymnasium's same-step
convention). With `auto_reset=False` they stay done: their later results repeat the final
observation with reward 0 until `reset` is called for them.

Failures never hang the caller or lose other envs' results. A worker that dies (e.g. killed)
or does not answer within the timeout is killed and restarted with fresh envs; each of its
envs being stepped gets a truncated result with `info["env_crashed"] = True` and
`info["error"]` (and, with auto-reset, a fresh episode as above). An exception raised inside
an env is caught in the worker and reported the same way for that env alone. An env whose reset
fails (its exception, or its worker crashing twice) answers `("", info)` with the error and
stays done, its step results repeating that, until a `reset` succeeds; a worker that cannot be
restarted is retried at the next call that needs it.

Shutdown belongs to the parent: workers ignore SIGINT and SIGTERM, so a signal sent to the
whole process group (Ctrl-C, `timeout`, Slurm, systemd, preemption scripts) cannot cut their
episodes short while the parent finishes its step and closes them. A worker whose parent dies
exits too (the kernel kills it on Linux; elsewhere it exits when it finds the pipe closed).
Linux ties that to the thread that started the worker, so use a pool from a thread that
outlives it (the main thread, as the collector does).
"""

from __future__ import annotations

import ctypes
import dataclasses
import multiprocessing
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any, NamedTuple

EnvFactory = Callable[[], Any]


class StepResult(NamedTuple):
    """One env's outcome of a batched step."""

    observation: Any
    reward: float
    terminated: bool
    truncated: bool
    info: dict


class GymFactory:
    """Picklable `gymnasium.make(env_id, **kwargs)`. Use `"module:env-id"` so the worker
    imports the module that registers the id (e.g. `"hiper_envs.alfworld:hiper/ALFWorld-v0"`)."""

    def __init__(self, env_id: str, **kwargs: Any):
        self.env_id = env_id
        self.kwargs = kwargs

    def __call__(self) -> Any:
        import gymnasium

        return gymnasium.make(self.env_id, **self.kwargs)

    def __repr__(self) -> str:
        return f"GymFactory({self.env_id!r}, **{self.kwargs!r})"


class WorkerCrashed(RuntimeError):
    pass


def _error_text(error: BaseException) -> str:
    return "".join(traceback.format_exception(type(error), error, error.__traceback__))


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Asks Linux to SIGKILL this process when its parent dies (even one stuck in an env step)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):  # no libc symbol: the closed pipe still ends the loop
            pass


def _worker_main(conn: Connection, factories: Sequence[EnvFactory], auto_reset: bool) -> None:
    """Worker loop: owns `len(factories)` envs; answers ("reset"|"step", payload) requests."""
    for signum in (signal.SIGINT, signal.SIGTERM):  # the parent owns shutdown (module doc)
        signal.signal(signum, signal.SIG_IGN)
    _die_with_parent()
    try:
        envs = [factory() for factory in factories]
    except BaseException as error:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", _error_text(error)))
        return
    conn.send(("ready", None))

    def reset(local: int, seed: Any, options: Any) -> tuple:
        try:
            obs, info = envs[local].reset(seed=seed, options=options)
            return ("ok", obs, info)
        except Exception as error:  # noqa: BLE001 - one env's failure must not stop the others
            return ("error", _error_text(error))

    def step(local: int, action: Any) -> tuple:
        try:
            obs, reward, terminated, truncated, info = envs[local].step(action)
        except Exception as error:  # noqa: BLE001
            outcome = ("error", _error_text(error))
            return outcome + (reset(local, None, None),) if auto_reset else outcome + (None,)
        result = (obs, float(reward), bool(terminated), bool(truncated), info)
        if auto_reset and (terminated or truncated):
            return ("ok", result, reset(local, None, None))
        return ("ok", result, None)

    while True:
        try:
            command, payload = conn.recv()
        except (EOFError, OSError):  # the parent went away
            break
        if command == "reset":
            conn.send([reset(local, seed, options) for local, seed, options in payload])
        elif command == "step":
            conn.send([step(local, action) for local, action in payload])
        elif command == "close":
            break
    for env in envs:
        try:
            env.close()
        except Exception:  # noqa: BLE001 - closing is best effort
            pass


@dataclasses.dataclass
class _Slot:
    """Parent-side state of one env."""

    worker: int
    local: int
    done: bool = True  # needs a reset before it can step
    last: StepResult | None = None
    lost_episode: str | None = None  # its worker was restarted mid-episode; not yet reported


class EnvPool:
    """`num_envs` envs from `factory` over `ceil(num_envs / envs_per_worker)` processes."""

    def __init__(
        self,
        factory: EnvFactory | Sequence[EnvFactory],
        num_envs: int | None = None,
        envs_per_worker: int = 1,
        auto_reset: bool = True,
        step_timeout_s: float = 60.0,
        reset_timeout_s: float = 300.0,
        start_timeout_s: float = 300.0,
        context: str = "spawn",
    ):
        """
        Args:
          factory: a picklable zero-argument callable returning a gymnasium-style env, or a
            sequence of them (one per env; then `num_envs` defaults to its length).
          num_envs: number of envs.
          envs_per_worker: envs per worker process (stepped one after another there).
          auto_reset: reset episodes that end within the same `step` call (see module doc).
          step_timeout_s / reset_timeout_s: how long a batched call waits for a worker
            before killing and restarting it.
          start_timeout_s: how long worker start-up (env construction) may take.
          context: multiprocessing start method, "spawn" or "forkserver".
        """
        if context not in ("spawn", "forkserver"):
            raise ValueError(
                f"context must be 'spawn' or 'forkserver' (fork is unsafe with JAX), got {context!r}"
            )
        if callable(factory):
            if num_envs is None:
                raise ValueError("num_envs is required with a single factory")
            factories = [factory] * num_envs
        else:
            factories = list(factory)
            num_envs = len(factories) if num_envs is None else num_envs
            if len(factories) != num_envs:
                raise ValueError(f"got {len(factories)} factories for num_envs={num_envs}")
        if num_envs < 1 or envs_per_worker < 1:
            raise ValueError(f"num_envs and envs_per_worker must be >= 1, got {num_envs}, {envs_per_worker}")
        self.num_envs = num_envs
        self.auto_reset = auto_reset
        self.step_timeout_s = step_timeout_s
        self.reset_timeout_s = reset_timeout_s
        self.start_timeout_s = start_timeout_s
        self.restarts = 0
        self._broken: dict[int, str] = {}  # workers whose restart failed: the reason
        self._ctx = multiprocessing.get_context(context)
        groups = [
            list(range(i, min(i + envs_per_worker, num_envs))) for i in range(0, num_envs, envs_per_worker)
        ]
        self._worker_envs = groups
        self._worker_factories = [[factories[i] for i in group] for group in groups]
        self._slots = [_Slot(w, k) for w, group in enumerate(groups) for k, _ in enumerate(group)]
        self._procs: list[Any] = [None] * len(groups)
        self._conns: list[Connection | None] = [None] * len(groups)
        self._closed = False
        try:
            for w in range(len(groups)):
                self._spawn(w)
            for w in range(len(groups)):
                self._await_ready(w)
        except BaseException:
            self.close()
            raise

    @property
    def num_workers(self) -> int:
        return len(self._worker_envs)

    def _spawn(self, w: int) -> None:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(
            target=_worker_main,
            args=(child, self._worker_factories[w], self.auto_reset),
            daemon=True,
            name=f"env-pool-worker-{w}",
        )
        proc.start()
        child.close()
        self._procs[w], self._conns[w] = proc, parent

    def _await_ready(self, w: int) -> None:
        status, detail = self._receive(w, time.monotonic() + self.start_timeout_s)
        if status != "ready":
            raise RuntimeError(f"env pool worker {w} failed to build its envs:\n{detail}")

    def _receive(self, w: int, deadline: float) -> Any:
        """The next message from worker `w`, or WorkerCrashed if it dies or misses the deadline."""
        conn, proc = self._conns[w], self._procs[w]
        while True:
            try:
                readable = conn.poll()
            except OSError as error:  # closed: an earlier restart of this worker failed
                raise WorkerCrashed(f"worker {w} is not running: {error!r}") from error
            if readable:
                try:
                    return conn.recv()
                except Exception as error:  # noqa: BLE001 - a dying worker leaves a broken pipe
                    proc.join(timeout=1.0)
                    if proc.exitcode is not None:
                        raise WorkerCrashed(f"worker {w} died (exit code {proc.exitcode})") from error
                    raise WorkerCrashed(f"worker {w} sent a broken message: {error!r}") from error
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerCrashed(f"worker {w} did not answer in time")
            ready = wait([conn, proc.sentinel], timeout=remaining)
            if proc.sentinel in ready and not conn.poll():
                proc.join(timeout=1.0)
                raise WorkerCrashed(f"worker {w} died (exit code {proc.exitcode})")

    def _restart(self, w: int, reason: str) -> None:
        proc = self._procs[w]
        if proc is not None and proc.is_alive():
            proc.kill()
        if proc is not None:
            proc.join(timeout=10)
        self._conns[w].close()
        self.restarts += 1
        try:
            self._spawn(w)
            self._await_ready(w)
            self._broken.pop(w, None)
        except Exception as error:  # noqa: BLE001 - reported per env; the next call retries
            reason = self._broken[w] = f"{reason}; restarting the worker failed: {error}"
        for slot in self._slots:
            if slot.worker == w:
                if not slot.done:
                    slot.lost_episode = reason
                slot.done = True

    def _gather(self, requests: dict[int, list], command: str, timeout_s: float) -> dict[int, list | str]:
        """Send each worker its requests, collect answers; a crashed worker maps to its error."""
        answers: dict[int, list | str] = {w: self._broken[w] for w in requests if w in self._broken}
        for w, payload in requests.items():
            if w in answers:
                continue
            try:
                self._conns[w].send((command, payload))
            except (BrokenPipeError, OSError):
                pass  # reported as a crash when its answer does not come
        deadline = time.monotonic() + timeout_s
        for w in requests:
            if w in answers:
                continue
            try:
                answers[w] = self._receive(w, deadline)
            except WorkerCrashed as crash:
                answers[w] = str(crash)
        return answers

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the env pool is closed")

    def reset(
        self,
        seeds: Sequence[int | None] | None = None,
        options: Sequence[dict | None] | None = None,
        indices: Sequence[int] | None = None,
    ) -> list[tuple[Any, dict]]:
        """Reset the envs at `indices` (default all); returns [(obs, info)] in that order.

        An env whose worker crashes is retried once on a restarted worker; if it fails again
        its entry is `("", {"env_crashed": True, "error": ...})` and it stays un-reset.
        """
        self._check_open()
        indices = list(range(self.num_envs)) if indices is None else [int(i) for i in indices]
        seeds = [None] * len(indices) if seeds is None else list(seeds)
        options = [None] * len(indices) if options is None else list(options)
        if not (len(seeds) == len(options) == len(indices)):
            raise ValueError(f"got {len(seeds)} seeds and {len(options)} options for {len(indices)} envs")
        out: dict[int, tuple[Any, dict]] = {}
        pending = list(zip(indices, seeds, options))
        for attempt in range(2):
            requests: dict[int, list] = {}
            for i, seed, opts in pending:
                slot = self._slots[i]
                requests.setdefault(slot.worker, []).append((slot.local, seed, opts))
            answers = self._gather(requests, "reset", self.reset_timeout_s)
            retry = []
            for i, seed, opts in pending:
                slot = self._slots[i]
                answer = answers[slot.worker]
                if isinstance(answer, str):
                    retry.append((i, seed, opts))
                    out[i] = ("", {"env_crashed": True, "error": answer})
                    continue
                outcome = answer[[s for s, _, _ in requests[slot.worker]].index(slot.local)]
                out[i] = self._apply_reset(slot, outcome)
            for w in {self._slots[i].worker for i, _, _ in retry}:
                self._restart(w, answers[w])
            if not retry or attempt == 1:
                break
            pending = retry
        for i in indices:
            slot = self._slots[i]
            slot.lost_episode = None  # what happened to these is in the answer
            if slot.done:  # the reset failed: later steps repeat the failure until reset() works
                obs, info = out[i]
                slot.last = StepResult(obs, 0.0, False, True, info)
        return [out[i] for i in indices]

    def _apply_reset(self, slot: _Slot, outcome: tuple) -> tuple[Any, dict]:
        slot.lost_episode = None
        if outcome[0] == "error":
            slot.done = True
            return ("", {"env_error": True, "error": outcome[1]})
        _, obs, info = outcome
        slot.done = False
        slot.last = StepResult(obs, 0.0, False, False, info)
        return obs, info

    def step(self, actions: Sequence[Any]) -> list[StepResult]:
        """Step every env with its action; returns one StepResult per env (see module doc)."""
        self._check_open()
        if len(actions) != self.num_envs:
            raise ValueError(f"got {len(actions)} actions for {self.num_envs} envs")
        never_reset = [i for i, slot in enumerate(self._slots) if slot.last is None]
        if never_reset:
            raise RuntimeError(f"reset() the envs {never_reset} before step()")
        requests: dict[int, list] = {}
        for i, action in enumerate(actions):
            slot = self._slots[i]
            if not slot.done:
                requests.setdefault(slot.worker, []).append((slot.local, action))
        answers = self._gather(requests, "step", self.step_timeout_s)
        crashed = [w for w, answer in answers.items() if isinstance(answer, str)]
        for w in crashed:
            self._restart(w, answers[w])
        results: list[StepResult] = []
        recovery: list[int] = []
        for i in range(self.num_envs):
            slot = self._slots[i]
            answer = answers.get(slot.worker)
            if slot.worker not in requests or all(local != slot.local for local, _ in requests[slot.worker]):
                if slot.lost_episode is not None:  # lost in a restart during an earlier reset()
                    results.append(self._crashed(slot, slot.lost_episode))
                    recovery.append(i)
                else:
                    results.append(self._repeat_final(slot))
            elif isinstance(answer, str):
                results.append(self._crashed(slot, answer))
                recovery.append(i)
            else:
                position = [local for local, _ in requests[slot.worker]].index(slot.local)
                results.append(self._apply_step(slot, answer[position]))
        if recovery and self.auto_reset:
            for i, (obs, info) in zip(recovery, self.reset(indices=recovery)):
                final = results[i]
                if self._slots[i].done:  # the fresh reset failed too: the env waits for reset()
                    final.info["reset_error"] = info["error"]
                    self._slots[i].last = final
                    continue
                results[i] = StepResult(obs, 0.0, False, True, self._with_final(info, final, crashed=True))
                self._slots[i].last = results[i]
        return results

    @staticmethod
    def _with_final(reset_info: dict, final: StepResult, crashed: bool = False) -> dict:
        info = {**reset_info, "final_observation": final.observation, "final_info": final.info}
        if crashed:
            info.update(env_crashed=True, error=final.info["error"])
        return info

    def _repeat_final(self, slot: _Slot) -> StepResult:
        last = slot.last
        return StepResult(last.observation, 0.0, last.terminated, last.truncated, last.info)

    def _crashed(self, slot: _Slot, error: str) -> StepResult:
        slot.done = True
        slot.lost_episode = None
        last = slot.last
        info = {**(last.info if last else {}), "env_crashed": True, "error": error}
        result = StepResult(last.observation if last else "", 0.0, False, True, info)
        slot.last = result
        return result

    def _apply_step(self, slot: _Slot, outcome: tuple) -> StepResult:
        status, payload, reset_outcome = outcome
        if status == "error":
            last = slot.last
            final = StepResult(
                last.observation, 0.0, False, True, {**last.info, "env_error": True, "error": payload}
            )
        else:
            final = StepResult(*payload)
        ended = final.terminated or final.truncated
        if reset_outcome is None:
            slot.done = ended
            slot.last = final
            return final
        obs, info = self._apply_reset(slot, reset_outcome)
        if slot.done:  # the auto-reset itself failed: report the end, the env needs reset()
            slot.last = StepResult(
                final.observation,
                final.reward,
                final.terminated,
                final.truncated,
                {**final.info, "reset_error": info["error"]},
            )
            return slot.last
        result = StepResult(
            obs, final.reward, final.terminated, final.truncated, self._with_final(info, final)
        )
        slot.last = result
        return result

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for conn in self._conns:
            if conn is not None:
                try:
                    conn.send(("close", None))
                except (BrokenPipeError, OSError):
                    pass
        for proc in self._procs:
            if proc is not None:
                proc.join(timeout=5)
                if proc.is_alive():
                    proc.kill()
                    proc.join(timeout=5)
        for conn in self._conns:
            if conn is not None:
                conn.close()

    def __enter__(self) -> EnvPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
