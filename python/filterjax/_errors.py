"""Exceptions and error-message helpers shared by both backends.

Error paths only: nothing here runs on a successful call.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "UnhashableStaticError",
    "PyTreeCycleError",
    "format_path",
    "leaf_path",
    "node_path",
]


class UnhashableStaticError(TypeError):
    """A leaf treated as static could not be hashed.

    `path` is the leaf's key path (a tuple of `jax.tree_util` key entries) relative to
    the tree that was partitioned and `leaf_type` is its type.
    """

    def __init__(self, message: str, path: tuple = (), leaf_type: type | None = None):
        super().__init__(message)
        self.path = path
        self.leaf_type = leaf_type


class PyTreeCycleError(ValueError):
    """A mutable container holds itself, so the PyTree would be infinitely deep.

    (A PyTree without a cycle but nested `sys.getrecursionlimit()` levels deep or more
    raises a `RecursionError` instead.)"""


def format_path(path: tuple, root: str = "tree") -> str:
    """Render a key path the way `jax.tree_util.keystr` does, after a root name."""
    import jax.tree_util as jtu

    return root + jtu.keystr(tuple(path))


def rename_root(path: tuple, names: tuple[str, ...]) -> str:
    """Render `path` when the partitioned tree was a tuple of named parts.

    `rename_root((SequenceKey(0), SequenceKey(1), DictKey('cfg')), ('args', 'kwargs'))`
    gives `args[1]['cfg']`.
    """
    import jax.tree_util as jtu

    if path and isinstance(path[0], jtu.SequenceKey) and path[0].idx < len(names):
        return format_path(path[1:], names[path[0].idx])
    return format_path(path, "tree")


def leaf_path(tree: Any, index: int, is_leaf: Any = None) -> tuple:
    """Key path of the `index`-th leaf of `tree`, as `jax.tree_util` orders leaves."""
    import jax.tree_util as jtu

    try:
        paths_and_leaves, _ = jtu.tree_flatten_with_path(tree, is_leaf)
        return tuple(paths_and_leaves[index][0])
    except Exception:  # the path is a courtesy; never mask the real error with another
        return ()


def unhashable_static(tree: Any, index: int, leaf: Any, cause: BaseException, is_leaf: Any = None):
    """Build the error for a static leaf whose `__hash__` raised."""
    path = leaf_path(tree, index, is_leaf)
    message = unhashable_message(format_path(path), type(leaf), cause)
    error = UnhashableStaticError(message, path, type(leaf))
    error.__cause__ = cause
    return error


def unhashable_message(where: str, kind: type, cause: BaseException | None) -> str:
    detail = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
    return (
        f"Static leaf at {where} of type {kind.__module__}.{kind.__qualname__} is not "
        f"hashable{detail}. Non-array leaves are held static and must be hashable: make it "
        f"dynamic by wrapping it in an array (jnp.asarray(x)), or make its type hashable "
        f"(define __hash__ and __eq__, or use a frozen dataclass / tuple)."
    )


def node_path(path: list) -> str:
    return format_path(tuple(path))


# Set by both cores on an exception raised while comparing two keys' static leaves: the
# index (among the key's static leaves) of the leaf whose comparison raised.
STATIC_INDEX_ATTR = "_filterjax_static_index"


def static_equality_note(static_index: int, leaf: Any) -> str:
    """The note added to an exception raised by a static leaf's `__eq__` (both backends)."""
    kind = type(leaf)
    # As pyo3's `fully_qualified_name`, which the native core uses for the same note.
    if kind.__module__ in ("builtins", "__main__"):
        name = kind.__qualname__
    else:
        name = f"{kind.__module__}.{kind.__qualname__}"
    return (
        f"filterjax: raised while comparing static leaf #{static_index} (of type {name}) of two "
        "calls' arguments; static leaves need an __eq__ that returns a bool for any other "
        "value of their type"
    )
