"""filter_shard: place (outside a trace) or constrain (inside one) the array leaves."""

from __future__ import annotations

from typing import Any

import jax
import jax.tree_util as jtu

from . import _backend
from ._compat import explicit_axis_type

__all__ = ["filter_shard"]

_Tracer = jax.core.Tracer


def filter_shard(x: Any, device_or_shardings: Any) -> Any:
    """Filtered transform combining `jax.lax.with_sharding_constraint` and
    `jax.device_put`.

    Enforces sharding within a JIT'd computation (that is, how an array is split between
    multiple devices, i.e. multiple GPUs/TPUs), or outside a JIT'd region moves `x` to a
    device.

    **Arguments:**

    - `x`: A PyTree, with potentially a mix of arrays and non-arrays on the leaves. Only
        the arrays are moved or constrained; the other leaves are returned unchanged.
    - `device_or_shardings`: Either a single device (e.g. CPU or GPU) or a PyTree of
        sharding specifications. The structure should be a prefix of `x`.

    **Returns:**

    A copy of `x` with the specified sharding constraints.

    !!! example

        ```python
        >>> import jax, jax.numpy as jnp
        >>> mesh = jax.make_mesh((1,), ("data",))
        >>> sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        >>> model = {"w": jnp.ones(4), "activation": "relu"}
        >>> placed = filter_shard(model, sharding)
        >>> placed["w"].sharding == sharding, placed["activation"]
        (True, 'relu')

        ```
    """
    if isinstance(device_or_shardings, jax.Device):
        device_or_shardings = jax.sharding.SingleDeviceSharding(device_or_shardings)
    dynamic, key = _backend.flatten_split(x, hashed=False)
    if not dynamic:
        return x
    traced = any(isinstance(leaf, _Tracer) for leaf in dynamic)
    if isinstance(device_or_shardings, jax.sharding.Sharding):
        # One sharding for every array: no need to line a tree up against `x`.
        placed = _place(dynamic, device_or_shardings, traced)
    else:
        arrays_only = _backend.rebuild(key, dynamic, [None] * key.num_static)
        placed = jtu.tree_leaves(_place(arrays_only, device_or_shardings, traced))
    return _backend.rebuild(key, placed)


def _place(tree: Any, shardings: Any, traced: bool) -> Any:
    if not traced:
        return jax.device_put(tree, shardings)
    if _names_explicit_axes(shardings):
        # Explicit mesh axes (the `jax.make_mesh` default) are part of the array's type:
        # JAX changes them with `reshard`, not with a constraint.
        return jax.sharding.reshard(tree, shardings)
    return jax.lax.with_sharding_constraint(tree, shardings)


def _names_explicit_axes(shardings: Any) -> bool:
    for sharding in jtu.tree_leaves(shardings):
        mesh = getattr(sharding, "mesh", None)
        types = getattr(mesh, "axis_types", ())
        if explicit_axis_type is not None and any(kind == explicit_axis_type for kind in types):
            return True
    return False
