"""Supervised warm start of a Qwen2.5-VL policy on MedVista's oracle demonstrations.

:mod:`hiper_jax.train.sft` with images: each demonstration turn is one row, the chat prompt the
agent would have seen (the rollout prompt code, then :class:`~hiper_jax.rollout.images.ImagePrompter`
opening the user message with every image the agent had seen so far, re-made from the turn's
``image_boxes`` exactly as the env renders them) followed by the oracle's Plan-Execute response;
only response tokens are trained.

    episodes = read_demos("demos.jsonl")       # python -m hiper_envs.medvista.oracle --out ...
    examples = make_vision_examples(episodes, tokenizer, prompt_cfg, ImagePrompter(config, tok),
                                    image_size=224, grammar=grammar)
    params, history = train_vision_sft(params, config, examples, SFTConfig(epochs=3))

The vision tower is frozen (``model.train_vision=False``): it runs once per batch before
training (:func:`vision_batches`), every epoch reads the same features, and
:func:`hiper_jax.train.ppo.freeze_vision` keeps the optimizer off it. Rows are sorted by length
into batches of ``batch_rows``; widths are bucketed so a few shapes compile.
"""

from __future__ import annotations

import functools
import json
import time
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from hiper_jax.agent.demos import demo_turns
from hiper_jax.agent.grammar import ResponseGrammar
from hiper_jax.agent.prompts import PromptConfig, render_prompt
from hiper_jax.models.qwen2_5_vl import scoring
from hiper_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from hiper_jax.rollout.images import ImagePrompter, turn_sequence
from hiper_jax.rollout.packing import bucket_size
from hiper_jax.train.losses import token_mean
from hiper_jax.train.ppo import freeze_vision
from hiper_jax.train.sft import SFTConfig

Array = jax.Array


class VisionSFTExample(NamedTuple):
    """One row: prompt ids ``[P]`` (one placeholder run per image), response ids ``[R]``, the
    images ``[H, W, 3]`` uint8 the runs stand for and their grid ``[n, 3]`` (the fields
    :func:`~hiper_jax.rollout.images.turn_sequence` reads of a turn record)."""

    prompt_ids: np.ndarray
    response_ids: np.ndarray
    images: tuple
    image_grid: Optional[np.ndarray] = None


class VisionSFTBatch(NamedTuple):
    """Device inputs of one step: the scoring rows (features of the frozen tower included) and
    the mask ``[N, L]`` of trained response tokens, aligned to scored tokens."""

    rows: scoring.ScoringRows
    loss_mask: Array


def turn_images(episode: dict, turn: dict, image_size: int) -> list[np.ndarray]:
    """The images the agent had seen at ``turn`` of a demonstration ``episode``, re-rendered
    from its ``image_path`` and the turn's ``image_boxes`` (MedVista's demonstration schema).
    Raises ValueError for an episode without them."""
    if episode.get("env") != "medvista" or "image_boxes" not in turn or "image_path" not in episode:
        raise ValueError("a vision-language warm start needs MedVista demonstrations with image_path "
                         "and per-turn image_boxes (python -m hiper_envs.medvista.oracle)")
    from hiper_envs.medvista.env import render_view

    return [render_view(episode["image_path"], tuple(box), image_size) for box in turn["image_boxes"]]


def make_vision_examples(episodes: Sequence[dict], tokenizer, prompt_cfg: PromptConfig,
                         prompter: ImagePrompter, image_size: int,
                         grammar: Optional[ResponseGrammar] = None,
                         only_won: bool = True) -> list[VisionSFTExample]:
    """Tokenizes the demonstration turns with their images (the rollouts' prompt code). With a
    ``grammar`` the targets are the tokens its constrained sampler emits for each response."""
    examples = []
    for turn in demo_turns(list(episodes), prompt_cfg, only_won=only_won):
        episode = episodes[turn.episode]
        images = turn_images(episode, episode["turns"][turn.view.step], image_size)
        prompt = prompter(render_prompt(turn.view, prompt_cfg, tokenizer), images)
        if grammar is None:
            response = tokenizer.encode(turn.response, add_special_tokens=False) + [tokenizer.eos_token_id]
        else:
            response = grammar.response_ids(turn.view, turn.switch, turn.subgoal, turn.action)
        examples.append(VisionSFTExample(np.asarray(prompt.token_ids, np.int32),
                                         np.asarray(response, np.int32), prompt.images,
                                         prompt.grid))
    return examples


def vision_batches(params, config: Qwen2_5_VLConfig, examples: Sequence[VisionSFTExample],
                   batch_rows: int, length_multiple: int = 64,
                   patch_multiple: int = scoring.DEFAULT_PATCH_MULTIPLE) -> list[VisionSFTBatch]:
    """Length-sorted batches of ``batch_rows`` rows with their image features (the tower runs
    here, once per batch). The last batch is padded with empty rows."""
    if not examples:
        raise ValueError("no examples to train on")
    order = sorted(range(len(examples)),
                   key=lambda i: len(examples[i].prompt_ids) + len(examples[i].response_ids))
    out = []
    for start in range(0, len(order), batch_rows):
        group = [examples[i] for i in order[start: start + batch_rows]]
        sequences = [turn_sequence(e, config.vision) for e in group]
        longest = max(len(s.tokens) for s in sequences)
        inputs = scoring.prepare_rows(config, [[s] for s in sequences],
                                      length_multiple=bucket_size(longest, length_multiple),
                                      patch_multiple=patch_multiple, num_rows=batch_rows)
        mask = np.zeros(inputs.tokens.shape, bool)
        for row, example in enumerate(group):
            p = len(example.prompt_ids)
            mask[row, p: p + len(example.response_ids)] = True
        out.append(VisionSFTBatch(scoring.scoring_rows(params, config, inputs), jnp.asarray(mask)))
    return out


def vision_sft_loss(params, config: Qwen2_5_VLConfig, batch: VisionSFTBatch) -> tuple[Array, dict]:
    """Token-mean cross-entropy of the response tokens."""
    logp, _, _ = scoring.token_stats(params, config, batch.rows)
    nll = -token_mean(logp, batch.loss_mask)
    return nll, {"nll": nll, "perplexity": jnp.exp(nll)}


@functools.partial(jax.jit, static_argnames=("config", "tx"), donate_argnums=(0, 1))
def vision_sft_step(params, opt_state, batch: VisionSFTBatch, *, config: Qwen2_5_VLConfig, tx):
    """One optimizer step; returns new params, optimizer state and metrics."""
    (_, metrics), grads = jax.value_and_grad(vision_sft_loss, has_aux=True)(params, config, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return optax.apply_updates(params, updates), opt_state, metrics


def train_vision_sft(params, config: Qwen2_5_VLConfig, examples: Sequence[VisionSFTExample],
                     sft: SFTConfig, log_path: str | None = None, progress: bool = True,
                     patch_multiple: int = scoring.DEFAULT_PATCH_MULTIPLE):
    """Trains the language model on ``examples`` for ``sft.epochs`` (the vision tower frozen);
    returns (params, list of per-step metrics)."""
    rng = np.random.default_rng(sft.seed)
    data = vision_batches(params, config, examples, sft.batch_rows, sft.length_multiple, patch_multiple)
    total = len(data) * sft.epochs
    warmup = min(sft.warmup_steps, max(total - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(0.0, sft.lr, warmup, max(total, warmup + 1))
    tx = freeze_vision(optax.chain(optax.clip_by_global_norm(sft.max_grad_norm),
                                   optax.adamw(schedule, weight_decay=sft.weight_decay)))
    params = jax.tree.map(jnp.copy, params)  # the step donates its input
    opt_state = tx.init(params)
    history = []
    log = open(log_path, "a", encoding="utf-8") if log_path else None
    bar = tqdm(total=total, desc="warm start (vision SFT)", disable=not progress)
    try:
        for epoch in range(sft.epochs):
            for index in rng.permutation(len(data)):
                start = time.perf_counter()
                params, opt_state, metrics = vision_sft_step(params, opt_state, data[index],
                                                             config=config, tx=tx)
                record = {k: float(v) for k, v in metrics.items()}
                record.update(step=len(history) + 1, epoch=epoch, step_s=time.perf_counter() - start,
                              tokens=int(np.asarray(data[index].loss_mask).sum()))
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
