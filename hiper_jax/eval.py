"""Evaluate a checkpoint on a split: a table with intervals, every transcript, an HTML page.

    python -m hiper_jax.eval --checkpoint runs/alfworld_tiny            # a run directory
    python -m hiper_jax.eval --checkpoint hiper_jax/assets/tiny_alfworld \\
        --config configs/alfworld_tiny.py --split official:valid_unseen --seeds=0,1,2

``--checkpoint`` is an HF checkpoint directory (``config.json`` + safetensors; ``--config``
names the run settings) or a run directory of ``python -m hiper_jax.train`` (its
``config.json`` and its newest orbax checkpoint; ``--config`` replaces that config). The
defaults follow HiPER's protocol: 128 episodes at temperature 0.4.

Episodes are played by the trainer's own machinery (:class:`~hiper_jax.train.trainer.Trainer`
set-up, its collector and policy, :meth:`~hiper_jax.train.trainer.Trainer.play_tasks`), so the
prompts, sampling settings (constrained decoding included) and env settings are the training
run's. The split's tasks are taken in a fixed shuffled order (the same for every seed) and
repeated when ``--episodes`` exceeds them; each seed replays them with its own sampling key.

Outputs in ``--out`` (default ``<run dir>/eval/<split>``, or ``runs/eval/<checkpoint name>/<split>``):
``table.md`` (printed too), ``summary.json``, ``episodes.jsonl`` (one transcript per line) and
``transcripts.html`` (self-contained; with a run directory it shows each turn's advantages
under the run's estimator, its critic and the episode groups "same task").
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import os
import sys
from collections import defaultdict
from typing import Any, Optional, Sequence

import numpy as np

SPLITS = ("eval", "train", "official:valid_seen", "official:valid_unseen", "official:train")
Z_95 = 1.959963984540054  # two-sided 95% normal quantile
INTERVAL = "Wilson score interval, 95%"


# --- statistics ------------------------------------------------------------------------------


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``successes / trials``.

    ``(p + z^2/2n -/+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)``: unlike the normal
    approximation it stays inside [0, 1] and keeps its coverage near 0% and 100% success.
    Returns ``(nan, nan)`` for no trials.
    """
    if trials <= 0:
        return float("nan"), float("nan")
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must be in [0, {trials}], got {successes}")
    p = successes / trials
    z2 = z * z
    centre = (p + z2 / (2 * trials)) / (1 + z2 / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials)) / (1 + z2 / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def summarize(trajectories: Sequence, seeds: Sequence[int]) -> dict[str, Any]:
    """Rows of the result table: all episodes, then each task type.

    ``trajectories`` are grouped by seed in order (``len(trajectories)`` is a multiple of
    ``len(seeds)``). Each row: episodes, successes, success, Wilson 95% bounds, mean turns,
    invalid rate, switch rate (from :func:`hiper_jax.rollout.metrics.rollout_metrics`).
    """
    from hiper_jax.rollout.metrics import rollout_metrics

    def row(name: str, group: Sequence) -> dict[str, Any]:
        metrics = rollout_metrics(group)
        wins = int(sum(t.won for t in group))
        low, high = wilson_interval(wins, len(group))
        return {"task_type": name, "episodes": len(group), "successes": wins,
                "success": metrics["success"], "ci_low": low, "ci_high": high,
                "mean_turns": metrics["mean_turns"], "invalid_rate": metrics["invalid_rate"],
                "switch_rate": metrics["switch_rate"]}

    by_type = defaultdict(list)
    for traj in trajectories:
        by_type[traj.task_type or "unknown"].append(traj)
    per_seed = len(trajectories) // max(len(seeds), 1)
    seed_success = {int(s): float(np.mean([t.won for t in trajectories[k * per_seed:(k + 1) * per_seed]]))
                    for k, s in enumerate(seeds)}
    return {"rows": [row("all", trajectories)] + [row(t, g) for t, g in sorted(by_type.items())],
            "success_per_seed": seed_success, "interval": INTERVAL}


def format_table(summary: dict[str, Any], title: str) -> str:
    """The summary as a Markdown table (success, interval, turns, invalid and switch rates)."""
    lines = [f"### {title}", "",
             "| task type | episodes | success (%) | 95% CI (%) | mean turns | invalid (%) | switch (%) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in summary["rows"]:
        lines.append(f"| {r['task_type']} | {r['episodes']} | {100 * r['success']:.1f} | "
                     f"[{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}] | {r['mean_turns']:.1f} | "
                     f"{100 * r['invalid_rate']:.1f} | {100 * r['switch_rate']:.1f} |")
    seeds = ", ".join(f"seed {s}: {100 * v:.1f}%" for s, v in summary["success_per_seed"].items())
    lines += ["", f"Interval: {summary['interval']} over all episodes (pooled over seeds). "
                  f"Success per seed: {seeds}. Invalid: per turn; switch: SWITCH per turn after the first."]
    return "\n".join(lines)


# --- checkpoint, config and split ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Source:
    """What ``--checkpoint`` names: ``kind`` "hf" (an HF checkpoint directory) or "run" (a run
    directory with ``config.json`` and ``checkpoints/``)."""

    kind: str
    path: str


def resolve_checkpoint(path: str) -> Source:
    """Classifies ``path``; raises FileNotFoundError/ValueError with a one-line reason."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--checkpoint {path}: no such directory")
    checkpoints = os.path.join(path, "checkpoints")
    if os.path.isdir(checkpoints):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"--checkpoint {path}: a run directory needs its config.json")
        if not any(name.isdigit() for name in os.listdir(checkpoints)):
            raise FileNotFoundError(f"--checkpoint {path}: no orbax checkpoint in {checkpoints}")
        return Source("run", path)
    files = os.listdir(path)
    if "config.json" in files and any(f.endswith(".safetensors") or f.endswith(".safetensors.index.json")
                                      for f in files):
        return Source("hf", path)
    raise ValueError(f"--checkpoint {path}: neither an HF checkpoint directory (config.json + "
                     "*.safetensors) nor a run directory (config.json + checkpoints/)")


def load_run_config(run_dir: str):
    """The run's ``config.json`` over :func:`~hiper_jax.train.config.base_config` (so keys
    added since the run have their defaults)."""
    from hiper_jax.train.config import base_config

    with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as handle:
        saved = json.load(handle)
    config = base_config()
    config.update(saved)
    return config


def eval_config(config, source: Source, split: str, out_dir: str):
    """A copy of ``config`` set up for evaluation into ``out_dir``: the HF checkpoint as the
    model, the run's games when it generated them; when games are generated, one game for each
    split not evaluated (the trainer's set-up wants both; a generated game depends only on the
    seed, the split and its index, not on the count)."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        if source.kind == "hf":
            config.model.checkpoint = source.path
        run_games = os.path.join(source.path, "games")
        if source.kind == "run" and not config.env.games_dir and os.path.isdir(run_games):
            config.env.games_dir = run_games
        if not config.env.games_dir:
            if split != "train":
                config.env.num_train_games = 1
            if split != "eval":
                config.env.num_eval_games = 1
        config.train.out_dir = out_dir
        config.train.resume = False
        config.train.tensorboard = False
        config.train.wandb_project = ""
    return config


def resolve_split(config, split: str):
    """``None`` for the config's own ``eval``/``train`` split, else ``(EnvSpec, num_tasks)``
    of an official ALFWorld split. Raises ValueError naming the known splits."""
    if split in ("eval", "train"):
        return None
    if split not in SPLITS:
        raise ValueError(f"--split {split!r}: unknown; known splits: {', '.join(SPLITS)}")
    if config.env.name != "alfworld":
        raise ValueError(f"--split {split!r}: official splits are ALFWorld's; this config's env is "
                         f"{config.env.name!r} (use eval or train)")
    from hiper_envs.alfworld.games import official_games

    from hiper_jax.rollout.collector import EnvSpec

    try:
        games = official_games(split.split(":", 1)[1])
    except (ValueError, FileNotFoundError) as error:
        raise type(error)(f"--split {split!r}: {error}") from None
    if not games:
        raise ValueError(f"--split {split!r}: no playable games found")
    kwargs = dict(config.env.env_kwargs.to_dict() if hasattr(config.env.env_kwargs, "to_dict")
                  else config.env.env_kwargs)
    kwargs.update(success_reward=config.env.success_reward, games=split)
    return EnvSpec("hiper_envs:hiper/ALFWorld-v0", kwargs, "game"), len(games)


def episode_tasks(num_tasks: int, episodes: int) -> list[int]:
    """``episodes`` task indices: a fixed shuffle of all tasks, repeated as needed."""
    order = np.random.default_rng(0).permutation(num_tasks)
    return [int(order[i % num_tasks]) for i in range(episodes)]


# --- transcripts -----------------------------------------------------------------------------


def regroup_by_task(trajectories: Sequence, tasks: Sequence[int]) -> list:
    """Copies whose ``group_id`` is shared by the episodes of the same task (for the group
    estimators), numbered in ``[0, B)``."""
    first: dict[int, int] = {}
    return [dataclasses.replace(t, group_id=first.setdefault(task, len(first)))
            for t, task in zip(trajectories, tasks)]


def estimator_output(trainer, trajectories: Sequence):
    """The trainer's estimator output for ``trajectories`` under its critic, from the trainer's
    own batch building (:func:`~hiper_jax.train.trainer.build_ppo_batch`): an
    :class:`~hiper_jax.hae.HAEOutput`-shaped tuple of NumPy ``[B, T]`` arrays (``adv_low``,
    ``adv_high``, ``adv_term``, ``boundary`` = segment starts, ...)."""
    import jax

    from hiper_jax.train.trainer import build_ppo_batch

    text_mask = trainer.grammar.text_mask if trainer.grammar is not None else None
    _, _, out, _ = build_ppo_batch(list(trajectories), trainer.full_state(), trainer.ref_params,
                                   trainer.model_config, trainer.config, trainer.hae_cfg,
                                   trainer.pad_id, mesh=trainer.mesh, text_mask=text_mask)
    return jax.tree.map(np.asarray, out)


def per_turn_advantages(out) -> np.ndarray:
    """``[B, T, 3]`` per-turn advantages from an estimator output: low (action), high (subgoal;
    0 off segment starts), term (switch)."""
    high = np.where(np.asarray(out.boundary), np.asarray(out.adv_high), 0.0)
    return np.stack([np.asarray(out.adv_low), high, np.asarray(out.adv_term)], axis=-1)


def turn_advantages(trainer, trajectories: Sequence) -> np.ndarray:
    """``[B, T, 3]`` per-turn advantages (low/action, high/subgoal at segment starts else 0,
    term/switch) of the trajectories under the trainer's estimator and critic, from the
    trainer's own batch building."""
    return per_turn_advantages(estimator_output(trainer, trajectories))


BLOCKS = ("switch", "subgoal", "action")


def token_advantages(trajectories: Sequence, token_bytes, out=None) -> list[list[dict]]:
    """Each turn's response tokens, their block and the advantage the update gives them.

    The assignment is :func:`hiper_jax.hae.assign_token_advantages`, the one the batch builder
    uses: action tokens get A_low, subgoal tokens of segment starts A_high, switch tokens A_term,
    all other tokens 0.

    Args:
      trajectories: ``B`` episodes (their turns' ``response_ids`` and ``spans``).
      token_bytes: the tokenizer's :class:`~hiper_jax.agent.spans.TokenBytes` table.
      out: the estimator output for these trajectories (:func:`estimator_output`), fields
        ``[B, T]``; None gives no ``adv``.
    Returns:
      ``[b][t]`` dicts over the turn's ``R`` response tokens: ``text`` (``R`` strings, invalid
      UTF-8 replaced), ``block`` (``R`` of ``"switch"``/``"subgoal"``/``"action"``/``""``),
      ``forced`` (``R`` bools: the grammar allowed only this token, so it carries no gradient)
      and, with ``out``, ``adv`` (``R`` floats).
    """
    from hiper_jax.agent.grammar import forced_tokens

    rows = [(b, t, turn) for b, traj in enumerate(trajectories) for t, turn in enumerate(traj.turns)]
    width = max((len(turn.response_ids) for _, _, turn in rows), default=1) or 1
    masks = np.zeros((3, len(rows), width), bool)   # [block, N, R]: switch, subgoal, action
    for n, (_, _, turn) in enumerate(rows):
        length = len(turn.response_ids)
        for k, name in enumerate(BLOCKS):
            masks[k, n, :length] = getattr(turn.spans, name)
    adv = None
    if out is not None and rows:
        from hiper_jax.hae import assign_token_advantages

        index = np.array([(b, t) for b, t, _ in rows], np.int32)
        adv = np.asarray(assign_token_advantages(out, index[:, 0], index[:, 1], masks[2], masks[1],
                                                 masks[0]))
    result: list[list[dict]] = [[] for _ in trajectories]
    for n, (b, _, turn) in enumerate(rows):
        length = len(turn.response_ids)
        block = np.full(length, "", object)
        for k, name in enumerate(BLOCKS):
            block[masks[k, n, :length]] = name
        forced = (forced_tokens(turn.allowed_mode, turn.allowed_ids) if turn.allowed_mode is not None
                  else np.zeros(length, bool))
        item = {"text": [token_bytes.pieces[int(i)].decode("utf-8", errors="replace")
                         for i in turn.response_ids],
                "block": [str(x) for x in block], "forced": [bool(x) for x in forced]}
        if adv is not None:
            item["adv"] = [round(float(x), 5) for x in adv[n, :length]]
        result[b].append(item)
    return result


def read_episodes(path: str) -> list[dict]:
    """The transcripts of an ``episodes.jsonl`` written by :func:`evaluate_checkpoint` (a file
    or the evaluation's output directory)."""
    if os.path.isdir(path):
        path = os.path.join(path, "episodes.jsonl")
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def episode_records(trajectories: Sequence, seeds: Sequence[int], tasks: Sequence[int],
                    advantages: Optional[np.ndarray] = None, tokenizer=None,
                    segment_starts: Optional[np.ndarray] = None,
                    tokens: Optional[list[list[dict]]] = None) -> list[dict]:
    """One JSON-able transcript per episode (prompt text when ``tokenizer`` is given; the
    per-turn advantages ``adv = [low, high, term]`` when ``advantages`` ``[B, T, 3]`` is;
    ``segment_start`` when ``segment_starts`` ``[B, T]`` is; each turn's ``tokens`` (see
    :func:`token_advantages`) when ``tokens`` is)."""
    records = []
    per_seed = len(tasks)
    for b, traj in enumerate(trajectories):
        turns = []
        for t, turn in enumerate(traj.turns):
            item = {"turn": t, "observation": turn.view.observation if turn.view is not None else "",
                    "response": turn.response_text,
                    "switch": bool(turn.switch), "subgoal": turn.subgoal, "action": turn.action,
                    "reward": float(turn.reward), "done": bool(turn.done), "truncated": bool(turn.truncated),
                    "invalid": bool(turn.invalid), "format_valid": bool(turn.format_valid)}
            if tokenizer is not None:
                item["prompt"] = tokenizer.decode(list(turn.prompt_ids))
            if advantages is not None:
                item["adv"] = [round(float(x), 5) for x in advantages[b, t]]
            if segment_starts is not None:
                item["segment_start"] = bool(segment_starts[b, t])
            if tokens is not None:
                item["tokens"] = tokens[b][t]
            turns.append(item)
        records.append({"seed": int(seeds[b // per_seed]), "episode": b % per_seed,
                        "task_index": int(tasks[b % per_seed]), "game": traj.game, "task": traj.task,
                        "task_type": traj.task_type, "won": bool(traj.won), "num_turns": traj.num_turns,
                        "return": float(sum(turn.reward for turn in traj.turns)), "turns": turns})
    return records


_CSS = """
body{font:13px/1.35 system-ui,sans-serif;margin:16px;color:#222;background:#fafafa}
h1{font-size:18px;margin:0 0 8px}table{border-collapse:collapse}
.summary td,.summary th{border:1px solid #ccc;padding:2px 8px;text-align:right}
.summary td:first-child,.summary th:first-child{text-align:left}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(420px,1fr));gap:12px;margin-top:12px}
.card{background:#fff;border:1px solid #ccc;border-radius:6px;padding:8px;overflow:hidden}
.card.won{border-top:4px solid #2a8a3a}.card.lost{border-top:4px solid #b33}
.head{font-weight:600;margin-bottom:4px}.meta{color:#666;margin-bottom:6px}
.turns td,.turns th{border-bottom:1px solid #eee;padding:2px 4px;vertical-align:top}
.turns th{text-align:left;color:#555;font-weight:600}
.obs{color:#555;max-width:150px;overflow-wrap:anywhere}.act{font-family:monospace}
.bad{color:#b33}.sw{font-weight:700;color:#1a5fb4}.num{text-align:right;font-family:monospace}
details pre{white-space:pre-wrap;margin:2px 0;font-size:11px;background:#f4f4f4;padding:4px}
.legend{color:#555;margin:6px 0}
"""


def _adv_cell(value: float, scale: float) -> str:
    alpha = min(abs(value) / scale, 1.0) if scale > 0 else 0.0
    colour = f"rgba(42,138,58,{alpha:.2f})" if value >= 0 else f"rgba(187,51,51,{alpha:.2f})"
    return f'<td class="num" style="background:{colour}">{value:+.2f}</td>'


def render_html(records: Sequence[dict], summary: dict[str, Any], title: str,
                max_episodes: int = 48) -> str:
    """A self-contained page (inline CSS, no scripts): the summary table, then the first
    ``max_episodes`` transcripts (0 = all) as cards side by side, sorted by task so the
    episodes of one task sit next to each other; per-turn advantages when recorded."""
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(r['task_type'])}</td><td>{r['episodes']}</td><td>{100 * r['success']:.1f}</td>"
        f"<td>[{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]</td><td>{r['mean_turns']:.1f}</td>"
        f"<td>{100 * r['invalid_rate']:.1f}</td><td>{100 * r['switch_rate']:.1f}</td></tr>"
        for r in summary["rows"])
    shown = list(records) if max_episodes <= 0 else list(records)[:max_episodes]
    shown.sort(key=lambda r: (r["task_index"], r["seed"], r["episode"]))
    with_adv = any("adv" in turn for r in shown for turn in r["turns"])
    scale = max((abs(a) for r in shown for turn in r["turns"] for a in turn.get("adv", ())), default=1.0)
    cards = []
    for r in shown:
        head = ("<tr><th>#</th><th>observation</th><th>S</th><th>subgoal / action</th><th>r</th>"
                + ("<th>A low</th><th>A high</th><th>A term</th>" if with_adv else "") + "</tr>")
        body = []
        for turn in r["turns"]:
            action_class = "act bad" if turn["invalid"] else "act"
            switch = '<span class="sw">S</span>' if turn["switch"] else "K"
            observation = turn["observation"]
            short = observation if len(observation) <= 120 else observation[:117] + "..."
            prompt = (f"<details><summary>prompt</summary><pre>{esc(turn['prompt'])}</pre></details>"
                      if "prompt" in turn else "")
            body.append(
                f"<tr><td>{turn['turn']}</td><td class=\"obs\" title=\"{esc(observation)}\">{esc(short)}</td>"
                f"<td>{switch}</td><td>{esc(turn['subgoal'] or '')}<br><span class=\"{action_class}\">"
                f"{esc(turn['action'])}</span><details><summary>response</summary>"
                f"<pre>{esc(turn['response'])}</pre></details>{prompt}</td>"
                f"<td class=\"num\">{turn['reward']:g}</td>"
                + ("".join(_adv_cell(a, scale) for a in turn["adv"]) if with_adv else "") + "</tr>")
        outcome = "won" if r["won"] else "lost"
        cards.append(
            f'<div class="card {outcome}"><div class="head">{esc(r["task"])}</div>'
            f'<div class="meta">{esc(r["task_type"])} · task {r["task_index"]} · seed {r["seed"]} · '
            f'{outcome} in {r["num_turns"]} turns · return {r["return"]:g}</div>'
            f'<table class="turns">{head}{"".join(body)}</table></div>')
    legend = ("S: SWITCH (K: KEEP); red actions were invalid. "
              + (f"Advantages: A low on action tokens, A high on the subgoal tokens of segment starts, "
                 f"A term on switch tokens; colour scale ±{scale:.2f}." if with_adv else
                 "Per-turn advantages are shown when a run directory is evaluated."))
    more = f" (first {len(shown)} of {len(records)} episodes)" if len(shown) < len(records) else ""
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{esc(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{esc(title)}</h1>"
            f"<table class=\"summary\"><tr><th>task type</th><th>episodes</th><th>success %</th>"
            f"<th>95% CI (Wilson)</th><th>mean turns</th><th>invalid %</th><th>switch %</th></tr>{rows}"
            f"</table><div class=\"legend\">{esc(legend)}{esc(more)}</div>"
            f"<div class=\"grid\">{''.join(cards)}</div></body></html>")


# --- the command -----------------------------------------------------------------------------


@dataclasses.dataclass
class EvalResult:
    """What :func:`evaluate_checkpoint` wrote (paths) and computed."""

    summary: dict[str, Any]
    table: str
    out_dir: str
    records: list[dict]


def default_out_dir(source: Source, split: str) -> str:
    name = split.replace(":", "_")
    if source.kind == "run":
        return os.path.join(source.path, "eval", name)
    return os.path.join("runs", "eval", os.path.basename(os.path.normpath(source.path)), name)


def prepare(checkpoint: str, config=None, split: str = "eval", out_dir: Optional[str] = None):
    """Checks everything that can be checked before the model loads; returns ``(source,
    config for the trainer, split resolution)``. Errors are one-line ValueError /
    FileNotFoundError messages."""
    from hiper_jax.train import config as config_lib

    source = resolve_checkpoint(checkpoint)
    if config is None:
        if source.kind == "hf":
            raise ValueError("--config is required with an HF checkpoint directory (it names the env, "
                             "prompt and sampling settings)")
        config = load_run_config(source.path)
    official = resolve_split(config, split)
    config = eval_config(config, source, split, out_dir or default_out_dir(source, split))
    config_lib.validate(config)
    return source, config, official


def evaluate_checkpoint(checkpoint: str, config=None, split: str = "eval", episodes: int = 128,
                        temperature: float = 0.4, seeds: Sequence[int] = (0,),
                        out_dir: Optional[str] = None, prompts: bool = False, html_episodes: int = 48,
                        progress: bool = True, tokens: bool = False) -> EvalResult:
    """Plays ``episodes`` episodes per seed of ``split`` with the checkpoint's policy and writes
    ``table.md``, ``summary.json``, ``episodes.jsonl`` and ``transcripts.html`` into ``out_dir``.

    Args:
      checkpoint: an HF checkpoint directory or a run directory (see the module docstring).
      config: the run config (``ml_collections``); None for a run directory's own.
      split: ``eval``, ``train``, ``official:valid_seen`` or ``official:valid_unseen``.
      episodes: episodes per seed.  temperature: sampling temperature (0 = greedy).
      seeds: sampling seeds; each replays the same tasks.
      prompts: also store each turn's prompt text (large).
      html_episodes: transcripts on the HTML page (0 = all).
      tokens: also store each turn's response tokens with their block and, for a run
        directory, the advantage each gets (:func:`token_advantages`).
    """
    import jax

    from hiper_jax.train.trainer import Trainer

    if episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {episodes}")
    if temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if not seeds:
        raise ValueError("--seeds must name at least one seed")
    source, config, official = prepare(checkpoint, config, split, out_dir)
    trainer = Trainer(config, progress=progress)
    iteration = None
    if source.kind == "run":
        iteration = trainer.restore(os.path.join(source.path, "checkpoints"))
    if official is None:
        spec, num_tasks = trainer.data[split], trainer.data[f"num_{split}_tasks"]
    else:
        spec, num_tasks = official
    tasks = episode_tasks(num_tasks, episodes)
    trajectories = []
    for seed in seeds:
        trajectories += trainer.play_tasks(spec, tasks, jax.random.key(int(seed)), temperature,
                                           progress=progress)
    trajectories = regroup_by_task(trajectories, tasks * len(seeds))
    estimate = estimator_output(trainer, trajectories) if source.kind == "run" else None
    advantages = per_turn_advantages(estimate) if estimate is not None else None
    token_lists = token_advantages(trajectories, trainer.token_bytes, estimate) if tokens else None
    summary = summarize(trajectories, seeds)
    summary.update(checkpoint=os.path.abspath(checkpoint), kind=source.kind, split=split,
                   episodes_per_seed=episodes, seeds=[int(s) for s in seeds], temperature=temperature,
                   num_tasks=num_tasks, iteration=iteration, estimator=config.advantage.estimator)
    where = f"{source.path}" + (f" (iteration {iteration})" if iteration is not None else "")
    title = (f"{where} on {split}: {episodes} episodes x {len(seeds)} seed(s), temperature {temperature:g}")
    table = format_table(summary, title)
    records = episode_records(trajectories, seeds, tasks, advantages, trainer.tokenizer if prompts else None,
                              estimate.boundary if estimate is not None else None, token_lists)
    out = config.train.out_dir
    with open(os.path.join(out, "table.md"), "w", encoding="utf-8") as handle:
        handle.write(table + "\n")
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
    with open(os.path.join(out, "episodes.jsonl"), "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    with open(os.path.join(out, "transcripts.html"), "w", encoding="utf-8") as handle:
        handle.write(render_html(records, summary, title, html_episodes))
    return EvalResult(summary, table, out, records)


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    flags.DEFINE_string("checkpoint", None, "HF checkpoint directory or run directory", required=True)
    flags.DEFINE_string("split", "eval", f"one of {', '.join(SPLITS)}")
    flags.DEFINE_integer("episodes", 128, "episodes per seed")
    flags.DEFINE_float("temperature", 0.4, "sampling temperature (0 = greedy)")
    flags.DEFINE_list("seeds", ["0"], "comma-separated sampling seeds")
    flags.DEFINE_string("out", None, "output directory (default: beside the checkpoint)")
    flags.DEFINE_bool("prompts", False, "store each turn's prompt text in episodes.jsonl")
    flags.DEFINE_integer("html_episodes", 48, "transcripts on the HTML page (0 = all)")
    flags.DEFINE_bool("tokens", False, "store each turn's response tokens with their block and "
                      "(run directory) advantage in episodes.jsonl")
    return config_flags.DEFINE_config_file(
        "config", None, "config file (configs/*.py, overridable with --config.FIELD=VALUE); "
        "default: the run directory's config.json", lock_config=False)


def _main(argv, config_flag) -> None:
    from absl import flags, logging

    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {' '.join(argv[1:])} (seeds go as --seeds=0,1,2)")
    logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
    values = flags.FLAGS
    try:
        seeds = [int(s) for s in values.seeds]
        prepare(values.checkpoint, config_flag.value, values.split, values.out)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    result = evaluate_checkpoint(values.checkpoint, config_flag.value, values.split, values.episodes,
                                 values.temperature, seeds, values.out, values.prompts,
                                 values.html_episodes, tokens=values.tokens)
    print("\n" + result.table)
    print(f"\nwritten to {result.out_dir}: table.md, summary.json, episodes.jsonl, transcripts.html")


def main() -> None:
    from absl import app

    config_flag = _define_flags()
    app.run(lambda argv: _main(argv, config_flag))


if __name__ == "__main__":
    main()
