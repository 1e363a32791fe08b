"""Shape and dtype checks for the arrays that cross the package's public boundaries (on chex).

Every check reads only ``.shape`` and ``.dtype``. Under ``jit``, ``vmap`` or ``shard_map`` it
runs once while tracing, on the abstract (per-example, per-shard) shapes, and adds nothing to
the compiled program. A failure raises ``ValueError``: chex's diagnosis, then in brackets the
argument's name and what was promised, e.g.::

    ValueError: [Chex] Assertion assert_rank failed: ... input 0 has rank 1 (shape (5,)) but
    expected 2. [rewards must have shape [B, T]]

Arguments are passed by keyword, so the keyword is the name the message gives; ``None``
(an optional input left out) is skipped. Dtype kinds are chex's: ``float`` is any floating
dtype, ``int`` any integer one (signed or not), ``bool`` bool.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import chex
import numpy as np

Rank = Union[int, set]


def _given(arrays: dict[str, Any]) -> list[tuple[str, Any]]:
    """The non-None ``(name, array)`` pairs, lists and scalars as NumPy arrays (chex would read
    a list as several inputs)."""
    return [(name, x if hasattr(x, "shape") else np.asarray(x))
            for name, x in arrays.items() if x is not None]


def check_rank(rank: Rank, spec: str, /, **arrays: Optional[Any]) -> None:
    """Each array has rank ``rank`` (an int or a set of allowed ranks); ``spec`` is the promised
    shape as the docs write it (``"[B, T]"``)."""
    for name, x in _given(arrays):
        chex.assert_rank(x, rank, custom_message=f"{name} must have shape {spec}",
                         exception_type=ValueError)


def check_shape(shape: Sequence[Optional[int]], spec: str, /, **arrays: Optional[Any]) -> None:
    """Each array has shape ``shape`` (``None`` entries match any size)."""
    for name, x in _given(arrays):
        chex.assert_shape(x, tuple(shape),
                          custom_message=f"{name} must have shape {spec} = {tuple(shape)}",
                          exception_type=ValueError)


def check_same_shape(**arrays: Optional[Any]) -> Optional[tuple[int, ...]]:
    """All arrays share the first one's shape; returns it (None when every array is None)."""
    given = _given(arrays)
    if not given:
        return None
    first_name, first = given[0]
    for name, x in given[1:]:
        chex.assert_equal_shape(
            [first, x], exception_type=ValueError,
            custom_message=f"{name} has shape {tuple(x.shape)}, but {first_name} has shape "
                           f"{tuple(first.shape)}; they must match")
    return tuple(first.shape)


def check_type(kind: type, **arrays: Optional[Any]) -> None:
    """Each array's dtype is of ``kind`` (``float``, ``int`` or ``bool``)."""
    article = "an" if kind.__name__[0] in "aeiou" else "a"
    for name, x in _given(arrays):
        chex.assert_type(x, kind, custom_message=f"{name} must have {article} {kind.__name__} dtype",
                         exception_type=ValueError)


def check_flags(**arrays: Optional[Any]) -> None:
    """Each array holds 0/1 flags: a bool or an integer dtype (not float)."""
    for name, x in _given(arrays):
        if x.dtype != np.bool_:
            chex.assert_type(x, int, custom_message=f"{name} must have a bool or integer dtype",
                             exception_type=ValueError)
