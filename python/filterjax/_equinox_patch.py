"""Opt-in: make `equinox.filter_*` resolve to filterjax's transforms.

Equinox is imported here only, and only when `patch_equinox` is called: filterjax itself
never depends on it.
"""

from __future__ import annotations

import importlib
import threading
from types import TracebackType
from typing import Any

from ._exports import LAZY_EXPORTS

__all__ = ["patch_equinox", "unpatch_equinox", "PATCHABLE_NAMES"]


# Equinox's public filtered transformations that filterjax provides under the same name:
# every filter_* name filterjax exports.
PATCHABLE_NAMES = tuple(name for name in LAZY_EXPORTS if name.startswith("filter_"))

_lock = threading.RLock()
# name -> Equinox's own object, for every name currently patched. Empty when unpatched.
_originals: dict[str, Any] = {}


class EquinoxPatch:
    """What `patch_equinox` returns: the names it replaced, and a context manager.

    Leaving the `with` block undoes the patch if this call applied it (a `with` block
    nested inside an already patched program leaves the patch in place).
    """

    def __init__(self, names: tuple[str, ...], applied: bool):
        self.names = names
        self._applied = applied

    def __enter__(self) -> EquinoxPatch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._applied:
            unpatch_equinox()

    def __repr__(self) -> str:
        return f"<filterjax.patch_equinox: {len(self.names)} names>"


def _filterjax_transform(name: str) -> Any:
    """filterjax's `name`, or None if its module is not available."""
    filterjax = importlib.import_module("filterjax")
    try:
        return getattr(filterjax, name)
    except (AttributeError, ImportError):
        return None


def patch_equinox() -> EquinoxPatch:
    """Make Equinox's filtered transformations resolve to filterjax's.

    After this call, `equinox.filter_jit`, `equinox.filter_grad`, `equinox.filter_vmap`
    and every other public `equinox.filter_*` transformation that filterjax implements
    are filterjax's, so a program written against Equinox gets filterjax's speed by adding
    one line. Everything else in Equinox (`eqx.Module`, `eqx.nn`, `eqx.tree_at`,
    `eqx.apply_updates`, ...) is left alone.

    The patch replaces the attributes of the `equinox` module, so it reaches code that
    looks the names up as `eqx.filter_jit` when it runs. Names bound earlier with
    `from equinox import filter_jit`, and functions already decorated, keep Equinox's
    version. Call it before the program builds its jitted functions.

    Calling it again while patched does nothing. `unpatch_equinox` puts Equinox's own
    functions back.

    **Arguments:**

    Nothing.

    **Returns:**

    An object whose `.names` is the tuple of the names that now resolve to filterjax's.
    It is also a context manager: `with filterjax.patch_equinox(): ...` undoes the patch
    on leaving the block (unless Equinox was already patched when the block began).

    Raises `ImportError` if Equinox is not installed.

    !!! example

        ```python
        >>> import equinox as eqx
        >>> import filterjax
        >>> original = eqx.filter_jit
        >>> patch = filterjax.patch_equinox()
        >>> eqx.filter_jit is filterjax.filter_jit
        True
        >>> "filter_jit" in patch.names
        True
        >>> filterjax.unpatch_equinox()
        >>> eqx.filter_jit is original
        True
        >>> with filterjax.patch_equinox():
        ...     eqx.filter_jit is filterjax.filter_jit
        True
        >>> eqx.filter_jit is original
        True

        ```
    """
    equinox = importlib.import_module("equinox")
    with _lock:
        if _originals:
            return EquinoxPatch(tuple(_originals), applied=False)
        replacements = {}
        for name in PATCHABLE_NAMES:
            if name not in vars(equinox):
                continue  # this Equinox version has no such name: don't invent one
            ours = _filterjax_transform(name)
            if ours is not None:
                replacements[name] = ours
        for name, ours in replacements.items():
            _originals[name] = vars(equinox)[name]
            setattr(equinox, name, ours)
        return EquinoxPatch(tuple(replacements), applied=bool(replacements))


def unpatch_equinox() -> None:
    """Undo `patch_equinox`: Equinox's own filtered transformations are restored.

    Does nothing if Equinox is not patched (or not imported).

    **Arguments:**

    Nothing.

    **Returns:**

    Nothing.

    !!! example

        ```python
        >>> import equinox as eqx
        >>> import filterjax
        >>> original = eqx.filter_grad
        >>> _ = filterjax.patch_equinox()
        >>> filterjax.unpatch_equinox()
        >>> eqx.filter_grad is original
        True

        ```
    """
    with _lock:
        if not _originals:
            return
        equinox = importlib.import_module("equinox")
        for name, original in _originals.items():
            setattr(equinox, name, original)
        _originals.clear()
