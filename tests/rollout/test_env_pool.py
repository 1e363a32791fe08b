"""EnvPool: batched reset/step over worker processes, auto-reset, crash and hang recovery."""

import functools
import os
import signal
import time

import pytest
from pool_dummy_env import CountingEnv, FactoryFailingWhileFileExists, make_counting_env

from hiper_jax.rollout import EnvPool, GymFactory, StepResult


@pytest.fixture
def pool():
    pools = []

    def make(**kwargs):
        kwargs.setdefault("factory", functools.partial(make_counting_env, 3))
        kwargs.setdefault("num_envs", 4)
        kwargs.setdefault("envs_per_worker", 2)
        created = EnvPool(**kwargs)
        pools.append(created)
        return created

    yield make
    for created in pools:
        created.close()


def test_reset_and_step_are_batched_over_worker_processes(pool):
    envs = pool(num_envs=5, envs_per_worker=2)
    assert envs.num_workers == 3
    first = envs.reset(seeds=[10, 11, 12, 13, 14], options=[{"k": i} for i in range(5)])
    assert [obs for obs, _ in first] == ["10:0", "11:0", "12:0", "13:0", "14:0"]
    assert [info["options"] for _, info in first] == [{"k": i} for i in range(5)]
    pids = [info["pid"] for _, info in first]
    assert pids[0] == pids[1] and pids[2] == pids[3] and len({pids[0], pids[2], pids[4]}) == 3
    assert os.getpid() not in pids

    results = envs.step(["a", "b", "c", "d", "e"])
    assert all(isinstance(r, StepResult) for r in results)
    assert [r.observation for r in results] == ["10:1", "11:1", "12:1", "13:1", "14:1"]
    assert [r.info["action"] for r in results] == ["a", "b", "c", "d", "e"]
    assert [(r.reward, r.terminated, r.truncated) for r in results] == [(0.0, False, False)] * 5


def test_auto_reset_starts_the_next_episode_in_the_same_call(pool):
    envs = pool(num_envs=2)
    envs.reset(seeds=[1, 2])
    won, running = envs.step(["win", "x"])
    assert (won.reward, won.terminated, won.truncated) == (1.0, True, False)
    assert won.info["final_observation"] == "1:1" and won.info["final_info"]["action"] == "win"
    assert won.observation.endswith(":0") and won.observation != "1:0"
    assert running.observation == "2:1" and "final_observation" not in running.info

    envs.step(["x", "x"])
    _, truncated = envs.step(["x", "x"])
    assert truncated.truncated and truncated.info["final_observation"] == "2:3"
    assert truncated.observation.endswith(":0")
    after = envs.step(["x", "x"])
    assert after[0].truncated and after[0].observation.endswith(":0")  # env 0's second episode ends
    assert after[1].observation.endswith(":1")


def test_without_auto_reset_finished_episodes_stay_done(pool):
    envs = pool(num_envs=2, auto_reset=False)
    envs.reset(seeds=[1, 2])
    won, _ = envs.step(["win", "x"])
    assert won.terminated and won.observation == "1:1"
    again, other = envs.step(["x", "x"])
    assert again == StepResult("1:1", 0.0, True, False, won.info)
    assert other.observation == "2:2"
    [(obs, _)] = envs.reset(seeds=[5], indices=[0])
    assert obs == "5:0"
    assert envs.step(["x", "x"])[0].observation == "5:1"


def test_a_killed_worker_is_restarted_and_its_episodes_truncated(pool):
    envs = pool(num_envs=4, envs_per_worker=2)
    first = envs.reset(seeds=[1, 2, 3, 4])
    old_pid = first[2][1]["pid"]
    os.kill(old_pid, signal.SIGKILL)

    results = envs.step(["x"] * 4)
    assert [r.observation for r in results[:2]] == ["1:1", "2:1"]  # the other worker's results survive
    for crashed in results[2:]:
        assert crashed.truncated and not crashed.terminated and crashed.reward == 0.0
        assert crashed.info["env_crashed"] and "died" in crashed.info["error"]
        assert crashed.info["final_observation"] in ("3:0", "4:0")
        assert crashed.info["pid"] != old_pid  # auto-reset on the restarted worker
    assert envs.restarts == 1
    results = envs.step(["x"] * 4)
    assert all(not r.info.get("env_crashed") for r in results)
    assert results[2].observation.endswith(":1")


def test_an_episode_lost_to_a_restart_during_reset_is_reported_at_the_next_step(pool):
    envs = pool(num_envs=2, envs_per_worker=2, auto_reset=False)
    first = envs.reset(seeds=[1, 2])
    envs.step(["x", "x"])
    os.kill(first[0][1]["pid"], signal.SIGKILL)
    [(obs, info)] = envs.reset(seeds=[5], indices=[0])  # retried on the restarted worker
    assert obs == "5:0" and info["pid"] != first[0][1]["pid"] and envs.restarts == 1
    reset_env, lost = envs.step(["x", "x"])
    assert reset_env.observation == "5:1"
    assert lost.truncated and lost.info["env_crashed"] and lost.observation == "2:1"
    assert envs.step(["x", "x"])[1] == lost  # then left done, like any ended episode


def test_an_env_that_kills_its_process_mid_step_is_reported(pool):
    envs = pool(num_envs=2, envs_per_worker=1, auto_reset=False)
    envs.reset(seeds=[1, 2])
    died, alive = envs.step(["die", "x"])
    assert died.truncated and died.info["env_crashed"] and died.observation == "1:0"
    assert alive.observation == "2:1"
    assert envs.step(["x", "x"])[0] == died  # left done until reset
    assert envs.reset(seeds=[7], indices=[0])[0][0] == "7:0"


def test_a_hanging_worker_times_out_instead_of_blocking(pool):
    envs = pool(num_envs=2, envs_per_worker=1, step_timeout_s=2.0)
    envs.reset(seeds=[1, 2])
    start = time.monotonic()
    ok, hung = envs.step(["x", "hang"])
    assert time.monotonic() - start < 60  # liveness, not speed: the call must come back
    assert ok.observation == "1:1"
    assert hung.truncated and hung.info["env_crashed"] and "in time" in hung.info["error"]
    assert envs.restarts == 1
    assert envs.step(["x", "x"])[1].observation.endswith(":1")


def test_an_exception_in_one_env_is_reported_without_a_restart(pool):
    envs = pool(num_envs=2, envs_per_worker=2)
    envs.reset(seeds=[1, 2])
    failed, fine = envs.step(["raise", "x"])
    assert failed.truncated and failed.info["final_info"]["env_error"]
    assert "asked to raise" in failed.info["final_info"]["error"]
    assert failed.observation.endswith(":0")  # auto-reset
    assert fine.observation == "2:1"
    assert envs.restarts == 0


class _FailingReset:
    def __call__(self):
        env = CountingEnv()
        env.reset = lambda **kwargs: (_ for _ in ()).throw(RuntimeError("no games left"))
        return env


def test_a_failed_reset_leaves_that_env_done_without_blocking_the_others(pool):
    envs = pool(factory=[CountingEnv, _FailingReset()], num_envs=2, envs_per_worker=1)
    (ok, _), (failed_obs, failed_info) = envs.reset(seeds=[1, 2])
    assert ok == "1:0" and failed_obs == "" and "no games left" in failed_info["error"]
    played, failed = envs.step(["x", "x"])
    assert played.observation == "1:1"
    assert failed.truncated and "no games left" in failed.info["error"]


def test_bad_calls_raise_clear_errors(pool):
    with pytest.raises(ValueError, match="fork"):
        EnvPool(CountingEnv, num_envs=1, context="fork")
    envs = pool(num_envs=2)
    with pytest.raises(RuntimeError, match="reset"):
        envs.step(["x", "x"])
    envs.reset()
    with pytest.raises(ValueError, match="2 envs"):
        envs.step(["x"])
    envs.close()
    with pytest.raises(RuntimeError, match="closed"):
        envs.reset()


def test_a_worker_that_cannot_restart_is_reported_not_raised(pool, tmp_path):
    blocker = tmp_path / "blocker"
    envs = pool(factory=FactoryFailingWhileFileExists(str(blocker)), num_envs=2, envs_per_worker=1)
    first = envs.reset(seeds=[1, 2])
    blocker.touch()
    os.kill(first[0][1]["pid"], signal.SIGKILL)
    crashed, fine = envs.step(["x", "x"])
    assert crashed.truncated and crashed.info["env_crashed"] and crashed.observation == "1:0"
    assert "restarting the worker failed" in crashed.info["reset_error"]
    assert fine.observation == "2:1"
    again, fine = envs.step(["x", "x"])
    assert again == crashed and fine.observation == "2:2"  # left done; the others play on
    blocker.unlink()
    assert envs.reset(seeds=[7], indices=[0])[0][0] == "7:0"
    assert [r.observation for r in envs.step(["x", "x"])] == ["7:1", "2:3"]


def _broken_factory():
    raise OSError("no such game directory")


def test_a_factory_that_fails_raises_at_start():
    with pytest.raises(RuntimeError, match="no such game directory"):
        EnvPool(_broken_factory, num_envs=1)


def test_alfworld_envs_in_a_pool_match_standalone_envs(tmp_path):
    """Two ALFWorld envs per worker, stepped in lockstep, play exactly as lone envs do (one
    textworld wrapper chain per env: nothing is shared between envs of a process)."""
    from hiper_envs.alfworld import AlfWorldEnv, generate_games

    generate_games(
        str(tmp_path),
        3,
        seed=5,
        task_types=["pick_and_place_simple", "pick_two_obj_and_place", "look_at_obj_in_light"],
        progress=False,
    )
    games = str(tmp_path / "train")
    seeds = [3, 4, 5, 6]
    options = [{"game": i % 3} for i in range(4)]

    def play(reset_out, step_fn):
        transcript = [[obs, info["admissible_actions"]] for obs, info in reset_out]
        admissible = [info["admissible_actions"] for _, info in reset_out]
        for t in range(6):
            actions = [adm[(t * 7 + i) % len(adm)] for i, adm in enumerate(admissible)]
            results = step_fn(actions)
            admissible = [r.info["admissible_actions"] for r in results]
            for i, r in enumerate(results):
                transcript[i] += [r.observation, r.info["admissible_actions"], r.reward]
        return transcript

    with EnvPool(
        GymFactory("hiper_envs.alfworld:hiper/ALFWorld-v0", games=games), num_envs=4, envs_per_worker=2
    ) as envs:
        pooled = play(envs.reset(seeds=seeds, options=options), envs.step)

    lone = [AlfWorldEnv(games) for _ in range(4)]
    reset_out = [env.reset(seed=s, options=o) for env, s, o in zip(lone, seeds, options)]

    def lone_step(actions):
        return [StepResult(*env.step(a)) for env, a in zip(lone, actions)]

    assert play(reset_out, lone_step) == pooled


def test_workers_ignore_sigterm_and_sigint_sent_to_the_group(pool):
    envs = pool(num_envs=2, envs_per_worker=1, auto_reset=False)
    first = envs.reset(seeds=[1, 2])
    for _, info in first:
        os.kill(info["pid"], signal.SIGTERM)
        os.kill(info["pid"], signal.SIGINT)
    time.sleep(0.5)
    results = envs.step(["x", "x"])
    assert [r.observation for r in results] == ["1:1", "2:1"]
    assert envs.restarts == 0 and not any(r.info.get("env_crashed") for r in results)


def _process_gone(pid):
    try:
        with open(f"/proc/{pid}/status") as handle:
            return any(line.startswith("State:") and "Z" in line for line in handle)  # a zombie
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_a_worker_stuck_in_a_step_dies_with_its_parent(tmp_path):
    """kill -9 of the parent while a worker hangs inside env.step: the worker is not orphaned."""
    import subprocess
    import sys

    script = tmp_path / "parent.py"
    script.write_text(
        "import functools, os, signal, sys, threading, time\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "from pool_dummy_env import make_counting_env\n"
        "from hiper_jax.rollout import EnvPool\n"
        "if __name__ == '__main__':\n"
        "    pool = EnvPool(functools.partial(make_counting_env, 3), num_envs=1, step_timeout_s=3600)\n"
        "    [(_, info)] = pool.reset(seeds=[1])\n"
        "    print(info['pid'], flush=True)\n"
        "    threading.Thread(target=pool.step, args=(['hang'],), daemon=True).start()\n"
        "    time.sleep(1.0)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    worker = int(result.stdout.split()[0])
    deadline = time.monotonic() + 30
    while not _process_gone(worker):
        assert time.monotonic() < deadline, f"worker {worker} outlived its parent"
        time.sleep(0.1)
