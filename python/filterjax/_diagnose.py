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

__all__ = ["raise_flatten_error", "check_flattenable", "describe_type"]


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
    if issubclass(kind, tuple) and hasattr(node, "_fields"):
        return list(node), [jtu.GetAttrKey(name) for name in node._fields]
    return None


def raise_flatten_error(tree: Any, is_leaf: Any, original: BaseException | None) -> NoReturn:
    """Walk `tree` the way `jax.tree_util` does and raise the first problem found.

    If the walk finds nothing wrong (a flatten function that fails only sometimes),
    `original` is re-raised unchanged.
    """
    check_flattenable(tree, is_leaf)
    if original is not None:
        raise original
    raise RuntimeError("filterjax: flattening failed but no cause could be found")


def check_flattenable(tree: Any, is_leaf: Any) -> None:
    """Walk `tree` the way `jax.tree_util` does and raise the first problem found: a cycle,
    nesting deeper than `sys.getrecursionlimit()`, a malformed node, or an exception from
    `is_leaf` or a flatten function (with a note saying where). Returns if there is none."""
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


# --------------------------------------------------------------------------------------------
# The filtering helpers (`partition`, `filter`, `combine`, `apply_updates`): error paths shared
# by both backends
# --------------------------------------------------------------------------------------------

_STRUCTURE_LEADS = {
    "filter_spec": "filter_spec must be a PyTree prefix of the PyTree being filtered",
    "combine": "combine: every PyTree must have the structure of the first (up to its None "
    "leaves, which may stand for whole subtrees)",
    "updates": "apply_updates: updates must be a PyTree prefix of the model (None stands for "
    "a whole subtree)",
}


def _node_signature(node: Any, registry: dict) -> tuple[str, Any, list, list] | None:
    """(kind, node data, children, key entries) of a PyTree node; None for a leaf."""
    import jax.tree_util as jtu

    kind = type(node)
    if node is None:
        return "None", None, [], []
    if kind is tuple or kind is list:
        return kind.__name__, None, list(node), [jtu.SequenceKey(i) for i in range(len(node))]
    if kind is dict:
        keys = sorted(node)
        return "dict", keys, [node[k] for k in keys], [jtu.DictKey(k) for k in keys]
    if kind is OrderedDict:
        keys = list(node)
        return "OrderedDict", keys, [node[k] for k in keys], [jtu.DictKey(k) for k in keys]
    if kind is defaultdict:
        keys = sorted(node)
        data = (node.default_factory, keys)
        return "defaultdict", data, [node[k] for k in keys], [jtu.DictKey(k) for k in keys]
    entry = registry.get(kind)
    if entry is not None:
        children, aux = entry.to_iter(node)
        children = list(children)
        keys = [jtu.FlattenedIndexKey(i) for i in range(len(children))]
        return describe_type(kind), aux, children, keys
    if issubclass(kind, tuple) and hasattr(node, "_fields"):
        return describe_type(kind), None, list(node), [jtu.GetAttrKey(f) for f in node._fields]
    return None


def _describe_node(sig: tuple | None, node: Any) -> str:
    if sig is None:
        return f"a leaf of type {describe_type(type(node))}"
    if sig[0] == "None":
        return "None"
    return f"a {sig[0]} node with {len(sig[2])} children"


def raise_structure_error(
    kind: str, prefix: Any, tree: Any, is_leaf: Any, index: int, original: BaseException
) -> NoReturn:
    """`tree` does not match `prefix` (a PyTree prefix of it): raise a `ValueError` naming the
    first place where they differ, as `jax.tree_util`'s `flatten_up_to` sees it.

    `kind` is "filter_spec" (None in `prefix` is a node), "combine" (None and `is_leaf`
    nodes of `prefix` are leaves; `tree` is the `index`-th PyTree) or "updates" (None is a
    leaf). If no difference is found, `original` is re-raised.
    """
    registry = _registry()
    none_is_leaf = kind != "filter_spec"
    lead = _STRUCTURE_LEADS[kind]
    if kind == "combine":
        lead = f"{lead}; PyTree #{index} does not"
    stack: list[tuple[Any, Any, list]] = [(prefix, tree, [])]
    while stack:
        p, t, path = stack.pop()
        where = format_path(tuple(path))
        if (p is None and none_is_leaf) or (is_leaf is not None and p is not None and is_leaf(p)):
            continue
        try:
            mine = _node_signature(p, registry)
        except Exception:
            raise original from None
        if mine is None:
            continue
        try:
            theirs = _node_signature(t, registry)
        except Exception as err:
            err.add_note(
                f"filterjax: raised by the flatten function of PyTree node type "
                f"{describe_type(type(t))} at {where}"
            )
            raise
        problem = None
        if theirs is None or type(p) is not type(t):
            problem = f"expected {_describe_node(mine, p)}, got {_describe_node(theirs, t)}"
        elif len(mine[2]) != len(theirs[2]):
            problem = f"expected {_describe_node(mine, p)}, got one with {len(theirs[2])} children"
        else:
            try:
                differs = bool(mine[1] != theirs[1])
            except Exception:
                differs = True
            if differs:
                problem = (
                    f"the {mine[0]} node data differ: expected {mine[1]!r:.200}, "
                    f"got {theirs[1]!r:.200}"
                )
        if problem is not None or theirs is None:
            raise ValueError(f"{lead}: at {where}, {problem}.") from original
        for p_child, t_child, key in zip(
            reversed(mine[2]), reversed(theirs[2]), reversed(mine[3]), strict=True
        ):
            stack.append((p_child, t_child, path + [key]))
    raise original


def bad_filter_spec(spec: Any) -> ValueError:
    """The error for a filter_spec leaf that is neither a bool nor a callable."""
    return ValueError(
        "filter_spec must consist of booleans and callables only, got "
        f"{type(spec).__name__}: {spec!r:.100}"
    )


def note_predicate_error(err: BaseException, tree: Any, index: int, is_leaf: Any) -> None:
    """Name the leaf on which a filter_spec callable raised (the error itself is kept)."""
    from ._errors import leaf_path

    where = format_path(leaf_path(tree, index, is_leaf))
    err.add_note(f"filterjax: raised by the filter_spec callable on the leaf at {where}")
