"""Fault injection on the main job: random env worker kills and one kill -9 of the trainer.

    python -m benchmarks.fault_injection [--config configs/alfworld_tiny.py] [--iterations 4]
        [--kill-prob 0.004] [--out runs/fault_injection] [--timeout-min 120]

Runs the main job's config (fewer iterations) with every env wrapped so that, on each step,
it SIGKILLs its own worker process with probability ``--kill-prob``, first logging every
episode in progress in that process (the episodes the kill cuts). After the iteration past
the first checkpoint has been logged, the trainer itself is killed with SIGKILL, then resumed.
Checks, against the injector's own logs:

* the run completes, and every env worker is gone after the kill -9;
* every worker kill is a restart in the metrics, and every episode the kills cut is a lost
  episode there (per attempt: the completed one exactly, the killed one up to the kill);
* no trajectory that reaches an update was cut (each ends with termination, or with
  truncation at the step limit), and lost episodes are either replayed or dropped;
* the resumed run's metrics have every iteration once (no gap, no duplicate).

Prints a table and writes ``<out>/fault_injection.json``. Runs as the driver (default), or as
one trainer attempt (``--attempt N``, started by the driver).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import gymnasium
import numpy as np

ENV_ID = "hiper_bench/KillingEnv-v0"


# --- the injected env (runs in env worker processes) ---------------------------------------------

_IN_PROGRESS: dict[int, str] = {}  # id(env) -> episode key, for every env of this process
# Episodes that ended inside the worker command being served: their last step's result goes back
# only with the whole command's answer, so a kill before that answer cuts them too.
_ENDED_IN_COMMAND: dict[int, str] = {}
_PROCESS = {"envs": 0, "last_local": -1}


class KillingEnv(gymnasium.Env):
    """``inner_id`` (e.g. ``hiper/ALFWorld-v0``) whose ``step`` kills its worker process with
    probability ``kill_prob``, after appending the episodes that kill cuts to
    ``log_dir/kills-<attempt>.jsonl``: those in progress in this process, and those that ended
    within the command being served (an env worker answers a command for all its envs at once).

    A worker steps its envs in the order they were made, so a step of an env made no later than
    the last one stepped starts a new command; a reset follows every answered command."""

    def __init__(self, inner_id: str, log_dir: str, attempt: int, kill_prob: float, seed: int = 0, **kwargs):
        import hiper_envs  # noqa: F401 - registers the inner ids

        self.inner = gymnasium.make(inner_id, **kwargs).unwrapped
        self.observation_space, self.action_space = self.inner.observation_space, self.inner.action_space
        self.log_path = os.path.join(log_dir, f"kills-{attempt}.jsonl")
        self.kill_prob = kill_prob
        self.rng = np.random.default_rng([seed, attempt, os.getpid(), id(self) % 100_003])
        self.episode = 0
        self.local = _PROCESS["envs"]
        _PROCESS["envs"] += 1

    def reset(self, *, seed=None, options=None):
        _ENDED_IN_COMMAND.clear()  # every earlier command was answered
        _PROCESS["last_local"] = -1
        obs, info = self.inner.reset(seed=seed, options=options)
        self.episode += 1
        _IN_PROGRESS[id(self)] = f"{os.getpid()}:{id(self)}:{self.episode}:{options}"
        return obs, info

    def step(self, action):
        if self.local <= _PROCESS["last_local"]:  # a new command: the previous one was answered
            _ENDED_IN_COMMAND.clear()
        _PROCESS["last_local"] = self.local
        if self.rng.random() < self.kill_prob:
            cut = sorted({*_IN_PROGRESS.values(), *_ENDED_IN_COMMAND.values()})
            with open(self.log_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"pid": os.getpid(), "time": time.time(), "episodes_cut": cut}) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        obs, reward, terminated, truncated, info = self.inner.step(action)
        if terminated or truncated:
            _ENDED_IN_COMMAND[id(self)] = _IN_PROGRESS.pop(id(self))
        return obs, reward, terminated, truncated, info

    def close(self):
        self.inner.close()


if ENV_ID not in gymnasium.registry:
    gymnasium.register(id=ENV_ID, entry_point=KillingEnv)


# --- one trainer attempt ---------------------------------------------------------------------------


def _attempt(args) -> None:
    """Trains with killing envs; appends what reached each update and each rollout's fault
    counts to ``<out>/audit-<attempt>.jsonl``."""
    import importlib.util

    from hiper_jax.rollout import collector as collector_lib
    from hiper_jax.rollout.collector import EnvSpec
    from hiper_jax.train import trainer as trainer_lib

    spec = importlib.util.spec_from_file_location("fault_config", args.config)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.train.iterations = args.iterations
    config.train.out_dir = os.path.join(args.out, "run")
    config.train.resume = args.attempt > 0
    config.train.tensorboard = False
    # Kills this frequent can cut most of one rollout's episodes; the lost-fraction limit (tested
    # in the collector's tests) would stop the run that this script checks for recovery.
    config.env.max_lost_fraction = 1.0
    audit_path = os.path.join(args.out, f"audit-{args.attempt}.jsonl")

    def audit(record: dict) -> None:
        with open(audit_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    trainer = trainer_lib.Trainer(config, progress=False)
    for split in ("train", "eval"):
        inner = trainer.data[split]
        trainer.data[split] = EnvSpec(
            f"benchmarks.fault_injection:{ENV_ID}",
            {**inner.kwargs, "inner_id": inner.env_id.split(":", 1)[1], "log_dir": args.out,
             "attempt": args.attempt, "kill_prob": args.kill_prob}, inner.task_option)

    max_turns = config.env.max_turns
    real_run = collector_lib.Collector.run

    def run(self, *a, **k):
        trajectories, stats = real_run(self, *a, **k)
        audit({"kind": "rollout", "restarts": stats.faults.worker_restarts, "lost": stats.faults.lost_episodes,
               "replayed": stats.faults.replayed_episodes, "dropped": stats.faults.dropped_episodes})
        return trajectories, stats

    real_build = trainer_lib.build_ppo_batch

    def build(trajectories, *a, **k):
        cut = 0
        for t in trajectories:
            if t.lost:
                continue
            last = t.turns[-1] if t.turns else None
            ended = last is not None and (last.done or (len(t.turns) == max_turns and last.truncated))
            cut += not ended or any(turn.done or turn.truncated for turn in t.turns[:-1])
        audit({"kind": "update", "trajectories": len(trajectories), "dropped": sum(t.lost for t in trajectories),
               "dropped_turns": sum(t.num_turns for t in trajectories if t.lost), "cut": cut})
        return real_build(trajectories, *a, **k)

    collector_lib.Collector.run = run
    trainer_lib.build_ppo_batch = build
    trainer.run()


# --- the driver ------------------------------------------------------------------------------------


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    if int(handle.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (FileNotFoundError, IndexError, ValueError):
                pass
    return found


def _launch(args, attempt: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "benchmarks.fault_injection", "--attempt", str(attempt),
               "--config", args.config, "--iterations", str(args.iterations), "--kill-prob", str(args.kill_prob),
               "--out", args.out]
    log = open(os.path.join(args.out, f"attempt-{attempt}.log"), "w", encoding="utf-8")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def _drive(args) -> dict:
    os.makedirs(args.out, exist_ok=True)
    if os.listdir(args.out):
        raise SystemExit(f"{args.out} is not empty; pick a fresh --out")
    metrics_path = os.path.join(args.out, "run", "metrics.jsonl")
    first_checkpoint = None
    deadline = time.time() + args.timeout_min * 60
    start = time.perf_counter()

    # Attempt 0: killed with SIGKILL once the iteration after the first checkpoint is logged.
    process = _launch(args, 0)
    workers: set[int] = set()
    while True:
        if process.poll() is not None:
            raise SystemExit(f"attempt 0 ended (status {process.returncode}) before the kill; see attempt-0.log")
        if time.time() > deadline:
            process.kill()
            raise SystemExit("timed out")
        workers.update(_children(process.pid))
        checkpoint_dir = os.path.join(args.out, "run", "checkpoints")
        steps = sorted(int(n) for n in os.listdir(checkpoint_dir) if n.isdigit()) if os.path.isdir(checkpoint_dir) else []
        if steps:
            first_checkpoint = steps[0]
            if len(_read_jsonl(metrics_path)) > first_checkpoint:
                break
        time.sleep(0.2)
    logged_before_kill = len(_read_jsonl(metrics_path))
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    time.sleep(2.0)
    orphans = sorted(pid for pid in workers if _alive(pid))

    # Attempt 1: resume and finish.
    process = _launch(args, 1)
    try:
        status = process.wait(timeout=max(deadline - time.time(), 1))
    except subprocess.TimeoutExpired:
        process.terminate()  # the trainer checkpoints and stops; its workers go with it
        process.wait()
        raise SystemExit("timed out in the resumed attempt; see attempt-1.log") from None
    records = _read_jsonl(metrics_path)
    return _summary(args, records, first_checkpoint, logged_before_kill, orphans, status,
                    time.perf_counter() - start)


def _summary(args, records, checkpoint, logged_before_kill, orphans, status, wall_s) -> dict:
    kills = [_read_jsonl(os.path.join(args.out, f"kills-{a}.jsonl")) for a in (0, 1)]
    audits = [_read_jsonl(os.path.join(args.out, f"audit-{a}.jsonl")) for a in (0, 1)]
    rollouts = [[r for r in audit if r["kind"] == "rollout"] for audit in audits]
    updates = [[r for r in audit if r["kind"] == "update"] for audit in audits]
    cut_by_kills = [sum(len(k["episodes_cut"]) for k in attempt) for attempt in kills]
    counted_lost = [sum(r["lost"] for r in attempt) for attempt in rollouts]
    counted_restarts = [sum(r["restarts"] for r in attempt) for attempt in rollouts]
    iterations = [r["iteration"] for r in records if "final" not in r]
    metrics_restarts = sum(r.get("rollout/worker_restarts", 0) for r in records)
    checks = {
        "run completed (exit 0)": status == 0,
        "no env worker outlived the kill -9": not orphans,
        "every iteration logged once": iterations == list(range(args.iterations)),
        "one final evaluation": sum("final" in r for r in records) == 1,
        # The completed attempt: every kill and every episode it cut is counted.
        "restarts == kills (resumed attempt)": counted_restarts[1] == len(kills[1]),
        "lost episodes == episodes cut by kills (resumed attempt)": counted_lost[1] == cut_by_kills[1],
        # The killed attempt: a rollout cut short by the kill -9 reported nothing.
        "restarts <= kills (killed attempt)": counted_restarts[0] <= len(kills[0]),
        "lost episodes <= episodes cut (killed attempt)": counted_lost[0] <= cut_by_kills[0],
        "no cut episode reached an update": all(u["cut"] == 0 and u["dropped_turns"] == 0
                                                for attempt in updates for u in attempt),
        "every lost episode replayed or dropped": all(r["lost"] >= r["replayed"] + r["dropped"] and
                                                      (r["lost"] == 0) == (r["replayed"] + r["dropped"] == 0)
                                                      for attempt in rollouts for r in attempt),
    }
    return {
        "config": args.config, "iterations": args.iterations, "kill_prob": args.kill_prob,
        "wall_min": round(wall_s / 60, 1),
        "worker_kills": [len(k) for k in kills],
        "episodes_cut_by_kills": cut_by_kills,
        "restarts_counted": counted_restarts,
        "lost_counted": counted_lost,
        "replayed": [sum(r["replayed"] for r in attempt) for attempt in rollouts],
        "dropped": [sum(r["dropped"] for r in attempt) for attempt in rollouts],
        "restarts_in_final_metrics": metrics_restarts,
        "parent_kill_after_iteration": logged_before_kill,
        "checkpoint_at_kill": checkpoint,
        "iterations_lost_to_the_kill": logged_before_kill - checkpoint,
        "orphaned_workers": orphans,
        "checks": checks,
        "passed": all(checks.values()),
    }


def _print(summary: dict) -> None:
    print(f"\nfault injection on {summary['config']} ({summary['iterations']} iterations, kill probability "
          f"{summary['kill_prob']} per env step), {summary['wall_min']} min")
    print(f"{'':<44}{'killed attempt':>16}{'resumed attempt':>17}")
    for label, key in (("env worker kills (injected)", "worker_kills"),
                       ("episodes those kills cut (injector's log)", "episodes_cut_by_kills"),
                       ("worker restarts counted", "restarts_counted"),
                       ("lost episodes counted", "lost_counted"),
                       ("  replayed to their end", "replayed"),
                       ("  dropped (rows masked)", "dropped")):
        a, b = summary[key]
        print(f"{label:<44}{a:>16}{b:>17}")
    print(f"parent kill -9 after iteration {summary['parent_kill_after_iteration']} was logged; checkpoint "
          f"{summary['checkpoint_at_kill']}; iterations lost and replayed: {summary['iterations_lost_to_the_kill']}")
    for name, ok in summary["checks"].items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/alfworld_tiny.py")
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--kill-prob", type=float, default=0.004)
    parser.add_argument("--out", default="runs/fault_injection")
    parser.add_argument("--timeout-min", type=float, default=120.0)
    parser.add_argument("--attempt", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.attempt is not None:
        _attempt(args)
        return
    summary = _drive(args)
    with open(os.path.join(args.out, "fault_injection.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
    _print(summary)
    sys.exit(0 if summary["passed"] else 1)


if __name__ == "__main__":
    main()
