"""filter_make_jaxpr: `jax.make_jaxpr` for functions of arbitrary PyTrees."""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

import jax

from . import _backend
from ._compile_utils import has_shape_and_dtype, join_output, split_output

__all__ = ["filter_make_jaxpr"]


def _to_struct(leaf: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)


class _MakeJaxpr:
    def __init__(self, fun: Callable):
        self._fun = fun
        functools.update_wrapper(self, fun)

    def __call__(self, /, *args, **kwargs):
        dynamic, key = _backend.flatten_split((args, kwargs), has_shape_and_dtype, hashed=False)

        def traced(*leaves):
            call_args, call_kwargs = _backend.rebuild(key, list(leaves))
            return split_output(self._fun(*call_args, **call_kwargs))

        structs = [_to_struct(leaf) for leaf in dynamic]
        jaxpr, out = jax.make_jaxpr(traced, return_shape=True)(*structs)
        out_key = next(iter(out)).key
        dynamic_out = join_output(out, statics=[None] * out_key.num_static)
        static_out = _backend.rebuild(out_key, [None] * out_key.num_dynamic)
        return jaxpr, dynamic_out, static_out

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        return types.MethodType(self, instance)


def filter_make_jaxpr(fun: Callable[..., Any]) -> Callable[..., tuple[Any, Any, Any]]:
    """As `jax.make_jaxpr`, but accepts arbitrary PyTrees as input and output.

    **Arguments:**

    - `fun`: The function `fun(*arg, **kwargs)` whose jaxpr is to be computed. Its
        positional and keyword arguments may be anything, as can its return value.

    **Returns:**

    A wrapped version of `fun`, that when applied to example arguments `*args, **kwargs`,
    will return a 3-tuple of:

    - A `ClosedJaxpr` representing the evaluation of that function on those arguments.
    - A `PyTree[jax.ShapeDtypeStruct]` representing the output shape and dtype of the
        result (with `None` in place of non-array outputs).
    - A `PyTree[Any]` representing any non-array outputs from `fun` (with `None` in place
        of array outputs).

    The example arguments to be traced may be anything with `.shape` and `.dtype` fields
    (typically JAX arrays, NumPy arrays, or `jax.ShapeDtypeStruct`s). All other arguments
    are treated statically. In particular, Python builtins (`bool`, `int`, `float`,
    `complex`) are treated as static inputs; wrap them in JAX/NumPy arrays if you would
    like them to be traced.

    !!! example

        ```python
        >>> import jax, jax.numpy as jnp
        >>> def f(x, n, name):
        ...     return {"y": x * n, "name": name.upper()}
        >>> x = jax.ShapeDtypeStruct((3,), jnp.float32)
        >>> jaxpr, shapes, statics = filter_make_jaxpr(f)(x, 2, "out")
        >>> shapes["y"], statics["name"]
        (ShapeDtypeStruct(shape=(3,), dtype=float32), 'OUT')
        >>> len(jaxpr.jaxpr.invars)  # only `x` is traced
        1

        ```
    """
    return _MakeJaxpr(fun)
