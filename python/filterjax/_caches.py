"""Every cache filterjax keeps, bounded, and `clear_caches()` to empty them all.

Compiled programs belong to the *function*, not to the wrapper: `filter_jit(f)` and
`filter_pmap(f)` look their program up in a `ProgramCache` keyed on the static part of `f`
(a plain function by identity; a Module, bound method or `functools.partial` by its
static part) and the transform's options, so any number of wrappers around equal
functions share one set of compiled programs. Each cache is a small LRU: creating new
lambdas or ever-changing static values in a loop evicts the least recently used entries
instead of growing without limit.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

# A program stays cached while any wrapper around its function lives (weakly referenced),
# and, after the last one dies, while it is among the MAX_FUNCTIONS most recently used
# (strongly referenced), so that fresh wrappers made on every call compile nothing. Each
# program keeps at most MAX_SIGNATURES static signatures (argument structures and static
# values) compiled, and at most as many call shapes (positional count and keyword names)
# planned. A compiled CPU program costs ~1.5 MB, so these bound what functions
# that are gone (lambdas made in a loop) can hold to ~50 MB.
MAX_FUNCTIONS = 32
MAX_SIGNATURES = 256

# Objects with a `_clear_cache()` method. Held weakly: a program that goes out of scope
# takes its caches with it.
_owners: weakref.WeakSet = weakref.WeakSet()
_clearers: list[Callable[[], None]] = []


def register_owner(owner) -> None:
    _owners.add(owner)


def register_clearer(clear: Callable[[], None]) -> None:
    _clearers.append(clear)


class ProgramCache:
    """Programs by a hashable description of their function and options.

    Every live program is found (a weak-value map); the MAX_FUNCTIONS most recently used
    are also held strongly, in LRU order. Keys that cannot be hashed (an unhashable option,
    say) are not cached: such a function gets a program of its own for each wrapper.
    """

    def __init__(self, maxsize: int = MAX_FUNCTIONS):
        self.maxsize = maxsize
        self._live: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._recent: OrderedDict = OrderedDict()
        self._lock = threading.RLock()
        register_clearer(self.clear)

    def get_or_create(self, key: Any, create: Callable[[], Any]) -> Any:
        try:
            hash(key)
        except TypeError:
            return create()
        with self._lock:
            found = self._live.get(key)
        if found is None:
            made = create()
            with self._lock:
                found = self._live.setdefault(key, made)  # another thread's, if it won
        with self._lock:
            self._recent[key] = found
            self._recent.move_to_end(key)
            while len(self._recent) > self.maxsize:
                self._recent.popitem(last=False)
        return found

    def __len__(self) -> int:
        return len(self._live)

    def clear(self) -> None:
        with self._lock:
            self._recent.clear()
            self._live.clear()


def bounded_insert(table: dict, key: Any, value: Any) -> None:
    """`table[key] = value`, first forgetting the oldest entries beyond MAX_SIGNATURES."""
    while len(table) >= MAX_SIGNATURES:
        try:
            del table[next(iter(table))]
        except (StopIteration, KeyError, RuntimeError):  # emptied by another thread
            break
    table[key] = value


def clear_caches() -> None:
    """Empty every cache filterjax holds: compiled programs, traces and call plans of every
    transformed function. The next call of each traces and compiles again.

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
