"""Logical axis names and the one rules table that maps them onto a ``(data, fsdp, tensor)`` mesh.

Every parameter dimension and every sharded activation dimension has a logical name:

=============  =====================================================
``batch``      rows of a batch (activations, KV cache)
``length``     token positions of activations
``cache_length``  slots of the KV cache
``embed``      model width (hidden_size)
``heads``      query heads;  ``kv_heads``: key/value heads
``head_dim``   width of one head
``mlp``        MLP width (intermediate_size)
``vocab``      vocabulary
``layers``     the stacked-layer axis of parameters and cache
``value_heads``  the three critic outputs (low, high, term)
``lora_rank``  the rank dimension of LoRA adapters (replicated: it is small)
=============  =====================================================

:data:`DEFAULT_RULES` maps them onto mesh axes: data and FSDP parallelism over the batch, FSDP
over ``embed`` (every weight matrix has it), tensor parallelism over heads, MLP width and vocab.
A mesh axis that does not divide a dimension (e.g. 2 KV heads on a tensor axis of 4) is dropped
for that array, which then stays replicated along it; mesh axes missing from a mesh are dropped
too, so the same rules work on a one-device mesh, a data-only mesh and a full 3-D mesh.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Optional, Union

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hiper_jax.vocab import MESH_AXES

MeshAxes = Union[None, str, tuple[str, ...]]
AxisRules = tuple[tuple[str, MeshAxes], ...]
LogicalAxes = tuple[Optional[str], ...]

MESH_AXIS_NAMES = MESH_AXES

DEFAULT_RULES: AxisRules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("cache_length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("value_heads", None),
    ("lora_rank", None),
)

_active_rules: list[AxisRules] = [DEFAULT_RULES]


@contextlib.contextmanager
def axis_rules(rules: AxisRules) -> Iterator[None]:
    """Makes ``rules`` the table :func:`constrain` uses while tracing inside the block.

    Jitted functions trace once: enter this block before their first call.
    """
    _active_rules.append(tuple(rules))
    try:
        yield
    finally:
        _active_rules.pop()


def logical_to_spec(axes: Sequence[Optional[str]], rules: AxisRules = DEFAULT_RULES,
                    mesh_shape: Optional[Mapping[str, int]] = None,
                    shape: Optional[Sequence[int]] = None) -> PartitionSpec:
    """The PartitionSpec for an array whose dimensions have logical names ``axes``.

    With ``mesh_shape`` (axis name -> size), mesh axes absent from the mesh are dropped, and with
    ``shape`` too, so are mesh axes that do not divide the dimension. A mesh axis is used at most
    once per array (first dimension wins).
    """
    table = dict(rules)
    used: set[str] = set()
    spec: list[MeshAxes] = []
    for dim, name in enumerate(axes):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no entry in the sharding rules")
        target = table[name]
        candidates = (target,) if isinstance(target, str) else tuple(target or ())
        kept: list[str] = []
        for mesh_axis in candidates:
            if mesh_axis in used:
                continue
            if mesh_shape is not None:
                if mesh_axis not in mesh_shape:
                    continue
                size = math.prod(mesh_shape[a] for a in kept) * mesh_shape[mesh_axis]
                if shape is not None and shape[dim] % size:
                    continue
            kept.append(mesh_axis)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def single_device_mesh() -> Mesh:
    """The default mesh: the first device, with all three axes of size 1."""
    return jax.make_mesh((1, 1, 1), MESH_AXIS_NAMES, devices=jax.devices()[:1],
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)


def named_shardings(axes_tree: Any, shapes_tree: Any, mesh: Mesh,
                    rules: AxisRules = DEFAULT_RULES) -> Any:
    """NamedShardings for a pytree of logical axes (tuples) with a matching pytree of shapes."""
    mesh_shape = dict(mesh.shape)
    return jax.tree.map(
        lambda axes, shape: NamedSharding(mesh, logical_to_spec(axes, rules, mesh_shape, shape)),
        axes_tree, shapes_tree, is_leaf=_is_axes)


def constrain(x: jax.Array, axes: LogicalAxes) -> jax.Array:
    """Sharding hint for an activation inside jit; a no-op unless a mesh is set (``jax.set_mesh``;
    the trainer's passes and update run under :func:`hiper_jax.distributed.on_mesh`).

    Only meshes whose axes are all ``Auto`` get hints: under ``Explicit`` axes the sharding is
    part of the array type and propagates by itself.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or any(t != jax.sharding.AxisType.Auto for t in mesh.axis_types):
        return x
    spec = logical_to_spec(axes, _active_rules[-1], dict(mesh.shape), x.shape)
    return jax.lax.with_sharding_constraint(x, spec)


def _is_axes(node: Any) -> bool:
    return isinstance(node, tuple) and all(a is None or isinstance(a, str) for a in node)
