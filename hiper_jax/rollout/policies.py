"""Policies the collector can run: the jitted LLM sampler, or a scripted responder.

A policy takes a batch of prompts and returns a :class:`Pending` handle at once; its
``result()`` gives each prompt's response tokens and log-probs. The LLM policy dispatches the
jitted sampler asynchronously, so the host can step environments while the device generates.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from hiper_jax import distributed
from hiper_jax.agent.grammar import ResponseGrammar, allowed_sets, pad_tables
from hiper_jax.agent.prompts import AgentView
from hiper_jax.rollout.packing import bucket_size


class Responses(NamedTuple):
    """Per prompt: response token ids ``[R_i]`` (stop token included if sampled), their
    log-probs under the sampling policy ``[R_i]`` and, for constrained sampling, the allowed
    set of each position (``(mode [R_i], ids [R_i, K])`` from
    :func:`hiper_jax.agent.grammar.allowed_sets`; None when unconstrained)."""

    token_ids: list[np.ndarray]
    logprobs: list[np.ndarray]
    allowed: Optional[list[tuple[np.ndarray, np.ndarray]]] = None


class Pending:
    """A batch of responses being generated; ``result()`` blocks until they are ready.

    ``dispatched_at`` and ``done_at`` (``time.perf_counter`` seconds) bound the generation;
    ``done_at`` is set by a watcher thread as soon as the device finishes, so the collector can
    measure how busy the device was.
    """

    def __init__(self, finish: Callable[[], Responses], device_output=None):
        self._finish = finish
        self._value: Responses | None = None
        self.dispatched_at = time.perf_counter()
        self.done_at = self.dispatched_at
        self._watcher = None
        if device_output is not None:
            self._watcher = threading.Thread(target=self._watch, args=(device_output,), daemon=True)
            self._watcher.start()

    def _watch(self, device_output) -> None:
        jax.block_until_ready(device_output)
        self.done_at = time.perf_counter()

    def result(self) -> Responses:
        if self._value is None:
            self._value = self._finish()
            if self._watcher is not None:
                self._watcher.join()
        return self._value



def grammar_constraint(grammar: ResponseGrammar, views: Sequence[AgentView], rows: int,
                       max_new_tokens: int, table_shape: tuple[int, int], text_mask
                       ) -> tuple[Any, tuple[int, int]]:
    """The :class:`~hiper_jax.sampling.DecodeConstraint` of ``views`` padded to ``rows`` rows
    (padding rows repeat the first view) and its tables padded to at least ``table_shape``
    (alternatives, depth); returns it with the grown table shape."""
    from hiper_jax.sampling import DecodeConstraint

    tables = grammar.tables(list(views) + [views[0]] * (rows - len(views)), max_new_tokens)
    shape = tuple(max(a, b) for a, b in zip(table_shape, tables.alternatives.shape[1:]))
    alternatives = pad_tables(tables.alternatives, *shape)
    return DecodeConstraint(alternatives, tables.text_budget, text_mask), shape


def host_responses(out, num_prompts: int, grammar: Optional[ResponseGrammar] = None) -> Responses:
    """The first ``num_prompts`` rows of a sampler output (``tokens [B, N]``, ``logprobs
    [B, N]``, ``lengths [B]``), cut to their lengths; with the ``grammar`` that constrained
    them, each position's allowed set."""
    ids, logps, lengths = (np.asarray(x) for x in (out.tokens, out.logprobs, out.lengths))
    allowed = None
    if grammar is not None:
        sets, text_on = np.asarray(out.allowed), np.asarray(out.text_on)
        allowed = [allowed_sets(sets[i, : lengths[i]], text_on[i, : lengths[i]], grammar.text_mask)
                   for i in range(num_prompts)]
    return Responses([ids[i, : lengths[i]] for i in range(num_prompts)],
                     [logps[i, : lengths[i]] for i in range(num_prompts)], allowed)


class LLMPolicy:
    """Samples responses with :func:`hiper_jax.sampling.generate`.

    Prompts are left-padded to a multiple of ``length_multiple`` tokens and the batch is padded
    to ``rows`` rows (or a bucketed count when None). Shapes only grow: a call is padded to the
    longest prompt and the largest grammar table this policy has seen, so a rollout compiles
    the sampler a few times at its start and then never again. With a ``grammar``, each row may
    only answer with a response the grammar admits for its view (its admissible actions, its
    subgoal).

    Args:
      params, config: the policy model.
      sampling: a :class:`hiper_jax.sampling.SamplingConfig`.
      pad_id: padding token id.
      length_multiple: prompt length bucket.
      rows: fixed batch rows (at least the largest prompt batch), or None.
      grammar: a :class:`~hiper_jax.agent.grammar.ResponseGrammar` for constrained decoding.
      mesh: the mesh ``params`` lie on (a host's
        :func:`~hiper_jax.distributed.host_sampling_mesh`, with
        :func:`~hiper_jax.sampling.sampling_copy`), or None (params used where they are).
        With a mesh, the batch rows are rounded up to a multiple of its ``data x fsdp`` shards
        and split over them, and the sampler runs under it, so its activations and KV cache
        follow the model's sharding rules.
    """

    def __init__(self, params, config, sampling, pad_id: int, length_multiple: int = 64,
                 rows: int | None = None, grammar: Optional[ResponseGrammar] = None,
                 mesh: Optional[Mesh] = None):
        self.params = params
        self.config = config
        self.sampling = sampling
        self.pad_id = pad_id
        self.length_multiple = length_multiple
        self.rows = rows
        self.grammar = grammar
        self.mesh = mesh
        self._text_mask = None
        if grammar is not None:
            self._text_mask = (jax.device_put(grammar.text_mask) if mesh is None else
                               distributed.global_from_host_copy(grammar.text_mask, mesh, PartitionSpec()))
        self._prompt_length = 0
        self._table_shape = (1, 1)  # alternatives, depth

    def dispatch(self, prompts: Sequence[Sequence[int]], views: Sequence[AgentView],
                 key: jax.Array) -> Pending:
        from hiper_jax.sampling import generate, pad_prompts

        num_prompts = len(prompts)
        rows = max(self.rows or 0, bucket_size(num_prompts))
        if self.mesh is not None:  # every batch shard gets rows (padding is cheaper than copies)
            shards = distributed.num_batch_shards(self.mesh)
            rows = -(-rows // shards) * shards
        padded = list(prompts) + [list(prompts[0])] * (rows - num_prompts)
        tokens, mask = pad_prompts(padded, self.pad_id, length_multiple=self.length_multiple,
                                   min_length=self._prompt_length)
        self._prompt_length = tokens.shape[1]
        constraint = None
        if self.grammar is not None:
            constraint, self._table_shape = grammar_constraint(
                self.grammar, views, rows, self.sampling.max_new_tokens, self._table_shape,
                self._text_mask)
        if self.mesh is not None:
            tokens, mask = distributed.place_rows((tokens, mask), self.mesh)
            if constraint is not None:
                constraint = constraint._replace(**dict(zip(
                    ("alternatives", "text_budget"),
                    distributed.place_rows((constraint.alternatives, constraint.text_budget), self.mesh))))
        with distributed.on_mesh(self.mesh):
            out = generate(self.params, self.config, tokens, mask, key, self.sampling, constraint)

        return Pending(lambda: host_responses(out, num_prompts, self.grammar if constraint is not None
                                              else None), device_output=out)


class ScriptedPolicy:
    """Answers with ``respond(view) -> text``, tokenized (with the stop token appended)."""

    def __init__(self, respond: Callable[[AgentView], str], tokenizer, stop_id: int | None = None):
        self.respond = respond
        self.tokenizer = tokenizer
        self.stop_id = tokenizer.eos_token_id if stop_id is None else stop_id

    def dispatch(self, prompts: Sequence[Sequence[int]], views: Sequence[AgentView],
                 key: jax.Array) -> Pending:
        del prompts, key
        ids = [np.array(self.tokenizer.encode(self.respond(v), add_special_tokens=False) + [self.stop_id],
                        np.int32) for v in views]
        responses = Responses(ids, [np.zeros(len(i), np.float32) for i in ids])
        return Pending(lambda: responses)
