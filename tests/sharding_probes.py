"""Probes for sharding tests: what the model's activation hints became after compilation, what
a jitted step received, and how many times a jitted function compiled."""

from __future__ import annotations

import collections
import contextlib

import jax
from hiper_jax.models import sharding

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax.monitoring event


@contextlib.contextmanager
def activation_shardings(monkeypatch):
    """Records ``(logical axes, shape, sharding)`` of every activation the model hints with
    :func:`hiper_jax.models.sharding.constrain` in functions traced inside the block, as XLA
    placed it (``jax.debug.inspect_array_sharding``; reported when the function compiles)."""
    seen = []
    real = sharding.constrain

    def probe(x, axes):
        y = real(x, axes)
        jax.debug.inspect_array_sharding(y, callback=lambda s, a=axes, shape=x.shape: seen.append((a, shape, s)))
        return y

    monkeypatch.setattr(sharding, "constrain", probe)
    yield seen
    monkeypatch.setattr(sharding, "constrain", real)


@contextlib.contextmanager
def compile_counts():
    """``Counter`` of backend compilations by function name while the block runs."""
    counts: collections.Counter = collections.Counter()

    def listener(event, duration, **kwargs):
        del duration
        if event == BACKEND_COMPILE_EVENT:
            counts[kwargs.get("fun_name", "")] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def compiles_of(counts, name: str) -> int:
    """Compilations of functions whose name contains ``name``."""
    return sum(n for fun, n in counts.items() if name in fun)


def rules_sharding(mesh, axes, shape):
    """The NamedSharding the default logical-axis rules give an array of ``shape``."""
    return jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(axes, sharding.DEFAULT_RULES,
                                                                     dict(mesh.shape), shape))
