"""Find out why a PyTree could not be flattened, and say so clearly.

Both backends call `raise_flatten_error` once flattening has failed, so a bad tree gets the
same exception and message whichever backend is in use. The walk is iterative (an explicit
stack) so that a tree nested deeper than the recursion limit, or one that contains itself,
is reported rather than crashing the walker too.
"""

from __future__ import annotations

import sys
from collections import OrderedDict, defaultdict
from typing import Any, NoReturn

from ._errors import PyTreeCycleError, format_path

__all__ = ["raise_flatten_error", "describe_type"]


def describe_type(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


class _MalformedNode(ValueError):
    """A node's flatten result (or dict keys) breaks the PyTree rules."""


def _registry() -> dict:
    from jax._src import tree_util

    return tree_util._registry


def _children_of(node: Any, registry: dict, where: str) -> tuple[list, list] | None:
    """(children, key entries) of one node, or None for a leaf. Raises on a bad node."""
    import jax.tree_util as jtu

    kind = type(node)
    if node is None:
        return [], []
    if kind is tuple or kind is list:
        return list(node), [jtu.SequenceKey(i) for i in range(len(node))]
    if kind is dict or kind is defaultdict or kind is OrderedDict:
        if kind is OrderedDict:
            keys = list(node)
        else:
            try:
                keys = sorted(node)
            except Exception as err:
                raise _MalformedNode(
                    f"Cannot sort the keys of the {kind.__name__} at {where}: {err}. PyTree "
                    "dicts need keys that can be ordered with each other."
                ) from err
        return [node[k] for k in keys], [jtu.DictKey(k) for k in keys]
    entry = registry.get(kind)
    if entry is not None:
        result = entry.to_iter(node)
        if not (isinstance(result, tuple) and len(result) == 2):
            raise _MalformedNode(
                f"The flatten function registered for PyTree node type {describe_type(kind)} "
                f"(at {where}) must return a (children, aux_data) pair; got {result!r:.200}."
            )
        try:
            children = list(result[0])
        except TypeError as err:
            raise _MalformedNode(
                f"The flatten function registered for PyTree node type {describe_type(kind)} "
                f"(at {where}) returned children that are not iterable: {result[0]!r:.200}."
            ) from err
        return children, [jtu.FlattenedIndexKey(i) for i in range(len(children))]
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        return list(node), [jtu.GetAttrKey(name) for name in node._fields]
    return None


def raise_flatten_error(tree: Any, is_leaf: Any, original: BaseException | None) -> NoReturn:
    """Walk `tree` the way `jax.tree_util` does and raise the first problem found.

    If the walk finds nothing wrong (a flatten function that fails only sometimes),
    `original` is re-raised unchanged.
    """
    registry = _registry()
    limit = sys.getrecursionlimit()
    # Each stack entry: (node, path, ids of the containers from the root down to node).
    stack: list[tuple[Any, list, tuple]] = [(tree, [], ())]
    while stack:
        node, path, ancestors = stack.pop()
        where = format_path(tuple(path))
        if is_leaf is not None:
            try:
                if is_leaf(node):
                    continue
            except Exception as err:
                err.add_note(f"filterjax: raised by is_leaf at {where}")
                raise
        if id(node) in ancestors and node is not None:
            raise PyTreeCycleError(
                f"PyTree contains a cycle: the {type(node).__name__} at {where} contains "
                "itself, so the tree would be infinitely deep."
            )
        if len(path) >= limit:
            raise RecursionError(
                f"PyTree is nested deeper than the recursion limit ({limit}) at "
                f"{format_path(tuple(path[:8]))}...; flattening it would overflow the stack."
            )
        try:
            found = _children_of(node, registry, where)
        except _MalformedNode:
            raise
        except Exception as err:
            err.add_note(
                f"filterjax: raised by the flatten function of PyTree node type "
                f"{describe_type(type(node))} at {where}"
            )
            raise
        if found is None:
            continue
        children, keys = found
        inner = ancestors + (id(node),)
        for child, key in zip(reversed(children), reversed(keys), strict=True):
            stack.append((child, path + [key], inner))
    if original is not None:
        raise original
    raise RuntimeError("filterjax: flattening failed but no cause could be found")
