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
    """Empty every cache filterjax holds (compiled programs, call plans, traces)."""
    for owner in list(_owners):
        owner._clear_cache()
    for clear in _clearers:
        clear()
