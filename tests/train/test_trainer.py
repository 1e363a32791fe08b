"""The trainer end to end on the ChooseWord task: every estimator learns, a run resumes
exactly after kill -9, and bad configs fail before anything starts."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from hiper_jax.agent.parsing import format_response
from hiper_jax.agent.prompts import PromptConfig
from hiper_jax.tiny import training_texts, tiny_model_config
from hiper_jax.tokenization import train_byte_level_bpe
from hiper_jax.train.config import base_config
from hiper_jax.train.logger import read_metrics


def word_demos(num_episodes=64, seed=0):
    """Undecided demonstrations: each turn says alpha or beta at random (the episode ends when
    alpha is said), so the warm-started policy is near 50/50."""
    rng = np.random.default_rng(seed)
    demos = []
    for _ in range(num_episodes):
        turns, observation = [], "You stand before a door that opens to the magic word."
        for step in range(3):
            word = rng.choice(["alpha", "beta"])
            turns.append({"observation": observation, "admissible_actions": ["say alpha", "say beta"],
                          "switch": "SWITCH" if step == 0 else "KEEP", "subgoal": "open the door",
                          "action": f"say {word}", "reward": 10.0 if word == "alpha" else 0.0,
                          "done": word == "alpha"})
            observation = "Nothing happens."
            if word == "alpha":
                break
        demos.append({"env": "choose_word", "task": "say the magic word", "task_type": "choose_word",
                      "won": turns[-1]["done"], "num_turns": len(turns), "turns": turns})
    return demos


@pytest.fixture(scope="module")
def word_checkpoint(tmp_path_factory):
    """A tiny model warm-started on undecided ChooseWord demonstrations (HF checkpoint dir)."""
    import dataclasses

    from transformers import AutoTokenizer

    from hiper_jax.agent.demos import demo_turns
    from hiper_jax.models import qwen2
    from hiper_jax.train.sft import SFTConfig, make_examples, train_sft

    out = str(tmp_path_factory.mktemp("word_ckpt"))
    demos = word_demos()
    prompt_cfg = PromptConfig(env="choose_word", max_steps=3, max_prompt_tokens=512)
    tokenizer = train_byte_level_bpe(training_texts(demos, [prompt_cfg]) * 4, vocab_size=400)
    tokenizer.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    config = dataclasses.replace(tiny_model_config(len(tokenizer), hidden_size=64, num_layers=2,
                                                   intermediate_size=128), eos_token_id=tokenizer.eos_token_id)
    params = qwen2.init_params(jax.random.key(0), config)
    examples = make_examples(list(demo_turns(demos, prompt_cfg, only_won=False)), tokenizer, prompt_cfg)
    params, history = train_sft(params, config, examples, tokenizer.pad_token_id,
                                SFTConfig(epochs=20, lr=1e-2, batch_rows=16, length_multiple=256),
                                progress=False)
    assert history[-1]["nll"] < 0.1
    qwen2.save_hf_checkpoint(params, config, out)
    return out


def word_config(checkpoint, out_dir, estimator="hae", iterations=4):
    c = base_config()
    c.env.name = "choose_word"
    c.env.num_envs = 32
    c.env.max_turns = 3
    c.env.envs_per_worker = 8
    c.env.env_kwargs = {"num_tasks": 32}
    c.model.checkpoint = checkpoint
    c.prompt.max_prompt_tokens = 512
    c.sampling.max_new_tokens = 32
    c.sampling.prompt_length_multiple = 256
    c.sampling.eval_temperature = 1.0
    c.advantage.estimator = estimator
    c.advantage.rollouts_per_task = 4 if estimator in ("grpo", "rloo") else 1
    c.advantage.gamma = 0.95
    c.advantage.lam_turn = 0.95
    # A format error costs as much as success earns: the 64-wide model's tags are fragile, and
    # trajectory-level estimators otherwise reinforce malformed but lucky responses.
    c.advantage.invalid_action_penalty = 10.0
    c.ppo.actor_lr = 3e-4
    c.ppo.critic_lr = 3e-3
    c.ppo.kl_coef = 0.0
    c.ppo.mini_batch_rows = 16
    c.ppo.micro_batch_rows = 16
    c.ppo.length_multiple = 256
    c.ppo.epochs = 1
    c.train.iterations = iterations
    c.train.eval_every = iterations
    c.train.checkpoint_every = 2
    c.train.out_dir = str(out_dir)
    c.train.tensorboard = False
    return c


def success_rates(records, prefix):
    return [r[f"{prefix}/success"] for r in records if f"{prefix}/success" in r]


@pytest.mark.parametrize("estimator", ["hae", "turn_gae", "grpo", "rloo"])
def test_every_estimator_raises_success(word_checkpoint, tmp_path, estimator):
    from hiper_jax.train.trainer import Trainer

    start = time.perf_counter()
    history = Trainer(word_config(word_checkpoint, tmp_path, estimator, iterations=4), progress=False).run()
    evals = success_rates(history, "eval")
    train = success_rates(history, "train")
    assert len(evals) == 2 and len(train) == 4
    # Undecided at the start (alpha, beta at random; beta costs a turn), clearly better after
    # 4 iterations on the 32 held-out tasks, and on the training rollouts.
    assert evals[-1] >= evals[0] + 0.1, (estimator, evals, train)
    assert np.mean(train[-2:]) > np.mean(train[:2]), (estimator, train)
    assert time.perf_counter() - start < 120, "compilation included; about 40 s on 2 cores"
    assert os.path.exists(tmp_path / "plots" / "curves.png")


def run_cli(config_path, out_dir, iterations, resume=False, wait=True):
    args = [sys.executable, "-m", "hiper_jax.train", f"--config={config_path}",
            f"--config.train.out_dir={out_dir}", f"--config.train.iterations={iterations}",
            f"--config.train.resume={resume}"]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, output[-3000:]
    return process


def test_resume_after_kill_continues_exactly(word_checkpoint, tmp_path):
    config_path = tmp_path / "word_config.py"
    config_path.write_text(
        "from tests.train.test_trainer import word_config\n"
        f"def get_config():\n    return word_config({word_checkpoint!r}, 'unused', iterations=4)\n")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_cli(config_path, straight, 4)
    process = run_cli(config_path, resumed, 4, wait=False)
    deadline = time.time() + 600
    while not (resumed / "checkpoints" / "2").exists():
        assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    run_cli(config_path, resumed, 4, resume=True)

    def comparable(path):
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_metrics(path / "metrics.jsonl")]

    a, b = comparable(straight), comparable(resumed)
    assert [r["iteration"] for r in a] == [r["iteration"] for r in b]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key in ra:
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-5), (ra["iteration"], key)
    from hiper_jax.train.trainer import Trainer

    params = []
    for run in (straight, resumed):
        trainer = Trainer(word_config(word_checkpoint, run, iterations=4), progress=False)
        trainer.config.unlock()
        trainer.config.train.resume = True
        assert trainer.restore() == 4
        params.append(trainer.state.actor)
    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), *params)
    assert max(jax.tree.leaves(diffs)) < 1e-5


@pytest.mark.parametrize("override,field", [
    ("--config.ppo.actor_lr=-1.0", "ppo.actor_lr"),
    ("--config.mesh.data=3", "mesh"),
    ("--config.model.checkpoint=/no/such/checkpoint", "model.checkpoint"),
    ("--config.advantage.estimator=gigpo", "advantage.estimator"),
])
def test_bad_config_fails_at_start_up_naming_the_field(word_checkpoint, tmp_path, override, field):
    config_path = tmp_path / "word_config.py"
    config_path.write_text(
        "from tests.train.test_trainer import word_config\n"
        f"def get_config():\n    return word_config({word_checkpoint!r}, {str(tmp_path / 'out')!r})\n")
    start = time.time()
    result = subprocess.run([sys.executable, "-m", "hiper_jax.train", f"--config={config_path}", override],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert f"config field {field}" in result.stderr
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # nothing ran
    assert time.time() - start < 60
