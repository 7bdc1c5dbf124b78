"""filter_eval_shape: `jax.eval_shape` for functions of arbitrary Python objects."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from . import _backend
from ._compile_utils import callable_as_tree, is_array_or_struct, join_output, split_output

__all__ = ["filter_eval_shape"]


def filter_eval_shape(fun: Callable[..., Any], *args, **kwargs) -> Any:
    """As `jax.eval_shape`, but allows any Python object as inputs and outputs.

    (`jax.eval_shape` is constrained to only work with JAX arrays, Python float/int/etc.)

    **Arguments:**

    - `fun`: the function to evaluate abstractly. It may itself be a PyTree holding
        arrays (e.g. a `functools.partial` or a model's bound method).
    - `*args`, `**kwargs`: its arguments. JAX/NumPy arrays and `jax.ShapeDtypeStruct`s
        are traced; everything else is passed through as it is.

    **Returns:**

    `fun(*args, **kwargs)` with every array replaced by a `jax.ShapeDtypeStruct`;
    non-array outputs are returned as they are. Nothing is computed.

    !!! example

        ```python
        >>> import jax.numpy as jnp
        >>> out = filter_eval_shape(lambda x, tag: (x @ x.T, tag), jnp.ones((2, 3)), "t")
        >>> out
        (ShapeDtypeStruct(shape=(2, 2), dtype=float32), 't')

        ```
    """
    dynamic, key = _backend.flatten_split(
        (callable_as_tree(fun), args, kwargs), is_array_or_struct, hashed=False
    )

    def traced(*leaves):
        call_fun, call_args, call_kwargs = _backend.rebuild(key, list(leaves))
        return split_output(call_fun(*call_args, **call_kwargs))

    return join_output(jax.eval_shape(traced, *dynamic))
