"""Supervised warm start: cross-entropy on the response tokens of expert demonstrations.

Each demonstration turn becomes one row: the chat prompt the agent would have seen (same
prompt code as the rollouts) followed by the expert's Plan-Execute response and the stop token;
only response tokens are trained. Rows are sorted by length into batches padded to bucketed
lengths, so the jitted step compiles for a few shapes.

Command line (writes a HF checkpoint that RL starts from)::

    python -m hiper_jax.train.sft --checkpoint BASE_DIR --demos demos.jsonl --out OUT_DIR \
        [--env alfworld] [--epochs 3] [--lr 1e-3] [--batch-rows 16]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import time
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from hiper_jax.agent.demos import DemoTurn, demo_turns, read_demos
from hiper_jax.agent.grammar import ResponseGrammar
from hiper_jax.agent.prompts import PromptConfig, render_prompt
from hiper_jax.models import qwen2
from hiper_jax.rollout.packing import bucket_size
from hiper_jax.train.losses import token_mean
from hiper_jax.train.ppo import policy_token_stats


class SFTExample(NamedTuple):
    """One row: prompt ids ``[P]`` and response ids ``[R]`` (stop token included)."""

    prompt_ids: np.ndarray
    response_ids: np.ndarray


class SFTBatch(NamedTuple):
    """``[N, L]`` tokens, real-token mask, and the mask of scored response tokens."""

    tokens: np.ndarray
    valid: np.ndarray
    loss_mask: np.ndarray


def make_examples(turns: Sequence[DemoTurn], tokenizer, prompt_cfg: PromptConfig,
                  grammar: Optional[ResponseGrammar] = None) -> list[SFTExample]:
    """Tokenizes demonstration turns with the rollout prompt code.

    With a ``grammar``, the target tokens are those the grammar-constrained sampler emits for
    that response (:meth:`~hiper_jax.agent.grammar.ResponseGrammar.response_ids`); without
    one, the tokenizer's own encoding of the response text.
    """
    stop = tokenizer.eos_token_id
    examples = []
    for turn in turns:
        prompt = render_prompt(turn.view, prompt_cfg, tokenizer)
        if grammar is None:
            response = tokenizer.encode(turn.response, add_special_tokens=False) + [stop]
        else:
            response = grammar.response_ids(turn.view, turn.switch, turn.subgoal, turn.action)
        examples.append(SFTExample(np.asarray(prompt, np.int32), np.asarray(response, np.int32)))
    return examples


def batches(examples: Sequence[SFTExample], batch_rows: int, pad_id: int, length_multiple: int,
            rng: np.random.Generator) -> list[SFTBatch]:
    """Length-sorted batches of ``batch_rows`` rows, in random order; masks aligned to scored
    tokens (``tokens[:, j]`` is predicted at ``j - 1``)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt_ids) + len(examples[i].response_ids))
    groups = [order[i: i + batch_rows] for i in range(0, len(order), batch_rows)]
    rng.shuffle(groups)
    out = []
    for group in groups:
        longest = max(len(examples[i].prompt_ids) + len(examples[i].response_ids) for i in group)
        length = bucket_size(longest, length_multiple)
        tokens = np.full((batch_rows, length), pad_id, np.int32)
        valid = np.zeros((batch_rows, length), bool)
        loss_mask = np.zeros((batch_rows, length), bool)
        for row, i in enumerate(group):
            prompt, response = examples[i]
            end = len(prompt) + len(response)
            tokens[row, : len(prompt)] = prompt
            tokens[row, len(prompt): end] = response
            valid[row, :end] = True
            loss_mask[row, len(prompt): end] = True
        out.append(SFTBatch(tokens, valid, loss_mask))
    return out


def sft_loss(params, config: qwen2.Qwen2Config, batch: SFTBatch) -> tuple[jax.Array, dict]:
    """Token-mean cross-entropy of the response tokens, and the token accuracy proxy
    ``exp(mean logp)``."""
    logp, _, _ = policy_token_stats(params, config, batch.tokens, batch.valid)
    nll = -token_mean(logp, batch.loss_mask)
    return nll, {"nll": nll, "perplexity": jnp.exp(nll)}


@functools.partial(jax.jit, static_argnames=("config", "tx"), donate_argnums=(0, 1))
def sft_step(params, opt_state, batch: SFTBatch, *, config: qwen2.Qwen2Config, tx):
    """One AdamW step on a batch; returns new params, optimizer state and metrics."""
    (_, metrics), grads = jax.value_and_grad(sft_loss, has_aux=True)(params, config, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return optax.apply_updates(params, updates), opt_state, metrics


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Settings of :func:`train_sft`."""

    epochs: int = 3
    lr: float = 1e-3
    warmup_steps: int = 20
    batch_rows: int = 16
    length_multiple: int = 64
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    seed: int = 0


def train_sft(params, config: qwen2.Qwen2Config, examples: Sequence[SFTExample], pad_id: int,
              sft: SFTConfig, log_path: str | None = None, progress: bool = True):
    """Trains on ``examples`` for ``sft.epochs``; returns (params, list of per-step metrics)."""
    rng = np.random.default_rng(sft.seed)
    steps_per_epoch = math.ceil(len(examples) / sft.batch_rows)
    total = steps_per_epoch * sft.epochs
    warmup = min(sft.warmup_steps, max(total - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(0.0, sft.lr, warmup, max(total, warmup + 1))
    tx = optax.chain(optax.clip_by_global_norm(sft.max_grad_norm),
                     optax.adamw(schedule, weight_decay=sft.weight_decay))
    opt_state = tx.init(params)
    history = []
    log = open(log_path, "a", encoding="utf-8") if log_path else None
    bar = tqdm(total=total, desc="warm start (SFT)", disable=not progress)
    try:
        for epoch in range(sft.epochs):
            for batch in batches(examples, sft.batch_rows, pad_id, sft.length_multiple, rng):
                start = time.perf_counter()
                params, opt_state, metrics = sft_step(params, opt_state, jax.device_put(batch),
                                                      config=config, tx=tx)
                record = {k: float(v) for k, v in metrics.items()}
                record.update(step=len(history) + 1, epoch=epoch, step_s=time.perf_counter() - start,
                              tokens=int(batch.valid.sum()))
                history.append(record)
                if log:
                    log.write(json.dumps(record) + "\n")
                bar.set_postfix(nll=f"{record['nll']:.3f}")
                bar.update()
    finally:
        bar.close()
        if log:
            log.close()
    return params, history


def main(argv=None) -> None:
    from hiper_jax.tokenization import load_tokenizer

    parser = argparse.ArgumentParser(description="Supervised warm start on demonstrations.")
    parser.add_argument("--checkpoint", required=True, help="HF checkpoint directory to start from")
    parser.add_argument("--demos", required=True, help="demonstrations JSONL")
    parser.add_argument("--out", required=True, help="output HF checkpoint directory")
    parser.add_argument("--env", default="alfworld", choices=["alfworld", "webshop"])
    parser.add_argument("--style", default="plan_execute", choices=["plan_execute", "flat"])
    parser.add_argument("--history-turns", type=int, default=2)
    parser.add_argument("--max-prompt-tokens", type=int, default=1024)
    parser.add_argument("--max-steps", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-rows", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    tokenizer = load_tokenizer(args.checkpoint)
    config, params = qwen2.load_hf_checkpoint(args.checkpoint, dtype=jnp.float32)
    prompt_cfg = PromptConfig(env=args.env, style=args.style, history_turns=args.history_turns,
                              max_prompt_tokens=args.max_prompt_tokens, max_steps=args.max_steps)
    examples = make_examples(list(demo_turns(read_demos(args.demos), prompt_cfg)), tokenizer, prompt_cfg)
    tokens = sum(len(e.prompt_ids) + len(e.response_ids) for e in examples)
    print(f"{len(examples)} examples, {tokens} tokens; {args.epochs} epochs")
    start = time.perf_counter()
    params, history = train_sft(params, config, examples, tokenizer.pad_token_id,
                                SFTConfig(epochs=args.epochs, lr=args.lr, batch_rows=args.batch_rows,
                                          seed=args.seed),
                                log_path=os.path.join(args.out, "sft_metrics.jsonl") if _mkdir(args.out) else None)
    qwen2.save_hf_checkpoint(params, config, args.out)
    tokenizer.save_pretrained(args.out)
    print(f"done in {time.perf_counter() - start:.0f} s; final nll {history[-1]['nll']:.3f}; "
          f"checkpoint written to {args.out}")


def _mkdir(path: str) -> bool:
    os.makedirs(path, exist_ok=True)
    return True


if __name__ == "__main__":
    main()
