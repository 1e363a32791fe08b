"""Jitted batched generation with a static KV cache for Qwen2 models.

One call samples continuations for a batch of left-padded prompts::

    tokens, mask = pad_prompts(prompt_ids, pad_token_id=pad, length_multiple=64)
    out = generate(params, config, tokens, mask, key,
                   SamplingConfig(max_new_tokens=64, temperature=1.0, stop_token_ids=(eos,)))
    out.tokens [B, N], out.logprobs [B, N], out.lengths [B]

The prompt is prefilled in one forward pass, then tokens are decoded one at a time inside a
``lax.while_loop`` that stops as soon as every row has emitted a stop token (or after
``max_new_tokens``). Shapes are static: bucket prompt lengths (``pad_prompts``) so a run
compiles once per bucket.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hiper_jax.models.qwen2 import KVCache, Params, Qwen2Config, forward, init_cache, lm_head

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Static settings of :func:`generate` (a change recompiles).

    Attributes:
        max_new_tokens: tokens to generate at most per row.
        temperature: logits are divided by it before sampling (> 0).
        top_k: keep only the k most likely tokens (0: off).
        top_p: keep the smallest set of most likely tokens whose probability reaches top_p (1: off).
        greedy: take the argmax instead of sampling (temperature, top_k, top_p unused).
        stop_token_ids: a row stops after emitting any of these (the stop token is kept).
        pad_token_id: fills positions after a row stopped.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


class GenerationOutput(NamedTuple):
    """What :func:`generate` returns.

    Attributes:
        tokens: ``[B, N]`` int32 generated tokens (``N = max_new_tokens``), ``pad_token_id``
            after a row's stop token.
        logprobs: ``[B, N]`` float32 log-probability of each token under the distribution it was
            sampled from (after temperature, top-k, top-p; for greedy decoding, the model's own
            log-softmax); 0 after the stop token.
        lengths: ``[B]`` int32 number of generated tokens, the stop token included.
    """

    tokens: Array
    logprobs: Array
    lengths: Array


def sampling_logits(logits: Array, sampling: SamplingConfig) -> Array:
    """The logits of the sampling policy: ``[B, V]`` float32 -> ``[B, V]`` with temperature applied
    and tokens outside top-k / top-p set to -inf."""
    logits = logits.astype(jnp.float32) / sampling.temperature
    if sampling.top_k == 0 and sampling.top_p == 1.0:
        return logits
    vocab = logits.shape[-1]
    k = min(sampling.top_k, vocab) if sampling.top_k else vocab
    # lax.top_k returns values sorted in descending order; with k < V it avoids a full sort.
    top_values = lax.top_k(logits, k)[0]
    threshold = top_values[:, -1:]
    if sampling.top_p < 1.0:
        probs = jax.nn.softmax(top_values, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_before < sampling.top_p  # always keeps the most likely token
        threshold = jnp.min(jnp.where(keep, top_values, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def sample_token(logits: Array, key: Array, sampling: SamplingConfig) -> tuple[Array, Array]:
    """Draws one token per row from ``logits [B, V]``; returns ``(tokens [B], logprobs [B])``."""
    if sampling.greedy:
        tokens = jnp.argmax(logits, axis=-1)
        logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    else:
        policy = sampling_logits(logits, sampling)
        tokens = jax.random.categorical(key, policy, axis=-1)
        logprobs = jax.nn.log_softmax(policy, axis=-1)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    return tokens.astype(jnp.int32), chosen


class _LoopState(NamedTuple):
    step: Array          # [] tokens generated so far
    logits: Array        # [B, V] next-token logits
    cache: KVCache
    positions: Array     # [B] RoPE position of the next token
    tokens: Array        # [B, N]
    logprobs: Array      # [B, N]
    done: Array          # [B] row has emitted a stop token
    lengths: Array       # [B]


@functools.partial(jax.jit, static_argnames=("config", "sampling"))
def generate(params: Params, config: Qwen2Config, prompt_tokens: Array,
             prompt_mask: Optional[Array], key: Array, sampling: SamplingConfig
             ) -> GenerationOutput:
    """Samples up to ``sampling.max_new_tokens`` tokens after each prompt.

    Args:
        params, config: the model (config static).
        prompt_tokens: ``[B, P]`` int, left-padded prompts (every row ends at column P - 1).
        prompt_mask: ``[B, P]``, 1 for prompt tokens, 0 for left padding (None: no padding).
        key: PRNG key; the same key and inputs give the same output.
        sampling: :class:`SamplingConfig` (static).

    Returns:
        :class:`GenerationOutput`.
    """
    batch, prompt_length = prompt_tokens.shape
    max_new = sampling.max_new_tokens
    if prompt_mask is None:
        prompt_mask = jnp.ones((batch, prompt_length), jnp.int32)
    prompt_mask = prompt_mask.astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0)
    # The last generated token is never fed back, so the cache needs max_new - 1 extra slots.
    cache = init_cache(config, batch, prompt_length + max_new - 1)
    hidden, cache = forward(params, config, prompt_tokens, segment_ids=prompt_mask,
                            positions=positions, cache=cache)
    stop_ids = jnp.asarray(sampling.stop_token_ids or (-1,), jnp.int32)

    def emit(state: _LoopState) -> _LoopState:
        token, logprob = sample_token(state.logits, jax.random.fold_in(key, state.step), sampling)
        token = jnp.where(state.done, sampling.pad_token_id, token)
        logprob = jnp.where(state.done, 0.0, logprob)
        return state._replace(
            step=state.step + 1,
            tokens=lax.dynamic_update_index_in_dim(state.tokens, token, state.step, axis=1),
            logprobs=lax.dynamic_update_index_in_dim(state.logprobs, logprob, state.step, axis=1),
            lengths=state.lengths + (~state.done).astype(jnp.int32),
            done=state.done | jnp.isin(token, stop_ids))

    def decode_and_emit(state: _LoopState) -> _LoopState:
        last = lax.dynamic_index_in_dim(state.tokens, state.step - 1, axis=1)
        hidden, cache = forward(params, config, last, segment_ids=jnp.ones_like(last),
                                positions=state.positions[:, None], cache=state.cache)
        logits = lm_head(params, config, hidden[:, 0])
        return emit(state._replace(logits=logits, cache=cache, positions=state.positions + 1))

    def keep_going(state: _LoopState) -> Array:
        return (state.step < max_new) & ~jnp.all(state.done)

    state = emit(_LoopState(
        step=jnp.zeros((), jnp.int32),
        logits=lm_head(params, config, hidden[:, -1]),
        cache=cache,
        positions=jnp.sum(prompt_mask, axis=1),
        tokens=jnp.full((batch, max_new), sampling.pad_token_id, jnp.int32),
        logprobs=jnp.zeros((batch, max_new), jnp.float32),
        done=jnp.zeros((batch,), bool),
        lengths=jnp.zeros((batch,), jnp.int32)))
    state = lax.while_loop(keep_going, decode_and_emit, state)
    return GenerationOutput(state.tokens, state.logprobs, state.lengths)


def pad_prompts(prompts: Sequence[Sequence[int]], pad_token_id: int, length_multiple: int = 64,
                min_length: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token lists into ``(tokens [B, P], mask [B, P])`` int32 host arrays.

    ``P`` is the longest prompt (at least ``min_length``) rounded up to ``length_multiple``, so
    prompts of similar length share one compiled program.
    """
    if not prompts:
        raise ValueError("pad_prompts needs at least one prompt")
    longest = max(max(len(p) for p in prompts), min_length, 1)
    length = -(-longest // length_multiple) * length_multiple
    tokens = np.full((len(prompts), length), pad_token_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            tokens[row, length - len(prompt):] = prompt
            mask[row, length - len(prompt):] = 1
    return tokens, mask
