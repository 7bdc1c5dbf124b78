"""Pick the core implementation: the native module if it imports, else the Python twin.

`FILTERJAX_BACKEND=native` or `=python` forces one. The transforms call the core through
this module's globals (`_backend.flatten_split(...)`), so tests can switch backend at
runtime. `Core` is the contract both cores meet (checked by mypy here, by stubtest for
the native module against `_native.pyi`, and by tests/test_architecture.py at run time).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

__all__ = [
    "Core",
    "backend",
    "set_backend",
    "register_array_predicate",
    "flatten_split",
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

_IsLeaf = Callable[[Any], Any] | None


class Core(Protocol):
    """What a core module provides: the per-call PyTree work (see `_native.pyi` for each
    function's full contract)."""

    @property
    def BACKEND(self) -> str: ...  # noqa: N802 - a module constant

    @property
    def StaticKey(self) -> type: ...  # noqa: N802 - a class

    @property
    def Dispatcher(self) -> type: ...  # noqa: N802 - a class

    def is_array(self, x: Any, /) -> bool: ...

    def flatten_split(
        self,
        tree: Any,
        predicate: Callable[[Any], Any] | None = None,
        is_leaf: _IsLeaf = None,
        hashed: bool = True,
    ) -> tuple[list[Any], Any]: ...

    def rebuild(
        self, key: Any, dynamic: Sequence[Any], statics: Sequence[Any] | None = None
    ) -> Any: ...

    def register_array_predicate(self, predicate: Callable[[Any], bool]) -> None: ...

    def dispatcher_subclass(self, bases: tuple[type, ...]) -> type: ...

    def tree_partition(
        self, pytree: Any, filter_spec: Any, replace: Any = None, is_leaf: _IsLeaf = None
    ) -> tuple[Any, Any]: ...

    def tree_filter(
        self,
        pytree: Any,
        filter_spec: Any,
        inverse: Any = False,
        replace: Any = None,
        is_leaf: _IsLeaf = None,
    ) -> Any: ...

    def tree_combine(self, pytrees: tuple[Any, ...], is_leaf: _IsLeaf = None) -> Any: ...

    def tree_apply_updates(self, model: Any, updates: Any) -> Any: ...


def _load(name: str) -> Core:
    core: Core
    if name == "native":
        try:
            from . import _native
        except ImportError as err:
            raise ImportError(_BUILD_HINT) from err
        core = _native
        return core
    if name == "python":
        from . import _pycore

        core = _pycore
        return core
    raise ValueError(f"FILTERJAX_BACKEND must be 'native' or 'python', got {name!r}")


def _choose() -> Core:
    requested = os.environ.get("FILTERJAX_BACKEND", "").strip().lower()
    if requested:
        return _load(requested)
    try:
        return _load("native")
    except ImportError:
        return _load("python")


# Set by `_install` at import; typed here for readers and type checkers.
_core: Core
flatten_split: Callable[..., tuple[list[Any], Any]]
rebuild: Callable[..., Any]
is_array_fast: Callable[[Any], bool]
StaticKey: type
Dispatcher: type
tree_partition: Callable[..., tuple[Any, Any]]
tree_filter: Callable[..., Any]
tree_combine: Callable[..., Any]
tree_apply_updates: Callable[[Any, Any], Any]

# The public layer's array predicate, handed to every core installed (see
# `register_array_predicate`).
_array_predicate: Callable[[Any], bool] | None = None


def register_array_predicate(predicate: Callable[[Any], bool]) -> None:
    """Tell the core (this one and any installed later) that `predicate` answers as its
    own array test, so a filter_spec of `predicate` runs natively, with no call per leaf.

    The public layer calls this at import with `filterjax.is_array`: the cores import
    nothing from it."""
    global _array_predicate
    _array_predicate = predicate
    _core.register_array_predicate(predicate)


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


def _install(core: Core) -> None:
    global _core, flatten_split, rebuild, is_array_fast, StaticKey, Dispatcher
    global tree_partition, tree_filter, tree_combine, tree_apply_updates
    if _array_predicate is not None:
        core.register_array_predicate(_array_predicate)
    _core = core
    flatten_split = core.flatten_split
    rebuild = core.rebuild
    is_array_fast = core.is_array
    StaticKey = core.StaticKey
    Dispatcher = core.Dispatcher
    tree_partition = core.tree_partition
    tree_filter = core.tree_filter
    tree_combine = core.tree_combine
    tree_apply_updates = core.tree_apply_updates


_install(_choose())

if TYPE_CHECKING:
    # Both cores meet the contract.
    from . import _native, _pycore

    _checked: tuple[Core, Core] = (_native, _pycore)
