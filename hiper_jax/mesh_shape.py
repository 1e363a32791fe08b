"""Mesh sizes from settings, without JAX: ``mesh`` (:func:`resolve_mesh_shape`) and a host's
sampling mesh ``sampling.mesh`` (:func:`host_mesh_shape`). Used by :mod:`hiper_jax.distributed`
to build meshes, and by the config checks and :mod:`hiper_jax.memory_plan`, which import no JAX.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np


def resolve_mesh_shape(
    num_devices: int, data: int = -1, fsdp: int = 1, tensor: int = 1, field: str = "mesh"
) -> tuple[int, int, int]:
    """The ``(data, fsdp, tensor)`` sizes for ``num_devices``, with one ``-1`` filled in.

    Raises ValueError naming the field (``field.data`` etc.) when a size is not a positive int
    (or -1), when more than one is -1, or when the sizes do not use exactly ``num_devices``
    devices.
    """
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    for name, size in sizes.items():
        if not _is_int(size) or (size < 1 and size != -1):
            raise ValueError(f"{field}.{name} must be a positive int or -1 (the rest), got {size!r}")
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"at most one {field} axis may be -1, got -1 for {free}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    layout = " x ".join(f"{name}={size}" for name, size in sizes.items())
    if free:
        if num_devices % fixed:
            raise ValueError(
                f"{field} {layout}: the fixed axes use {fixed} devices, which does not divide the "
                f"{num_devices} available devices, so {field}.{free[0]}=-1 cannot take the rest"
            )
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(
            f"{field} {layout} uses {fixed} devices but {num_devices} are available; change "
            f"{field}.data, {field}.fsdp or {field}.tensor, or set one of them to -1 (the rest)"
        )
    return int(sizes["data"]), int(sizes["fsdp"]), int(sizes["tensor"])


def _is_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer))


def host_mesh_shape(num_local: int, data: int = -1, fsdp: int = 1, tensor: int = 1,
                    kv_heads: Optional[int] = None) -> tuple[int, int, int]:
    """The ``(data, fsdp, tensor)`` sizes of a sampling mesh over one host's ``num_local``
    devices (the ``sampling.mesh`` setting): like :func:`resolve_mesh_shape` (one ``-1`` takes
    the rest), and ``tensor=0`` picks the largest tensor size that divides both the devices the
    fixed sizes leave and the model's ``kv_heads``, so the KV cache splits over ``tensor``
    instead of being replicated along it; then ``data`` or ``fsdp`` (whichever is -1) takes the
    remaining devices.

    Raises ValueError naming the ``sampling.mesh`` field.
    """
    if _is_int(tensor) and tensor == 0:
        if kv_heads is None or not _is_int(kv_heads) or kv_heads < 1:
            raise ValueError("sampling.mesh.tensor=0 (auto) needs the model's number of KV heads "
                             f"(a positive int), got kv_heads={kv_heads!r}")
        if -1 not in (data, fsdp):
            raise ValueError(
                "sampling.mesh.tensor=0 (auto) needs sampling.mesh.data or sampling.mesh.fsdp to "
                f"be -1 (it takes the devices tensor leaves), got data={data!r}, fsdp={fsdp!r}")
        for name, size in (("data", data), ("fsdp", fsdp)):
            if not _is_int(size) or (size < 1 and size != -1):
                raise ValueError(f"sampling.mesh.{name} must be a positive int or -1 (the rest), "
                                 f"got {size!r}")
        fixed = math.prod(size for size in (data, fsdp) if size != -1)
        if num_local % fixed:
            raise ValueError(f"sampling.mesh data={data} x fsdp={fsdp}: the fixed sizes use {fixed} "
                             f"devices, which does not divide this host's {num_local} devices")
        tensor = math.gcd(num_local // fixed, int(kv_heads))
    elif not _is_int(tensor) or (tensor < 1 and tensor != -1):
        raise ValueError(f"sampling.mesh.tensor must be a positive int, -1 (the rest) or 0 (auto: "
                         f"the largest size dividing the KV heads), got {tensor!r}")
    return resolve_mesh_shape(num_local, data, fsdp, tensor, field="sampling.mesh")
