"""Leaf predicates and the filtering helpers: filter, partition, combine, apply_updates."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _backend

__all__ = [
    "is_array",
    "is_array_like",
    "is_inexact_array",
    "is_inexact_array_like",
    "if_array",
    "filter",
    "partition",
    "combine",
    "apply_updates",
]

_ARRAY_TYPES = (jax.Array, np.ndarray, np.generic)
_PYTHON_NUMBERS = (bool, int, float, complex)


def is_array(element: Any) -> bool:
    """Returns `True` if `element` is a JAX array, a NumPy array or a NumPy scalar.

    Tracers count as JAX arrays.

    ```python
    >>> import jax.numpy as jnp, numpy as np
    >>> is_array(jnp.ones(2)), is_array(np.float32(1)), is_array(1.0)
    (True, True, False)

    ```
    """
    return _backend.is_array_fast(element)


# Filter specs of `is_array` run inside the core, with no Python call per leaf.
_backend.register_array_predicate(is_array)


def is_array_like(element: Any) -> bool:
    """Returns `True` if `element` is a JAX array, NumPy array or scalar, a Python
    `bool`/`int`/`float`/`complex`, or has a `__jax_array__` method.

    ```python
    >>> is_array_like(1.0), is_array_like("a")
    (True, False)

    ```
    """
    return isinstance(element, _ARRAY_TYPES + _PYTHON_NUMBERS) or callable(
        getattr(element, "__jax_array__", None)
    )


def _is_inexact_dtype(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.inexact)


def is_inexact_array(element: Any) -> bool:
    """Returns `True` if `element` is a floating-point or complex JAX/NumPy array.

    ```python
    >>> import jax.numpy as jnp
    >>> is_inexact_array(jnp.ones(2)), is_inexact_array(jnp.arange(2))
    (True, False)

    ```
    """
    return _backend.is_array_fast(element) and _is_inexact_dtype(element.dtype)


def is_inexact_array_like(element: Any) -> bool:
    """Returns `True` if `element` is a floating-point or complex JAX/NumPy array, a Python
    `float`/`complex`, or has a `__jax_array__` method returning one of those.

    ```python
    >>> is_inexact_array_like(1.0), is_inexact_array_like(1)
    (True, False)

    ```
    """
    as_jax_array = getattr(element, "__jax_array__", None)
    if callable(as_jax_array):  # tracers carry the attribute, set to None
        element = as_jax_array()
    if isinstance(element, (float, complex)):
        return True
    return isinstance(element, _ARRAY_TYPES) and _is_inexact_dtype(element.dtype)


class if_array:
    """Returns a callable `leaf -> axis if is_array(leaf) else None`.

    The default `in_axes`/`out_axes` of `filter_vmap` and `filter_pmap` is `if_array(0)`.

    **Arguments:**

    - `axis`: an integer, the axis to use for array leaves.

    **Returns:**

    A callable `leaf -> int | None`. Equal axes give equal (and equally hashed) callables.

    ```python
    >>> import jax.numpy as jnp
    >>> if_array(1)(jnp.ones((2, 3))), if_array(1)("not an array")
    (1, None)

    ```
    """

    __slots__ = ("axis",)

    def __init__(self, axis: int):
        self.axis = axis

    def __call__(self, element: Any) -> int | None:
        return self.axis if _backend.is_array_fast(element) else None

    def __eq__(self, other: object) -> bool:
        return type(other) is if_array and other.axis == self.axis

    def __hash__(self) -> int:
        return hash((if_array, self.axis))

    def __repr__(self) -> str:
        return f"if_array(axis={self.axis!r})"


def filter(
    pytree: Any,
    filter_spec: Any,
    inverse: bool = False,
    replace: Any = None,
    is_leaf: Callable[[Any], bool] | None = None,
) -> Any:
    """Filters out the leaves of a PyTree not satisfying a condition. Those not satisfying
    the condition are replaced with `replace`.

    **Arguments:**

    - `pytree` is any PyTree.
    - `filter_spec` is a PyTree whose structure should be a prefix of the structure of
        `pytree`. Each of its leaves should either be `True` or `False` (keep or drop the
        whole corresponding subtree), or a callable `Leaf -> bool` evaluated on every leaf
        of the corresponding subtree.
    - `inverse` switches the truthy/falsey behaviour: falsey results are kept and truthy
        results are replaced.
    - `replace` is what to replace any falsey leaves with. Defaults to `None`.
    - `is_leaf`: Optional function called at each node of the PyTree; if it returns `True`
        the node is treated as a leaf.

    **Returns:**

    A PyTree of the same structure as `pytree`.

    ```python
    >>> import jax.numpy as jnp
    >>> filter([jnp.array(1.0), "x"], is_array)
    [Array(1., dtype=float32, weak_type=True), None]

    ```
    """
    return _backend.tree_filter(pytree, filter_spec, inverse, replace, is_leaf)


def partition(
    pytree: Any,
    filter_spec: Any,
    replace: Any = None,
    is_leaf: Callable[[Any], bool] | None = None,
) -> tuple[Any, Any]:
    """Splits a PyTree into two pieces. Equivalent to
    `filter(...), filter(..., inverse=True)`, but slightly more efficient.

    **Arguments:** as `filter`.

    **Returns:**

    A pair `(matching, rest)` of PyTrees of the same structure as `pytree`, with `replace`
    where a leaf went to the other side.

    ```python
    >>> import jax.numpy as jnp
    >>> arrays, others = partition({"w": jnp.array(1.0), "act": "relu"}, is_array)
    >>> arrays["act"], others["act"]
    (None, 'relu')

    ```
    """
    return _backend.tree_partition(pytree, filter_spec, replace, is_leaf)


def combine(*pytrees: Any, is_leaf: Callable[[Any], bool] | None = None) -> Any:
    """Combines multiple PyTrees into one PyTree, by replacing `None` leaves.

    **Arguments:**

    - `*pytrees`: a sequence of PyTrees all with the same structure (up to `None`s).
    - `is_leaf`: As `filter`.

    **Returns:**

    A PyTree with the same structure as its inputs. Each leaf is the first non-`None`
    leaf found in the corresponding leaves of `pytrees` as they are iterated over.

    ```python
    >>> combine([1, None, None], [None, 2, None])
    [1, 2, None]

    ```
    """
    return _backend.tree_combine(pytrees, is_leaf)


def apply_updates(model: Any, updates: Any) -> Any:
    """A `jax.tree_util.tree_map`-broadcasted version of
    ```python
    if update is None:
        return model
    else:
        return model + update
    ```

    This is often useful when updating a model's parameters via stochastic gradient
    descent. (This function is essentially the same as `optax.apply_updates`, except that
    it understands `None`.)

    **Arguments:**

    - `model`: An arbitrary PyTree.
    - `updates`: Any PyTree that is a prefix of `model`.

    **Returns:**

    The updated model.

    ```python
    >>> apply_updates([1.0, "relu"], [0.5, None])
    [1.5, 'relu']

    ```
    """
    return _backend.tree_apply_updates(model, updates)
