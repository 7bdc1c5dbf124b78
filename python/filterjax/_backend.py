"""Pick the core implementation: the native module if it imports, else the Python twin.

`FILTERJAX_BACKEND=native` or `=python` forces one. The transforms call the core through
this module's globals (`_backend.partition(...)`), so tests can switch backend at runtime.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

__all__ = [
    "backend",
    "set_backend",
    "partition",
    "rebuild",
    "is_array_fast",
    "StaticKey",
    "Dispatcher",
    "tree_partition",
    "tree_filter",
    "tree_combine",
    "tree_apply_updates",
]

_BUILD_HINT = (
    "filterjax's native module (filterjax._native) is not available. Build it with "
    "`pip install .` (or `maturin develop --release`) from a checkout, which needs a Rust "
    "toolchain, or unset FILTERJAX_BACKEND / set FILTERJAX_BACKEND=python to use the "
    "pure-Python backend."
)


def _load(name: str) -> ModuleType:
    if name == "native":
        try:
            from . import _native
        except ImportError as err:
            raise ImportError(_BUILD_HINT) from err
        return _native
    if name == "python":
        from . import _pycore

        return _pycore
    raise ValueError(f"FILTERJAX_BACKEND must be 'native' or 'python', got {name!r}")


def _choose() -> ModuleType:
    requested = os.environ.get("FILTERJAX_BACKEND", "").strip().lower()
    if requested:
        return _load(requested)
    try:
        return _load("native")
    except ImportError:
        return _load("python")


# Set by `_install` at import; typed here for readers and type checkers.
_core: ModuleType
partition: Callable[..., tuple[list[Any], Any]]
rebuild: Callable[..., Any]
is_array_fast: Callable[[Any], bool]
StaticKey: type
Dispatcher: type
tree_partition: Callable[..., tuple[Any, Any]]
tree_filter: Callable[..., Any]
tree_combine: Callable[..., Any]
tree_apply_updates: Callable[[Any, Any], Any]


def set_backend(name: str) -> None:
    """Switch the core implementation (`'native'` or `'python'`). Clears filterjax's caches.

    Transformed functions made from then on use the new core; a `filter_jit` or
    `filter_pmap` function made before keeps the core it was made with (its compiled
    programs hold that core's keys), and keeps working.
    """
    _install(_load(name))
    from . import _caches

    _caches.clear_caches()


def backend() -> str:
    """Which core implementation is in use.

    The native (Rust) module is used when it imports, the pure-Python twin otherwise;
    `FILTERJAX_BACKEND=native` or `=python` forces one.

    **Returns:**

    `"native"` or `"python"`.

    ```python
    >>> import filterjax
    >>> filterjax.backend() in ("native", "python")
    True

    ```
    """
    return _core.BACKEND


def _install(core: ModuleType) -> None:
    global _core, partition, rebuild, is_array_fast, StaticKey, Dispatcher
    global tree_partition, tree_filter, tree_combine, tree_apply_updates
    _core = core
    partition = core.partition
    rebuild = core.rebuild
    is_array_fast = core.is_array
    StaticKey = core.StaticKey
    Dispatcher = core.Dispatcher
    tree_partition = core.tree_partition
    tree_filter = core.tree_filter
    tree_combine = core.tree_combine
    tree_apply_updates = core.tree_apply_updates


_install(_choose())
