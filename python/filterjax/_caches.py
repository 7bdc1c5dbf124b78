"""Registry of every cache filterjax keeps, so that `clear_caches()` can empty them all."""

from __future__ import annotations

import weakref
from collections.abc import Callable

# Objects with a `_clear_cache()` method (compiled transforms). Held weakly: a transform
# that goes out of scope takes its caches with it.
_owners: weakref.WeakSet = weakref.WeakSet()
_clearers: list[Callable[[], None]] = []


def register_owner(owner) -> None:
    _owners.add(owner)


def register_clearer(clear: Callable[[], None]) -> None:
    _clearers.append(clear)


def clear_caches() -> None:
    """Empty every cache filterjax holds: compiled programs, traces and call plans of every
    live transformed function. The next call of each traces and compiles again.

    **Returns:**

    Nothing.

    ```python
    >>> import jax.numpy as jnp
    >>> import filterjax
    >>> f = filterjax.filter_jit(lambda x: x + 1)
    >>> _ = f(jnp.ones(2))
    >>> filterjax.clear_caches()
    >>> f(jnp.ones(2))
    Array([2., 2.], dtype=float32)

    ```
    """
    for owner in list(_owners):
        owner._clear_cache()
    for clear in _clearers:
        clear()
