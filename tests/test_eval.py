"""The evaluation command: Wilson intervals, one-line errors, and evaluation of the tiny model
on generated ALFWorld games (HF checkpoint) and on the official layout (run directory)."""

import json
import os
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest

from hiper_jax.eval import (
    episode_records,
    episode_tasks,
    evaluate_checkpoint,
    prepare,
    render_html,
    resolve_checkpoint,
    summarize,
    wilson_interval,
)
from hiper_jax.agent.prompts import AgentView
from hiper_jax.rollout.types import Trajectory, TurnRecord

# Published values of the 95% Wilson interval (as scipy's binomtest(...).proportion_ci(0.95,
# "wilson") and statsmodels' proportion_confint(method="wilson") give them).
WILSON_95 = [((0, 10), (0.0, 0.27753)), ((5, 10), (0.23659, 0.76341)), ((10, 10), (0.72247, 1.0)),
             ((1, 20), (0.00888, 0.23613)), ((81, 128), (0.54657, 0.71132))]


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.cards, self.external = [], 0, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag not in ("br", "meta"):
            self.stack.append(tag)
        if "card" in (attrs.get("class") or "").split():
            self.cards += 1
        self.external += [v for k, v in attrs.items() if k in ("src", "href") and v]

    def handle_endtag(self, tag):
        assert self.stack and self.stack.pop() == tag, f"unbalanced </{tag}>"


@pytest.mark.parametrize("counts,bounds", WILSON_95)
def test_wilson_interval_known_values(counts, bounds):
    low, high = wilson_interval(*counts)
    assert low == pytest.approx(bounds[0], abs=2e-5) and high == pytest.approx(bounds[1], abs=2e-5)
    mirrored = wilson_interval(counts[1] - counts[0], counts[1])
    assert mirrored == pytest.approx((1 - high, 1 - low), abs=1e-12)


def test_wilson_interval_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for trials in (1, 7, 40, 128):
        for successes in range(0, trials + 1, max(1, trials // 9)):
            ci = stats.binomtest(successes, trials).proportion_ci(0.95, method="wilson")
            assert wilson_interval(successes, trials) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_wilson_interval_edges():
    assert all(np.isnan(wilson_interval(0, 0)))
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def _turn(switch=False, invalid=False, observation="o"):
    return TurnRecord(prompt_ids=np.zeros(1, np.int32), response_ids=np.zeros(1, np.int32),
                      response_logp=np.zeros(1, np.float32), spans=None, switch=switch,
                      keep_changed=False, subgoal="g", action="a", reward=0.0, done=False,
                      truncated=False, invalid=invalid, format_valid=True,
                      view=AgentView(task="t", step=0, observation=observation, admissible_actions=()))


def test_summary_rows_and_seeds():
    a = Trajectory([_turn(True), _turn(invalid=True)], task_type="heat", won=True)
    b = Trajectory([_turn(True), _turn(True), _turn()], task_type="cool", won=False)
    summary = summarize([a, b, b, b], seeds=[3, 4])
    rows = {r["task_type"]: r for r in summary["rows"]}
    assert rows["all"]["episodes"] == 4 and rows["all"]["successes"] == 1
    assert (rows["all"]["ci_low"], rows["all"]["ci_high"]) == pytest.approx(wilson_interval(1, 4))
    assert rows["heat"]["invalid_rate"] == 0.5 and rows["cool"]["switch_rate"] == 0.5
    assert rows["cool"]["mean_turns"] == 3 and summary["success_per_seed"] == {3: 0.5, 4: 0.0}


def test_episode_tasks_cover_the_split_before_repeating():
    tasks = episode_tasks(5, 12)
    assert sorted(tasks[:5]) == list(range(5)) and tasks[5:10] == tasks[:5] and tasks[10:] == tasks[:2]
    assert episode_tasks(5, 12) == tasks  # the same order for every seed and run


def test_bad_checkpoint_paths_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        resolve_checkpoint(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="neither an HF checkpoint"):
        resolve_checkpoint(str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no orbax checkpoint"):
        resolve_checkpoint(str(tmp_path))


def test_run_config_round_trips(tmp_path):
    from hiper_jax.eval import load_run_config
    from hiper_jax.train.config import to_dict

    config = _tiny_config("/games")
    config.advantage.estimator = "gigpo"
    config.advantage.rollouts_per_task = 4
    (tmp_path / "config.json").write_text(json.dumps(to_dict(config)))
    loaded = load_run_config(str(tmp_path))
    assert to_dict(loaded) == to_dict(config)


def test_records_and_page_with_advantages():
    a = Trajectory([_turn(True, observation="You see <b>a fridge</b> & a pan."), _turn(invalid=True)],
                   task="put a pan in fridge", task_type="pick", won=True, game="g1")
    a.turns[-1].reward = 10.0
    b = Trajectory([_turn(True)], task="heat an egg", task_type="heat", game="g2")
    advantages = np.array([[[0.5, 1.5, -0.25], [-2.0, 0.0, 0.75]], [[0.1, 0.2, 0.3], [9.0, 9.0, 9.0]]])
    trajectories = [a, b, a, b]
    records = episode_records(trajectories, [0, 1], [4, 7], np.concatenate([advantages] * 2))
    assert [(r["seed"], r["episode"], r["task_index"]) for r in records] == [(0, 0, 4), (0, 1, 7), (1, 0, 4), (1, 1, 7)]
    assert records[0]["turns"][1]["adv"] == [-2.0, 0.0, 0.75] and records[0]["return"] == 10.0
    assert len(records[1]["turns"]) == 1  # padding turns of the [B, T] array are not transcribed
    page = render_html(records, summarize(trajectories, [0, 1]), "t<1>", max_episodes=3)
    parser = _Tags()
    parser.feed(page)
    assert parser.stack == [] and parser.cards == 3 and parser.external == []
    assert "&lt;b&gt;a fridge&lt;/b&gt; &amp; a pan." in page and "t&lt;1&gt;" in page  # escaped
    assert "first 3 of 4 episodes" in page and "A low" in page and "+1.50" in page and "-2.00" in page
    assert page.index("seed 0 · ") < page.index("seed 1 · ")  # same task side by side, seeds in order
    assert "A low" not in render_html(episode_records(trajectories, [0, 1], [4, 7]),
                                      summarize(trajectories, [0, 1]), "t")


def _tiny_config(games, **env):
    """The shipped tiny config, shrunk: 2 envs, 3 turns, one prompt shape."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "alfworld_tiny.py")
    spec = importlib.util.spec_from_file_location("alfworld_tiny", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.env.games_dir = str(games)
    c.env.num_envs = 2
    c.advantage.update(estimator="hae", rollouts_per_task=1)
    c.env.max_turns = 3
    c.env.envs_per_worker = 1
    c.sampling.prompt_length_multiple = 512
    c.ppo.mini_batch_rows = 16
    c.ppo.micro_batch_rows = 16
    c.ppo.length_multiple = 512
    c.env.update(env)
    return c


def test_bad_split_fails_before_loading(games_root, tmp_path, monkeypatch):
    from hiper_jax.assets import TINY_ALFWORLD

    config = _tiny_config(games_root)
    with pytest.raises(ValueError, match="unknown; known splits: eval, train, official:valid_seen"):
        prepare(TINY_ALFWORLD, config, "valid_unseen", str(tmp_path))
    monkeypatch.delenv("ALFWORLD_DATA", raising=False)
    with pytest.raises(ValueError, match="ALFWORLD_DATA"):
        prepare(TINY_ALFWORLD, config, "official:valid_unseen", str(tmp_path))
    with pytest.raises(ValueError, match="--config is required"):
        prepare(TINY_ALFWORLD, None, "eval", str(tmp_path))
    webshop = _tiny_config("", name="webshop")
    with pytest.raises(ValueError, match="official splits are ALFWorld's"):
        prepare(TINY_ALFWORLD, webshop, "official:valid_seen", str(tmp_path))
    assert not os.listdir(tmp_path)  # nothing was written


@pytest.mark.parametrize("args,message", [
    (["--checkpoint=/no/such/run"], "error: --checkpoint /no/such/run: no such directory"),
    (["--checkpoint={tiny}", "--config=configs/alfworld_tiny.py", "--split=valid"],
     "error: --split 'valid': unknown; known splits:"),
])
def test_cli_errors_are_one_line(args, message, tmp_path):
    from hiper_jax.assets import TINY_ALFWORLD

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = [a.format(tiny=TINY_ALFWORLD) for a in args]
    result = subprocess.run([sys.executable, "-m", "hiper_jax.eval", *args, f"--out={tmp_path / 'out'}"],
                            capture_output=True, text=True, timeout=300, cwd=root)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def check_outputs(result, episodes, seeds, with_advantages):
    out = result.out_dir
    records = [json.loads(line) for line in open(os.path.join(out, "episodes.jsonl"))]
    assert len(records) == episodes * len(seeds) == len(result.records)
    assert [r["seed"] for r in records] == [s for s in seeds for _ in range(episodes)]
    # every seed replays the same tasks
    assert len({tuple(r["task_index"] for r in records if r["seed"] == s) for s in seeds}) == 1
    summary = json.load(open(os.path.join(out, "summary.json")))
    overall = summary["rows"][0]
    assert overall["task_type"] == "all" and overall["episodes"] == len(records)
    assert overall["success"] == pytest.approx(np.mean([r["won"] for r in records]))
    assert overall["mean_turns"] == pytest.approx(np.mean([r["num_turns"] for r in records]))
    turns = [t for r in records for t in r["turns"]]
    assert overall["invalid_rate"] == pytest.approx(np.mean([t["invalid"] for t in turns]))
    types = sorted({r["task_type"] for r in records})
    assert [row["task_type"] for row in summary["rows"][1:]] == types
    table = open(os.path.join(out, "table.md")).read()
    assert "95% CI" in table and "Wilson" in table and all(f"| {t} |" in table for t in types)
    for r in records:
        assert 1 <= r["num_turns"] <= 3 and len(r["turns"]) == r["num_turns"]
        assert r["won"] == (r["return"] > 0)
        assert all(t["response"] and t["observation"] for t in r["turns"])
        assert all(("adv" in t) == with_advantages for t in r["turns"])
    page = open(os.path.join(out, "transcripts.html")).read()
    parser = _Tags()
    parser.feed(page)
    assert parser.stack == [] and parser.cards == len(records) and parser.external == []
    assert "<script" not in page and ("A low" in page) == with_advantages
    return records, summary


@pytest.mark.slow
def test_eval_hf_checkpoint_on_generated_games(games_root, tmp_path):
    """The command on the shipped tiny model (3 episodes x 2 seeds, 3 turns each; ~35 s of CPU
    in the main process plus the env workers', mostly compilation)."""
    from hiper_jax.assets import TINY_ALFWORLD

    result = evaluate_checkpoint(TINY_ALFWORLD, _tiny_config(games_root), episodes=3, seeds=(0, 1),
                                 out_dir=str(tmp_path / "eval"), prompts=True, progress=False)
    records, summary = check_outputs(result, 3, (0, 1), with_advantages=False)
    assert summary["kind"] == "hf" and summary["num_tasks"] == 6 and summary["temperature"] == 0.4
    assert all(r["game"].startswith(str(games_root / "eval")) for r in records)
    assert all(t["prompt"].endswith("<|im_start|>assistant\n") for r in records for t in r["turns"])


@pytest.mark.slow
def test_eval_run_directory_on_the_official_layout(games_root, train_games, tmp_path, monkeypatch):
    """A run directory (config.json + orbax checkpoint) on the official layout, with per-turn
    advantages (two trainer set-ups and the batch passes: a few minutes)."""
    from hiper_jax.train.trainer import Trainer
    from tests.envs.alfworld.test_alfworld_env import _make_official_fixture

    _make_official_fixture(tmp_path / "data", train_games)
    monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path / "data"))
    run_dir = tmp_path / "run"
    config = _tiny_config(games_root)
    config.train.out_dir = str(run_dir)
    config.train.tensorboard = False
    Trainer(config, progress=False).save(3)
    result = evaluate_checkpoint(str(run_dir), None, split="official:valid_unseen", episodes=2,
                                 seeds=(5,), progress=False)
    assert result.out_dir == str(run_dir / "eval" / "official_valid_unseen")
    records, summary = check_outputs(result, 2, (5,), with_advantages=True)
    assert summary["kind"] == "run" and summary["iteration"] == 3 and summary["num_tasks"] == 2
    assert summary["estimator"] == "hae"
    official = str(tmp_path / "data" / "json_2.1.1" / "valid_unseen")
    assert sorted(r["game"] for r in records) == sorted(
        os.path.join(root, "game.tw-pddl") for root, _, files in os.walk(official) if "game.tw-pddl" in files)
    # HAE with normalize=True standardises the action advantages over these episodes' turns.
    low = np.array([t["adv"][0] for r in records for t in r["turns"]])
    assert abs(low.mean()) < 1e-3 and abs(low.std() - 1) < 1e-2


@pytest.mark.slow
def test_cli_end_to_end(games_root, tmp_path):
    """``python -m hiper_jax.eval`` with a config file and overrides (a fresh process: ~1-2 min)."""
    from hiper_jax.assets import TINY_ALFWORLD

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "hiper_jax.eval", f"--checkpoint={TINY_ALFWORLD}",
         "--config=configs/alfworld_tiny.py", f"--config.env.games_dir={games_root}",
         "--config.env.num_envs=2", "--config.env.max_turns=3", "--config.sampling.prompt_length_multiple=512",
         "--episodes=2", "--seeds=0,1", "--temperature=0.0", f"--out={out}"],
        capture_output=True, text=True, timeout=900, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| all | 4 |" in result.stdout and "Wilson" in result.stdout
    for name in ("table.md", "summary.json", "episodes.jsonl", "transcripts.html", "config.json"):
        assert (out / name).exists(), name
    records = [json.loads(line) for line in open(out / "episodes.jsonl")]
    # greedy decoding: both seeds play the same episodes
    assert [r["turns"] for r in records[:2]] == [r["turns"] for r in records[2:]]


RESPONSES = [
    ["<switch>SWITCH</switch><subgoal>find and take the apple</subgoal><action>go to countertop 1</action>",
     "<switch>KEEP</switch><subgoal>find and take the apple</subgoal><action>open fridge 1</action>",
     "<switch>SWITCH</switch><subgoal>heat the apple with the microwave</subgoal><action>heat apple 1 with microwave 1</action>"],
    ["<switch>KEEP</switch><subgoal>heat the apple</subgoal><action>look</action>"],
]


def token_trajectories(tokenizer):
    """Two episodes of real tokenised responses with their spans; the first turn's leading
    token is marked as forced by the grammar (an allowed set of one id)."""
    from hiper_jax.agent.grammar import SET
    from hiper_jax.agent.spans import TokenBytes, response_spans

    table = TokenBytes(tokenizer)
    trajectories = []
    for b, responses in enumerate(RESPONSES):
        turns = []
        for t, text in enumerate(responses):
            ids = np.asarray(tokenizer.encode(text, add_special_tokens=False), np.int32)
            turn = _turn(switch="SWITCH" in text)
            turn.response_ids, turn.response_logp = ids, np.zeros(len(ids), np.float32)
            turn.spans = response_spans(ids, table)
            turn.response_text = text
            turn.subgoal = text.split("<subgoal>")[1].split("</subgoal>")[0]
            if (b, t) == (0, 0):
                turn.allowed_mode = np.zeros(len(ids), np.int8)
                turn.allowed_ids = np.full((len(ids), 2), -1, np.int32)
                turn.allowed_mode[:2] = SET
                turn.allowed_ids[0, 0] = ids[0]              # one allowed id: forced
                turn.allowed_ids[1, :2] = [ids[1], ids[1] + 1]  # two: a choice
            turns.append(turn)
        trajectories.append(Trajectory(turns, task="heat an apple", task_type="heat", won=b == 0, game=f"g{b}"))
    return trajectories, table


def hae_like_output(rng, boundary):
    from hiper_jax.hae import HAEOutput

    shape = boundary.shape
    fields = {name: rng.normal(size=shape).astype(np.float32) for name in ("adv_low", "adv_high", "adv_term")}
    fields["adv_high"] = np.where(boundary, fields["adv_high"], 0.0).astype(np.float32)
    zeros = np.zeros(shape, np.float32)
    return HAEOutput(ret_low=zeros, ret_high=zeros, ret_term=zeros, boundary=boundary, **fields)


def test_token_advantages_follow_the_update_assignment(tiny_tokenizer):
    from hiper_jax.eval import token_advantages

    trajectories, table = token_trajectories(tiny_tokenizer)
    boundary = np.array([[True, False, True], [True, False, False]])
    out = hae_like_output(np.random.default_rng(3), boundary)
    tokens = token_advantages(trajectories, table, out)
    assert [len(turns) for turns in tokens] == [3, 1]
    for b, traj in enumerate(trajectories):
        for t, turn in enumerate(traj.turns):
            item = tokens[b][t]
            assert "".join(item["text"]) == turn.response_text
            assert len(item["block"]) == len(item["adv"]) == len(turn.response_ids)
            for k, block in enumerate(item["block"]):
                expected_block = ("switch" if turn.spans.switch[k] else "subgoal" if turn.spans.subgoal[k]
                                  else "action" if turn.spans.action[k] else "")
                assert block == expected_block
                expected = {"action": out.adv_low[b, t], "switch": out.adv_term[b, t],
                            "subgoal": out.adv_high[b, t] if boundary[b, t] else 0.0, "": 0.0}[block]
                assert item["adv"][k] == pytest.approx(float(expected), abs=1e-5)
            assert {"switch", "subgoal", "action"} <= set(item["block"])
    assert tokens[0][0]["forced"][:2] == [True, False] and not any(tokens[0][0]["forced"][2:])
    assert not any(f for turns in tokens[1:] for item in turns for f in item["forced"])
    assert all("adv" not in item for turns in token_advantages(trajectories, table) for item in turns)


def test_records_with_tokens_round_trip(tiny_tokenizer, tmp_path):
    from hiper_jax.eval import per_turn_advantages, read_episodes, token_advantages

    trajectories, table = token_trajectories(tiny_tokenizer)
    boundary = np.array([[True, False, True], [True, False, False]])
    out = hae_like_output(np.random.default_rng(4), boundary)
    records = episode_records(trajectories, [0], [5, 6], per_turn_advantages(out), None, out.boundary,
                              token_advantages(trajectories, table, out))
    assert [t["segment_start"] for t in records[0]["turns"]] == [True, False, True]
    assert records[0]["turns"][1]["adv"][1] == 0.0  # A_high only at segment starts
    path = tmp_path / "episodes.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert read_episodes(str(path)) == read_episodes(str(tmp_path)) == json.loads(json.dumps(records))
