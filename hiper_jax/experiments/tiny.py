"""The embedded default: a tiny Qwen2-architecture model and a BPE tokenizer trained on env text.

The shipped checkpoint (``hiper_jax/assets/tiny_alfworld``) is made by this module::

    python -m hiper_jax.experiments.tiny --out hiper_jax/assets/tiny_alfworld --work-dir build/tiny

which generates ALFWorld games of all six task types in scenes that vary, writes expert
demonstrations (with the task's subgoals), trains the tokenizer on the prompts and responses the
agent will see (plus WebShop text, so one tokenizer serves both envs), initialises the model from
a seed and warm-starts it: round 0 is supervised fine-tuning on the demonstrations
(:mod:`hiper_jax.train.sft`, targets in the grammar's tokenisation); each DAgger round then plays
the model on training games under the Plan-Execute constraint, has the expert label every state
it reached and fine-tunes on everything so far (:mod:`hiper_jax.train.dagger`). Every round is
evaluated on held-out games with and without the constraint (``rounds.jsonl`` in the work
directory, ``build_summary.json`` next to the checkpoint), and the build resumes from the rounds
already in its work directory. Weights are stored in bfloat16 to keep the repository small; the
trainer loads them as float32 master weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from hiper_jax.agent.demos import demo_turns, read_demos
from hiper_jax.agent.prompts import PromptConfig, build_messages
from hiper_jax.assets import ASSETS, TINY_ALFWORLD  # noqa: F401 (re-exported)
from hiper_jax.models import qwen2
from hiper_jax.tokenization import train_byte_level_bpe


def tiny_model_config(vocab_size: int, hidden_size: int = 96, num_layers: int = 3,
                      intermediate_size: int = 256) -> qwen2.Qwen2Config:
    """The tiny architecture: 4 query heads, 2 KV heads, tied embeddings."""
    return qwen2.Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, rope_theta=10_000.0, tie_word_embeddings=True)


def training_texts(demos: list[dict], prompt_cfgs: list[PromptConfig]) -> list[str]:
    """Prompt and response texts of every demonstration turn, in each prompt style."""
    texts = []
    for cfg in prompt_cfgs:
        for turn in demo_turns(demos, cfg, only_won=False):
            system, user = build_messages(turn.view, cfg)
            texts.append(f"{system['content']}\n{user['content']}\n{turn.response}")
    return texts


def webshop_texts(num_goals: int = 200) -> list[str]:
    """Oracle-episode prompts of a small generated WebShop catalog (for tokenizer coverage)."""
    from hiper_envs.webshop.demos import write_demonstrations
    from hiper_envs.webshop.env import WebShopEnv

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "webshop_demos.jsonl")
        write_demonstrations(WebShopEnv(num_products=1000, split="train"), path, episodes=num_goals,
                             progress=False)
        demos = read_demos(path)
    return training_texts(demos, [PromptConfig(env="webshop", max_steps=15),
                                  PromptConfig(env="webshop", style="flat", max_steps=15)])


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How the tiny checkpoint is made (every field is a command-line flag).

    Games: ``num_games`` training games (expert demonstrations, DAgger states) and
    ``num_eval_games`` held-out games (the per-round table), all six task types by default, in
    scenes of at most ``max_receptacles`` receptacles and ``max_distractors`` other object
    types. Round 0 fine-tunes on the demonstrations for ``epochs``; each of the ``rounds``
    DAgger rounds plays the model on ``dagger_games`` training games (constrained, at
    ``dagger_temperature``), adds the expert's labels of every state it reached and trains
    ``round_epochs`` more on everything so far. ``ship_round`` is the round written to the
    output directory; every round is evaluated on the held-out games. A build resumes: rounds
    whose checkpoint and states are complete in the work directory are loaded, not redone.
    """

    num_games: int = 600
    num_eval_games: int = 48
    task_types: tuple[str, ...] = ()  # () = all six
    max_receptacles: int = 5
    max_distractors: int = 2
    subgoals: bool = True  # the env names the task's subgoals (the planner chooses among them)
    max_steps: int = 30
    vocab_size: int = 1024
    hidden_size: int = 96
    num_layers: int = 3
    intermediate_size: int = 256
    epochs: int = 3
    lr: float = 3e-3
    rounds: int = 2
    dagger_games: int = 200
    dagger_temperature: float = 1.0
    round_epochs: int = 1
    round_lr: float = 1e-3
    ship_round: int = -1  # -1 = the last
    eval_temperature: float = 0.4
    max_text_tokens: int = 24
    max_new_tokens: int = 48
    history_turns: int = 2
    max_prompt_tokens: int = 512
    seed: int = 0

    def command(self, out_dir: str) -> str:
        """The command line that makes this recipe."""
        flags = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "task_types":
                if value:
                    flags.append("--task-types " + " ".join(value))
                continue
            flags.append(f"--{field.name.replace('_', '-')} {value}")
        return f"python -m hiper_jax.experiments.tiny --out {out_dir} " + " ".join(flags)


def _rounded(params):
    """Parameters as they are shipped (bfloat16), back in float32."""
    return jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)


def build(out_dir: str, work_dir: str, recipe: Recipe = Recipe(), progress: bool = True) -> dict:
    """Makes the tiny checkpoint in ``out_dir`` (see the module docstring); returns a summary
    with the per-round table. ``work_dir`` keeps the games, demonstrations, every round's
    checkpoint and ``rounds.jsonl``."""
    from transformers import AutoTokenizer

    from hiper_envs.alfworld.demos import write_demos
    from hiper_envs.alfworld.games import find_games
    from hiper_envs.alfworld.generate import TASK_TYPES, GeneratorConfig, generate_games
    from hiper_jax.agent.grammar import ResponseGrammar
    from hiper_jax.agent.spans import TokenBytes
    from hiper_jax.rollout.collector import EnvSpec
    from hiper_jax.rollout.metrics import rollout_metrics
    from hiper_jax.sampling import SamplingConfig
    from hiper_jax.train.dagger import EXPERT_KEYS, agreement, expert_turns, play
    from hiper_jax.train.sft import SFTConfig, make_examples, train_sft

    start = time.perf_counter()
    task_types = tuple(recipe.task_types) or TASK_TYPES
    games = os.path.join(work_dir, "games")
    demos_path = os.path.join(work_dir, "demos.jsonl")
    scenes = GeneratorConfig(max_receptacles=recipe.max_receptacles, max_distractors=recipe.max_distractors)
    if not os.path.exists(demos_path):
        generate_games(games, recipe.num_games, seed=recipe.seed + 1000, task_types=task_types,
                       config=scenes, workers=2, progress=progress)
        generate_games(games, recipe.num_eval_games, seed=recipe.seed + 1000, task_types=task_types,
                       split="eval", config=scenes, workers=2, progress=progress)
        write_demos(os.path.join(games, "train"), demos_path, workers=2, progress=progress)
    demos = read_demos(demos_path)
    prompt_cfg = PromptConfig(env="alfworld", history_turns=recipe.history_turns,
                              max_prompt_tokens=recipe.max_prompt_tokens, max_steps=recipe.max_steps)
    if _finished_rounds(work_dir) and os.path.exists(os.path.join(out_dir, "tokenizer.json")):
        tokenizer = AutoTokenizer.from_pretrained(out_dir)  # resuming: the rounds' own tokenizer
    else:
        texts = training_texts(demos, [prompt_cfg, dataclasses.replace(prompt_cfg, style="flat")])
        texts += webshop_texts()
        tokenizer = train_byte_level_bpe(texts, vocab_size=recipe.vocab_size)
        os.makedirs(out_dir, exist_ok=True)
        tokenizer.save_pretrained(out_dir)
        tokenizer = AutoTokenizer.from_pretrained(out_dir)

    config = tiny_model_config(len(tokenizer), recipe.hidden_size, recipe.num_layers, recipe.intermediate_size)
    config = dataclasses.replace(config, eos_token_id=tokenizer.eos_token_id)
    token_bytes = TokenBytes(tokenizer, vocab_size=config.vocab_size)
    grammar = ResponseGrammar(tokenizer, token_bytes, "plan_execute", tokenizer.eos_token_id,
                              recipe.max_text_tokens)
    params = qwen2.init_params(jax.random.key(recipe.seed), config)
    examples = make_examples(list(demo_turns(demos, prompt_cfg, subgoals=recipe.subgoals)), tokenizer,
                             prompt_cfg, grammar)
    num_train = len(find_games(os.path.join(games, "train")))
    num_eval = len(find_games(os.path.join(games, "eval")))
    train_spec = EnvSpec("hiper_envs:hiper/ALFWorld-v0", {"games": os.path.join(games, "train"),
                                                          "expert": True, "subgoals": recipe.subgoals}, "game")
    eval_spec = EnvSpec("hiper_envs:hiper/ALFWorld-v0", {"games": os.path.join(games, "eval"),
                                                         "subgoals": recipe.subgoals}, "game")
    stop = (tokenizer.eos_token_id,)
    pad = tokenizer.pad_token_id

    def evaluate(policy_params, constrained: bool) -> dict:
        sampling = SamplingConfig(max_new_tokens=recipe.max_new_tokens, temperature=recipe.eval_temperature,
                                  stop_token_ids=stop, pad_token_id=pad)
        trajectories = play(policy_params, config, tokenizer, token_bytes, eval_spec, list(range(num_eval)),
                            prompt_cfg, sampling, jax.random.key(recipe.seed + 7),
                            grammar=grammar if constrained else None, max_turns=recipe.max_steps)
        return rollout_metrics(trajectories)

    rows = []
    rounds_dir = os.path.join(work_dir, "rounds")
    done = _finished_rounds(work_dir)
    shipped = dataclasses.replace(config, param_dtype="bfloat16", compute_dtype="bfloat16")
    for round_index in range(recipe.rounds + 1):
        round_dir = os.path.join(rounds_dir, str(round_index))
        if round_index in done:
            # Resume: this round's checkpoint (bfloat16, as shipped) and its DAgger states.
            _, params = qwen2.load_hf_checkpoint(round_dir, dtype=jnp.float32, progress=False)
            examples = examples + _load_examples(os.path.join(round_dir, "dagger_examples.npz"))
            rows.append(done[round_index])
            if progress:
                print(f"round {round_index}: resumed from {round_dir}", flush=True)
            continue
        round_start = time.perf_counter()
        row = {"round": round_index}
        labelled = []
        if round_index:
            rng = np.random.default_rng(recipe.seed + round_index)
            tasks = rng.choice(num_train, size=min(recipe.dagger_games, num_train), replace=False).tolist()
            sampling = SamplingConfig(max_new_tokens=recipe.max_new_tokens, temperature=recipe.dagger_temperature,
                                      stop_token_ids=stop, pad_token_id=pad)
            visited = play(_rounded(params), config, tokenizer, token_bytes, train_spec, tasks, prompt_cfg,
                           sampling, jax.random.key(1000 + round_index), grammar=grammar,
                           max_turns=recipe.max_steps, info_keys=EXPERT_KEYS)
            labelled = make_examples(list(expert_turns(visited)), tokenizer, prompt_cfg, grammar)
            examples = examples + labelled
            row.update(dagger_episodes=len(visited), dagger_success=float(np.mean([t.won for t in visited])),
                       dagger_expert_agreement=agreement(visited), dagger_states=len(labelled))
        sft = SFTConfig(epochs=recipe.epochs if round_index == 0 else recipe.round_epochs,
                        lr=recipe.lr if round_index == 0 else recipe.round_lr, batch_rows=16,
                        seed=recipe.seed + round_index)
        params, history = train_sft(params, config, examples, pad, sft, progress=progress,
                                    log_path=os.path.join(work_dir, "sft_metrics.jsonl"))
        last_epoch = [h["nll"] for h in history if h["epoch"] == sft.epochs - 1]
        row.update(sft_examples=len(examples), sft_epochs=sft.epochs, sft_nll=float(np.mean(last_epoch)))
        round_params = _rounded(params)
        for name, constrained in (("constrained", True), ("free", False)):
            metrics = evaluate(round_params, constrained)
            row.update({f"{name}/{k}": v for k, v in metrics.items()
                        if k in ("success", "invalid_rate", "mean_turns", "switch_rate")
                        or k.startswith("success/")})
        row["minutes"] = (time.perf_counter() - round_start) / 60
        rows.append(row)
        qwen2.save_hf_checkpoint(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), shipped, round_dir)
        _save_examples(os.path.join(round_dir, "dagger_examples.npz"), labelled)
        with open(os.path.join(work_dir, "rounds.jsonl"), "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        if progress:
            print(f"round {round_index}: nll {row['sft_nll']:.3f}, held-out success "
                  f"{row['constrained/success']:.1%} constrained / {row['free/success']:.1%} free "
                  f"(invalid {row['free/invalid_rate']:.1%}), {row['minutes']:.1f} min", flush=True)

    ship = recipe.ship_round if recipe.ship_round >= 0 else recipe.rounds
    if not 0 <= ship <= recipe.rounds:
        raise ValueError(f"ship_round={recipe.ship_round} is not one of the {recipe.rounds + 1} rounds")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(rounds_dir, str(ship), name), os.path.join(out_dir, name))
    summary = {
        "params": int(sum(np.size(x) for x in jax.tree.leaves(params))),
        "vocab_size": len(tokenizer), "demo_episodes": len(demos), "task_types": list(task_types),
        "train_games": num_train, "eval_games": num_eval, "shipped_round": ship, "rounds": rows,
        "minutes": (time.perf_counter() - start) / 60, "recipe": recipe.command(out_dir),
    }
    with open(os.path.join(out_dir, "build_summary.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
    return summary


def _finished_rounds(work_dir: str) -> dict[int, dict]:
    """``{round: table row}`` of the rounds in ``work_dir`` whose checkpoint is complete."""
    path = os.path.join(work_dir, "rounds.jsonl")
    if not os.path.exists(path):
        return {}
    done = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            round_dir = os.path.join(work_dir, "rounds", str(row["round"]))
            if all(os.path.exists(os.path.join(round_dir, name))
                   for name in ("config.json", "model.safetensors", "dagger_examples.npz")):
                done[row["round"]] = row
    return done


def _save_examples(path: str, examples) -> None:
    """Writes SFT examples as flat ``int32`` prompt/response arrays plus their lengths."""
    lengths = np.array([[len(e.prompt_ids), len(e.response_ids)] for e in examples], np.int64).reshape(-1, 2)
    flat = [np.zeros(0, np.int32)]
    np.savez(path, lengths=lengths,
             prompts=np.concatenate(flat + [e.prompt_ids for e in examples]).astype(np.int32),
             responses=np.concatenate(flat + [e.response_ids for e in examples]).astype(np.int32))


def _load_examples(path: str) -> list:
    """Inverse of :func:`_save_examples`."""
    from hiper_jax.train.sft import SFTExample

    with np.load(path) as data:
        lengths, prompts, responses = data["lengths"], data["prompts"], data["responses"]
    p_end, r_end = np.cumsum(lengths[:, 0]), np.cumsum(lengths[:, 1])
    return [SFTExample(prompts[pe - pl: pe], responses[re - rl: re])
            for (pl, rl), pe, re in zip(lengths, p_end, r_end)]


def _flag_bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Make the tiny embedded checkpoint (SFT + DAgger rounds).")
    parser.add_argument("--out", default=TINY_ALFWORLD)
    parser.add_argument("--work-dir", default="", help="games, demos, rounds (default: a temp dir)")
    defaults = Recipe()
    for field in dataclasses.fields(Recipe):
        value = getattr(defaults, field.name)
        flag = "--" + field.name.replace("_", "-")
        if field.name == "task_types":
            parser.add_argument(flag, nargs="+", default=[], help="ALFWorld task types (default: all six)")
        elif isinstance(value, bool):
            parser.add_argument(flag, type=_flag_bool, default=value, metavar="{True,False}")
        else:
            parser.add_argument(flag, type=type(value), default=value)
    args = parser.parse_args(argv)
    recipe = Recipe(**{f.name: (tuple(getattr(args, f.name)) if f.name == "task_types" else getattr(args, f.name))
                       for f in dataclasses.fields(Recipe)})
    work = args.work_dir or tempfile.mkdtemp(prefix="hiper_tiny_")
    try:
        summary = build(args.out, work, recipe)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
