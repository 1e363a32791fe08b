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

With ``constraint`` (a :class:`DecodeConstraint`, built on the host from
:class:`hiper_jax.agent.grammar.GrammarTables`), every row may only emit tokens that keep one
of its alternatives alive (a grammar-constrained response naming an admissible action). The
walk over the alternatives runs inside the decode loop; the sampled token's log-prob is that of
the renormalised distribution over the allowed tokens, and the allowed sets of every step come
back in the output (``allowed``, ``text_on``) so the learner can rebuild that distribution.

The loop itself (:func:`decode`) takes the model as a decode-step function, so other models'
samplers (:mod:`hiper_jax.models.qwen2_5_vl.sampling`) run the same loop after their own
prefill.

Sharded sampling: :func:`sampling_copy` lays the sampler's weights (unstacked, in the compute
dtype) out on a mesh, e.g. one host's :func:`hiper_jax.distributed.host_sampling_mesh`, by the
model's logical axis rules; prompts go on it with :func:`hiper_jax.distributed.place_rows`
(rows over ``data x fsdp`` when they divide), and ``generate`` called under
:func:`hiper_jax.distributed.on_mesh` keeps its activations and KV cache on the rules' layout
(batch over ``data x fsdp``, heads and KV heads over ``tensor`` where it divides them)::

    mesh = distributed.host_sampling_mesh(data=1, fsdp=1, tensor=-1)
    params = sampling_copy(train_params, config, mesh, jnp.bfloat16)
    tokens, mask = distributed.place_rows(pad_prompts(prompts, pad), mesh)
    with distributed.on_mesh(mesh):
        out = generate(params, config, tokens, mask, key, sampling)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hiper_jax import distributed
from hiper_jax.agent.grammar import PAD, WILD
from hiper_jax.models import qwen2
from hiper_jax.models.qwen2 import KVCache, Params, Qwen2Config, forward, init_cache, lm_head
from hiper_jax.shapes import check_rank, check_same_shape, check_shape, check_type

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
            sampled from (after temperature, top-k, top-p and the constraint; for greedy
            decoding, the model's own log-softmax, constrained); 0 after the stop token.
        lengths: ``[B]`` int32 number of generated tokens, the stop token included.
        allowed: with a constraint, ``[B, N, 2M]`` int32 the allowed token ids of each step
            (repeats possible; ``V`` fills unused entries); None without one.
        text_on: with a constraint, ``[B, N]`` bool: free-text tokens were allowed too.
    """

    tokens: Array
    logprobs: Array
    lengths: Array
    allowed: Optional[Array] = None
    text_on: Optional[Array] = None


class DecodeConstraint(NamedTuple):
    """Device form of one turn's grammar tables (:class:`~hiper_jax.agent.grammar.GrammarTables`).

    Attributes:
        alternatives: ``[B, M, D]`` int32 token ids, ``WILD`` (free text) and ``PAD``.
        text_budget: ``[B]`` int32 tokens per free-text stretch at most.
        text_mask: ``[V]`` bool, the tokens free text may use (never a token that follows a
            ``WILD`` entry).
    """

    alternatives: Array
    text_budget: Array
    text_mask: Array


class ConstraintState(NamedTuple):
    """Where each alternative of each row stands, all ``[B, M]``."""

    alive: Array       # bool, consistent with every token emitted so far
    depth: Array       # int32, index of the alternative's next entry
    wild_len: Array    # int32, tokens in the free text being written


def check_constraint(constraint: Optional[DecodeConstraint], batch: int,
                     vocab_size: Optional[int] = None) -> None:
    """``constraint`` for ``batch`` rows: ``alternatives`` ``[B, M, D]`` int, ``text_budget``
    ``[B]`` int, ``text_mask`` ``[V]`` bool (``V = vocab_size`` when given; None constraint:
    nothing to check). Raises ValueError naming the field; shapes and dtypes only, so free
    inside jit."""
    if constraint is None:
        return
    alternatives = {"constraint.alternatives": constraint.alternatives}
    budget = {"constraint.text_budget": constraint.text_budget}
    text_mask = {"constraint.text_mask": constraint.text_mask}
    check_shape((batch, None, None), "[B, M, D]", **alternatives)
    check_shape((batch,), "[B]", **budget)
    check_shape((vocab_size,), "[V]", **text_mask)
    check_type(int, **alternatives, **budget)
    check_type(bool, **text_mask)


def check_prompts(prompt_tokens: Array, prompt_mask: Optional[Array], key: Array) -> None:
    """``prompt_tokens`` ``[B, P]`` int, ``prompt_mask`` the same shape (any 0/1 dtype, or
    None), ``key`` one PRNG key (a typed key ``[]`` or a raw ``uint32`` key ``[2]``)."""
    check_rank(2, "[B, P]", prompt_tokens=prompt_tokens)
    check_type(int, prompt_tokens=prompt_tokens)
    check_same_shape(prompt_tokens=prompt_tokens, prompt_mask=prompt_mask)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        check_rank(0, "[] (one typed PRNG key)", key=key)
    else:
        check_shape((2,), "[2] (one raw PRNG key)", key=key)
        check_type(int, key=key)


def constraint_start(constraint: DecodeConstraint) -> ConstraintState:
    """The state before the first response token: every non-empty alternative alive."""
    alive = constraint.alternatives[:, :, 0] != PAD
    zeros = jnp.zeros(alive.shape, jnp.int32)
    return ConstraintState(alive, zeros, zeros)


def _entries(constraint: DecodeConstraint, state: ConstraintState) -> tuple[Array, Array]:
    """Each alternative's next entry and the one after it, ``[B, M]`` each."""
    last = constraint.alternatives.shape[2] - 1
    take = lambda d: jnp.take_along_axis(constraint.alternatives, jnp.minimum(d, last)[..., None],
                                         axis=2)[..., 0]
    return take(state.depth), take(state.depth + 1)


def allowed_tokens(constraint: DecodeConstraint, state: ConstraintState,
                   vocab_size: int) -> tuple[Array, Array]:
    """The tokens each row may emit next: ``ids [B, 2M]`` (``vocab_size`` where unused) and
    ``text_on [B]`` (every ``text_mask`` token is allowed too).

    An alternative at a literal entry allows that token; one inside free text allows the token
    that closes it (after at least one text token) and, within the budget, any text token. So
    every alive alternative always has a continuation (the budget is at least 1).
    """
    entry, following = _entries(constraint, state)
    wild = entry == WILD
    literal = state.alive & (entry >= 0)
    closing = state.alive & wild & (state.wild_len >= 1)
    text = state.alive & wild & (state.wild_len < constraint.text_budget[:, None])
    ids = jnp.concatenate([jnp.where(literal, entry, vocab_size),
                           jnp.where(closing, following, vocab_size)], axis=1)
    return ids, jnp.any(text, axis=1)


def allowed_mask(constraint: DecodeConstraint, ids: Array, text_on: Array, vocab_size: int) -> Array:
    """``[B, V]`` bool from :func:`allowed_tokens`; a row without any alternative is
    unconstrained."""
    rows = jnp.arange(ids.shape[0])[:, None]
    mask = jnp.zeros((ids.shape[0], vocab_size), bool).at[rows, ids].set(True, mode="drop")
    mask = mask | (text_on[:, None] & constraint.text_mask[None, :])
    free = jnp.all(constraint.alternatives[:, :, 0] == PAD, axis=1)
    return mask | free[:, None]


def advance(constraint: DecodeConstraint, state: ConstraintState, token: Array) -> ConstraintState:
    """The state after each row emitted ``token [B]``."""
    entry, following = _entries(constraint, state)
    token = token[:, None]
    wild = entry == WILD
    literal = state.alive & (entry >= 0) & (entry == token)
    closing = state.alive & wild & (state.wild_len >= 1) & (following == token)
    is_text = jnp.take(constraint.text_mask, jnp.clip(token, 0, constraint.text_mask.shape[0] - 1))
    text = state.alive & wild & (state.wild_len < constraint.text_budget[:, None]) & is_text
    return ConstraintState(
        alive=literal | closing | text,
        depth=state.depth + jnp.where(literal, 1, jnp.where(closing, 2, 0)),
        wild_len=jnp.where(text, state.wild_len + 1, jnp.where(closing, 0, state.wild_len)))


@functools.partial(jax.jit, static_argnames=("vocab_size",))
def trace_constraint(constraint: DecodeConstraint, tokens: Array, vocab_size: int
                     ) -> tuple[Array, Array]:
    """The allowed sets along given responses ``tokens [B, R]`` (teacher forcing, the same walk
    as :func:`generate`): ``allowed [B, R, 2M]`` and ``text_on [B, R]``."""
    check_rank(2, "[B, R]", tokens=tokens)
    check_type(int, tokens=tokens)
    check_constraint(constraint, jnp.shape(tokens)[0], vocab_size)

    def step(state, token):
        ids, text_on = allowed_tokens(constraint, state, vocab_size)
        return advance(constraint, state, token), (ids, text_on)

    _, (ids, text_on) = lax.scan(step, constraint_start(constraint), tokens.T)
    return ids.swapaxes(0, 1), text_on.T


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
    walk: Optional[ConstraintState] = None  # with a constraint
    allowed: Optional[Array] = None         # [B, N, 2M]
    text_on: Optional[Array] = None         # [B, N]


StepFn = Callable[[Array, Array, KVCache], tuple[Array, KVCache]]
"""One decode step of a model: ``(tokens [B, 1], positions [B], cache) -> (logits [B, V]
float32, cache)``, the tokens at those (1-D, text) positions appended to the cache."""


def decode(step_fn: StepFn, logits: Array, cache: KVCache, positions: Array, key: Array,
           sampling: SamplingConfig, constraint: Optional[DecodeConstraint] = None
           ) -> GenerationOutput:
    """The decode loop after a prefill, shared by every model's sampler (call it inside jit).

    Args:
        step_fn: the model's decode step (:data:`StepFn`).
        logits: ``[B, V]`` next-token logits after the prompt (the prefill's last position).
        cache: the KV cache holding the prompt, with ``max_new_tokens - 1`` free slots.
        positions: ``[B]`` int the position of the first generated token of each row.
        key, sampling, constraint: as in :func:`generate`.

    Returns:
        :class:`GenerationOutput`.
    """
    batch, vocab = logits.shape
    max_new = sampling.max_new_tokens
    stop_ids = jnp.asarray(sampling.stop_token_ids or (-1,), jnp.int32)

    def emit(state: _LoopState) -> _LoopState:
        logits = state.logits
        if constraint is not None:
            ids, text_on = allowed_tokens(constraint, state.walk, vocab)
            logits = jnp.where(allowed_mask(constraint, ids, text_on, vocab), logits, -jnp.inf)
        token, logprob = sample_token(logits, jax.random.fold_in(key, state.step), sampling)
        token = jnp.where(state.done, sampling.pad_token_id, token)
        logprob = jnp.where(state.done, 0.0, logprob)
        if constraint is not None:
            state = state._replace(
                walk=advance(constraint, state.walk, token),
                allowed=lax.dynamic_update_index_in_dim(state.allowed, ids, state.step, axis=1),
                text_on=lax.dynamic_update_index_in_dim(state.text_on, text_on, state.step, axis=1))
        return state._replace(
            step=state.step + 1,
            tokens=lax.dynamic_update_index_in_dim(state.tokens, token, state.step, axis=1),
            logprobs=lax.dynamic_update_index_in_dim(state.logprobs, logprob, state.step, axis=1),
            lengths=state.lengths + (~state.done).astype(jnp.int32),
            done=state.done | jnp.isin(token, stop_ids))

    def decode_and_emit(state: _LoopState) -> _LoopState:
        last = lax.dynamic_index_in_dim(state.tokens, state.step - 1, axis=1)
        logits, cache = step_fn(last, state.positions, state.cache)
        return emit(state._replace(logits=logits, cache=cache, positions=state.positions + 1))

    def keep_going(state: _LoopState) -> Array:
        return (state.step < max_new) & ~jnp.all(state.done)

    state = emit(_LoopState(
        step=jnp.zeros((), jnp.int32),
        logits=logits,
        cache=cache,
        positions=positions,
        tokens=jnp.full((batch, max_new), sampling.pad_token_id, jnp.int32),
        logprobs=jnp.zeros((batch, max_new), jnp.float32),
        done=jnp.zeros((batch,), bool),
        lengths=jnp.zeros((batch,), jnp.int32),
        **({} if constraint is None else dict(
            walk=constraint_start(constraint),
            allowed=jnp.full((batch, max_new, 2 * constraint.alternatives.shape[1]), vocab, jnp.int32),
            text_on=jnp.zeros((batch, max_new), bool)))))
    state = lax.while_loop(keep_going, decode_and_emit, state)
    return GenerationOutput(state.tokens, state.logprobs, state.lengths, state.allowed, state.text_on)


@functools.partial(jax.jit, static_argnames=("config", "sampling"))
def generate(params: Params, config: Qwen2Config, prompt_tokens: Array,
             prompt_mask: Optional[Array], key: Array, sampling: SamplingConfig,
             constraint: Optional[DecodeConstraint] = None) -> GenerationOutput:
    """Samples up to ``sampling.max_new_tokens`` tokens after each prompt.

    Args:
        params, config: the model (config static).
        prompt_tokens: ``[B, P]`` int, left-padded prompts (every row ends at column P - 1).
        prompt_mask: ``[B, P]``, 1 for prompt tokens, 0 for left padding (None: no padding).
        key: PRNG key; the same key and inputs give the same output.
        sampling: :class:`SamplingConfig` (static).
        constraint: a :class:`DecodeConstraint` for these rows, or None (unconstrained).

    Returns:
        :class:`GenerationOutput`.

    Raises:
        ValueError naming the argument when an input's rank, shape or dtype is not the one
        above (checked while tracing: nothing is added to the compiled program).
    """
    check_prompts(prompt_tokens, prompt_mask, key)
    batch, prompt_length = prompt_tokens.shape
    check_constraint(constraint, batch, config.vocab_size)
    if prompt_mask is None:
        prompt_mask = jnp.ones((batch, prompt_length), jnp.int32)
    prompt_mask = prompt_mask.astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0)
    # The last generated token is never fed back, so the cache needs max_new - 1 extra slots.
    cache = init_cache(config, batch, prompt_length + sampling.max_new_tokens - 1)
    hidden, cache = forward(params, config, prompt_tokens, segment_ids=prompt_mask,
                            positions=positions, cache=cache)

    def step(last: Array, positions: Array, cache: KVCache) -> tuple[Array, KVCache]:
        hidden, cache = forward(params, config, last, segment_ids=jnp.ones_like(last),
                                positions=positions[:, None], cache=cache)
        return lm_head(params, config, hidden[:, 0]), cache

    return decode(step, lm_head(params, config, hidden[:, -1]), cache,
                  jnp.sum(prompt_mask, axis=1), key, sampling, constraint)


def sampling_copy(params: Params, config: Qwen2Config, mesh, dtype=None) -> Params:
    """The sampler's copy of ``params`` on ``mesh``: unstacked layers (see
    :func:`hiper_jax.models.qwen2.unstack_layers`), cast to ``dtype`` (None: kept), each
    parameter laid out by the model's logical axis rules on ``mesh`` (``embed`` over ``fsdp``;
    heads, KV heads, MLP width and vocab over ``tensor``; an axis that does not divide a
    dimension leaves it whole).

    ``params`` stacked or unstacked, without LoRA adapters (merge them first:
    :func:`hiper_jax.models.qwen2.lora.merge_lora`); in one process any placement, across
    processes global arrays over all devices with ``mesh`` from
    :func:`hiper_jax.distributed.host_sampling_mesh` (then the call is collective and every
    host gets its own copy on its own devices). Made one layer at a time: each layer is cut
    out and cast where ``params`` lie, then moved (:func:`hiper_jax.distributed.copy_to_host_mesh`),
    so besides the copy only one layer's cast weights exist at once.
    """
    if qwen2.has_adapters(params):
        raise ValueError("sampling_copy takes weights without LoRA adapters; merge them first "
                         "(qwen2.lora.merge_lora)")
    config = qwen2.tree_config(params, config)
    shardings = qwen2.param_shardings(config, mesh, stacked=False)
    dtype = None if dtype is None else jnp.dtype(dtype)
    stacked = not isinstance(params["layers"], (list, tuple))
    num_layers = len(jax.tree.leaves(params["layers"])[0]) if stacked else len(params["layers"])
    rest = {name: value for name, value in params.items() if name != "layers"}
    layer_shardings = shardings["layers"]
    given = jax.tree.structure(dict(rest, layers=[0] * num_layers))
    expected = jax.tree.structure(dict({k: v for k, v in shardings.items() if k != "layers"},
                                       layers=[0] * len(layer_shardings)))
    shape = jax.eval_shape(_cut_layer, params["layers"], 0, dtype) if stacked else params["layers"][0]
    if given != expected or jax.tree.structure(shape) != jax.tree.structure(layer_shardings[0]):
        raise ValueError(f"the parameter tree does not match the model's: {given} vs {expected}")
    copy = distributed.copy_to_host_mesh(_cast(rest, dtype), {k: shardings[k] for k in rest})
    layers = []
    for index in range(num_layers):
        layer = _cut_layer(params["layers"], index, dtype) if stacked else _cast(params["layers"][index], dtype)
        layers.append(distributed.copy_to_host_mesh(layer, layer_shardings[index]))
        del layer
    return dict(copy, layers=layers)


@functools.partial(jax.jit, static_argnames="dtype")
def _cast(tree, dtype):
    return jax.tree.map(lambda x: x if dtype is None else x.astype(dtype), tree)


@functools.partial(jax.jit, static_argnames="dtype")
def _cut_layer(stack, index, dtype):
    """Layer ``index`` (traced: one program for every layer) of stacked weights, cast."""
    return jax.tree.map(lambda x: (lambda y: y if dtype is None else y.astype(dtype))(
        lax.dynamic_index_in_dim(x, index, axis=0, keepdims=False)), stack)


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
