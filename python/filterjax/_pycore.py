"""Pure-Python twin of `filterjax._native`.

Same functions, same results, same errors as the Rust module. It leans on
`jax.tree_util` (itself C++) for the flatten, so it is also the reference the native
module is tested against.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from itertools import compress
from types import MethodType
from typing import Any

import jax
import jax.tree_util as jtu
import numpy as np
from jax._src import tree_util as _jax_tree_util

from ._diagnose import (
    bad_filter_spec,
    check_flattenable,
    note_predicate_error,
    raise_flatten_error,
    raise_structure_error,
)
from ._errors import STATIC_INDEX_ATTR, static_equality_note, unhashable_static
from ._plans import apply_plan

__all__ = [
    "StaticKey",
    "Dispatcher",
    "flatten_split",
    "rebuild",
    "is_array",
    "BACKEND",
    "tree_partition",
    "tree_filter",
    "tree_combine",
    "tree_apply_updates",
    "dispatcher_subclass",
    "register_array_predicate",
]

BACKEND = "python"

_ARRAY_BASES = (jax.Array, np.ndarray, np.generic)
# type -> is it an array type. `isinstance` against the `jax.Array` ABC is slow; the answer
# only depends on the type, so remember it.
_array_types: dict[type, bool] = {}
# jax's node registry (type -> flatten/unflatten); later registrations land in it too.
_tree_registry: Any = _jax_tree_util._registry
# The same registry with None as a leaf (as `is_leaf=lambda x: x is None`, with no Python
# call per node).
_none_leaf_registry: Any = _jax_tree_util.none_leaf_registry


def is_array(x: Any) -> bool:
    """True for JAX arrays (tracers included), NumPy arrays and NumPy scalars."""
    kind = type(x)
    known = _array_types.get(kind)
    if known is None:
        known = _array_types[kind] = isinstance(x, _ARRAY_BASES)
    return known


class StaticKey:
    """Everything about a partitioned PyTree except its dynamic leaves.

    Holds the structure, the static leaves and which leaf positions are dynamic. Equal
    structure and equal (same-typed) static leaves give equal keys with equal hashes.
    """

    __slots__ = ("_treedef", "_statics", "_static_types", "_mask", "_num_dynamic", "_hash")

    def __init__(self, treedef, statics: tuple, mask: tuple, num_dynamic: int):
        self._treedef = treedef
        self._statics = statics
        self._static_types = tuple(map(type, statics))
        self._mask = mask
        self._num_dynamic = num_dynamic
        self._hash: int | None = None

    @property
    def num_leaves(self) -> int:
        return len(self._mask)

    @property
    def num_dynamic(self) -> int:
        return self._num_dynamic

    @property
    def num_static(self) -> int:
        return len(self._statics)

    @property
    def statics(self) -> tuple:
        return self._statics

    @property
    def mask(self) -> tuple:
        return self._mask

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash((self._treedef, self._mask, self._statics))
        return self._hash

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if type(other) is not StaticKey:
            return NotImplemented
        if self._hash is not None and other._hash is not None and self._hash != other._hash:
            return False
        return (
            self._mask == other._mask
            and self._static_types == other._static_types
            and self._treedef == other._treedef
            and _statics_equal(self._statics, other._statics)
        )

    def __repr__(self) -> str:
        return (
            f"StaticKey({self._treedef}, statics={self._statics!r}, "
            f"num_dynamic={self._num_dynamic})"
        )


def _statics_equal(mine: tuple, theirs: tuple) -> bool:
    try:
        return mine == theirs
    except Exception as err:
        for index, (x, y) in enumerate(zip(mine, theirs, strict=True)):
            if x is y:
                continue
            try:
                if not x == y:
                    return False
            except Exception as leaf_err:
                leaf_err.add_note(static_equality_note(index, x))
                setattr(leaf_err, STATIC_INDEX_ATTR, index)
                raise
        raise err


class _NodeTypes(dict):
    """type -> whether `jax.tree_util` may flatten its instances as a node (a registered
    type, or a tuple subclass that may be a namedtuple). Filled on first sight of a type,
    emptied by `_nesting` when the registry changes size (a registration made since)."""

    registry_size = -1

    def __missing__(self, kind: type) -> bool:
        answer = kind in _tree_registry or issubclass(kind, tuple)
        if len(self) < 4096:
            self[kind] = answer
        return answer


_node_types = _NodeTypes()


def _nesting(tree: Any, limit: int) -> int:
    """Depth of the deepest node of `tree` as `jax.tree_util` flattens it (without
    `is_leaf`; the root is at depth 0), or -1 if a node, leaf or not, sits `limit` deep (as in
    any tree that contains itself) or a flatten function raises. Leaves are skipped at C
    speed."""
    registry = _tree_registry
    if _node_types.registry_size != len(registry):
        _node_types.clear()
        _node_types.registry_size = len(registry)
    is_node = _node_types.__getitem__
    deepest = 0
    stack = [(tree, 0)]
    pop = stack.pop
    push = stack.append
    try:
        while stack:
            node, depth = pop()
            kind = type(node)
            if kind is list or kind is tuple:
                children: Any = node
            elif kind is dict:
                children = node.values()
            elif kind in registry:
                if node is None:
                    continue
                if isinstance(node, dict):  # OrderedDict, defaultdict
                    children = node.values()
                else:
                    children = registry[kind].to_iter(node)[0]
                    if type(children) is not list and type(children) is not tuple:
                        children = list(children)
            elif issubclass(kind, tuple) and hasattr(node, "_fields"):
                children = node
            else:
                continue
            depth += 1
            if not children:
                continue
            if depth >= limit:
                return -1
            if depth > deepest:
                deepest = depth
            for child in compress(children, map(is_node, map(type, children))):
                push((child, depth))
    except Exception:
        return -1
    return deepest


class _Headroom:
    """Lets jax's flatten recurse `depth` levels below the caller whatever the caller's own
    depth, by raising the recursion limit for the duration if needed."""

    __slots__ = ("_previous", "_wanted")

    def __init__(self, depth: int, limit: int):
        self._previous = limit
        self._wanted = limit + depth + 64

    def __enter__(self) -> None:
        sys.setrecursionlimit(self._wanted)

    def __exit__(self, *exc: object) -> None:
        sys.setrecursionlimit(self._previous)


# Trees at most this deep are flattened by jax with no check of the recursion headroom.
_SHALLOW = 32


def _guarded_flatten(
    flatten: Callable, tree: Any, is_leaf: Any, given_is_leaf: Any, whole: Any = None
):
    """`flatten(tree, is_leaf)` by jax's C++ flatten, never letting it fail from the depth
    of the tree.

    An exception raised inside jaxlib's recursive flatten leaves the interpreter's recursion
    counter short by the depth it was raised at, so a tree that contains itself, or is
    nested up to the recursion limit, would leave the interpreter unable to call anything.
    The tree's depth is measured first (the nodes only, not the leaves); a cycle or a tree
    too deep is reported with its path by `check_flattenable`, a deep tree gets the headroom
    it needs. Errors name paths in `whole` (by default `tree`), of which `tree` is a
    subtree, and `given_is_leaf` is the caller's `is_leaf`.
    """
    if whole is None:
        whole = tree
    limit = sys.getrecursionlimit()
    depth = _nesting(tree, limit)
    if depth < 0:
        # Raises the problem with its path, unless `is_leaf` stops the walk before it.
        check_flattenable(whole, given_is_leaf)
        depth = limit
    try:
        if depth <= _SHALLOW:
            return flatten(tree, is_leaf)
        with _Headroom(depth, limit):
            return flatten(tree, is_leaf)
    except Exception as err:
        raise_flatten_error(whole, given_is_leaf, err)


def _flatten(tree: Any, is_leaf: Callable[[Any], bool] | None):
    return _guarded_flatten(jtu.tree_flatten, tree, is_leaf, is_leaf)


def flatten_split(
    tree: Any,
    predicate: Callable[[Any], bool] | None = None,
    is_leaf: Callable[[Any], bool] | None = None,
    hashed: bool = True,
) -> tuple[list, StaticKey]:
    """Flatten `tree` and split its leaves into dynamic and static.

    **Arguments:**

    - `tree`: any PyTree.
    - `predicate`: `leaf -> bool`, True for a dynamic leaf. `None` means "is an array"
        (JAX array, tracer, NumPy array or scalar) and takes the fast path.
    - `is_leaf`: as in `jax.tree_util.tree_flatten`.
    - `hashed`: hash the key now, so that an unhashable static leaf is reported here with
        its path. With `False` the key is hashed on first use, if ever.

    **Returns:**

    `(dynamic_leaves, key)`: the dynamic leaves in `jax.tree_util` order, and the
    `StaticKey` from which `rebuild` restores the tree.
    """
    leaves, treedef = _flatten(tree, is_leaf)
    test = is_array if predicate is None else predicate
    dynamic = []
    statics = []
    mask = []
    for leaf in leaves:
        if test(leaf):
            dynamic.append(leaf)
            mask.append(True)
        else:
            statics.append(leaf)
            mask.append(False)
    key = StaticKey(treedef, tuple(statics), tuple(mask), len(dynamic))
    if hashed:
        try:
            hash(key)
        except Exception as err:
            _raise_unhashable(tree, is_leaf, key, err)
    return dynamic, key


def _raise_unhashable(tree, is_leaf, key: StaticKey, err: Exception):
    static_index = 0
    for index, is_dynamic in enumerate(key._mask):
        if is_dynamic:
            continue
        leaf = key._statics[static_index]
        static_index += 1
        try:
            hash(leaf)
        except Exception as leaf_err:
            raise unhashable_static(tree, index, leaf, leaf_err, is_leaf) from leaf_err
    raise err


def rebuild(key: StaticKey, dynamic: Sequence[Any], statics: Sequence[Any] | None = None) -> Any:
    """Inverse of `flatten_split`: the tree with `dynamic` at the dynamic positions.

    `statics`, if given, replaces the key's static leaves (e.g. `[None] * key.num_static`
    to keep only the dynamic part).

    Trees are rebuilt by jax's `unflatten`, which calls a `register_dataclass` node's type
    with its fields. The native core builds plain dataclasses without that call where it
    gives the same object (`filterjax._dataclass_init`), so both cores return equal trees
    and run `__post_init__`, a user-written `__init__` or `__setattr__` alike.
    """
    if type(key) is not StaticKey:
        raise TypeError(f"rebuild expects a StaticKey, got {type(key).__name__}")
    if statics is None:
        statics = key._statics
    if len(dynamic) != key._num_dynamic:
        raise ValueError(
            f"rebuild: the key has {key._num_dynamic} dynamic leaves but {len(dynamic)} were given"
        )
    if len(statics) != len(key._statics):
        raise ValueError(
            f"rebuild: the key has {len(key._statics)} static leaves but {len(statics)} were given"
        )
    if not statics:
        return key._treedef.unflatten(dynamic)
    dynamic_iter = iter(dynamic)
    static_iter = iter(statics)
    leaves = [next(dynamic_iter) if m else next(static_iter) for m in key._mask]
    return key._treedef.unflatten(leaves)


class Dispatcher:
    """The per-call path of a `filter_jit` function (twin of the native `Dispatcher`).

    A call whose shape has a plan in `plans` is bound by it (`identity_plan`, or a pair of
    argument and keyword sources), partitioned, and its `StaticKey` looked up in
    `programs`; the program found is called with `(leading, dynamic)` (just `dynamic` if
    `leading` is empty) and an output `{spec: leaves}` with `type(spec) is output_spec` is
    rebuilt. Every other call, and any
    whose partition or key comparison raises, goes to `fallback(leading, args, kwargs)`.
    An exception a program raises is replaced by `on_error(exception)` unless that is None.
    """

    def __init__(
        self,
        plans,
        programs,
        identity_plan,
        fallback,
        output_spec,
        leading=None,
        fast=True,
        on_error=None,
    ):
        self._plans = plans
        self._programs = programs
        self._identity_plan = identity_plan
        self._fallback = fallback
        self._output_spec = output_spec
        self._leading = () if leading is None else tuple(leading)
        self._fast = bool(fast)
        self._on_error = on_error

    @property
    def leading(self) -> tuple:
        """The wrapped function's array leaves (a tuple), in `jax.tree_util` order."""
        return self._leading

    def __call__(self, /, *args, **kwargs):
        if not self._fast:
            return self._fallback(self._leading, args, kwargs)
        plan = self._plans.get((len(args), tuple(kwargs)) if kwargs else len(args))
        if plan is None:
            return self._fallback(self._leading, args, kwargs)
        if plan is self._identity_plan:
            tree = (args, kwargs)
        else:
            bound = apply_plan(plan, args, kwargs)
            if bound is None:
                return self._fallback(self._leading, args, kwargs)
            tree = bound
        try:
            dynamic, key = flatten_split(tree)
            program = self._programs.get(key)
        except Exception:
            # The fallback partitions again and raises the error with the call's names.
            return self._fallback(self._leading, args, kwargs)
        if program is None:
            return self._fallback(self._leading, args, kwargs)
        try:
            out = program(self._leading, dynamic) if self._leading else program(dynamic)
        except Exception as err:
            replacement = None if self._on_error is None else self._on_error(err)
            if replacement is None:
                raise
            raise replacement from None
        if type(out) is dict and len(out) == 1:
            ((spec, leaves),) = out.items()
            if type(spec) is self._output_spec:
                return rebuild(spec.key, leaves)
        return out

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        return MethodType(self, instance)


# --------------------------------------------------------------------------------------------
# The filtering helpers: twins of the native `tree_partition`, `tree_filter`, `tree_combine`
# and `tree_apply_updates` (the public `partition`, `filter`, `combine`, `apply_updates`)
# --------------------------------------------------------------------------------------------

# The public layer's array predicate (`filterjax.is_array`), registered by it at import
# through `register_array_predicate`: the core imports nothing from the public layer.
_public_is_array: Any = None


def dispatcher_subclass(bases: tuple[type, ...]) -> type:
    """A subclass of `bases` (which include `Dispatcher`) that is called as the Dispatcher
    is: `type("_DispatcherSubclass", bases, {"__slots__": ()})`. The native core's class
    enters its Dispatcher without handling the call's arguments in Python or Rust first."""
    if not any(issubclass(base, Dispatcher) for base in bases):
        raise TypeError("dispatcher_subclass: one of the bases must be a subclass of Dispatcher")
    return type("_DispatcherSubclass", bases, {"__slots__": ()})


def register_array_predicate(predicate: Callable[[Any], bool]) -> None:
    """Make `predicate` a filter_spec the core answers with its own array test, without
    calling it per leaf. It must answer exactly as `is_array` does. A later registration
    replaces it."""
    global _public_is_array
    if not callable(predicate):
        raise TypeError(
            f"register_array_predicate expects a callable, got {type(predicate).__name__}"
        )
    _public_is_array = predicate


def _is_array_predicate(spec: Any) -> bool:
    """Whether `spec` is `filterjax.is_array` (or Equinox's, which answers the same)."""
    if spec is is_array or spec is _public_is_array:
        return True
    equinox = sys.modules.get("equinox")
    return equinox is not None and spec is getattr(equinox, "is_array", None)


def _is_node(obj: Any) -> bool:
    """Whether `jax.tree_util` flattens `obj` as a node (None included), not as a leaf."""
    return type(obj) in _tree_registry or (isinstance(obj, tuple) and hasattr(obj, "_fields"))


def _leaf_masks(leaves: list, spec: Any, tree: Any, is_leaf: Any, offset: int) -> list[bool]:
    """One bool per leaf: `spec` (a bool or a callable filter_spec leaf) applied to each."""
    if type(spec) is bool:
        return [spec] * len(leaves)
    if _is_array_predicate(spec):
        return [is_array(leaf) for leaf in leaves]
    masks = []
    for index, leaf in enumerate(leaves):
        try:
            masks.append(bool(spec(leaf)))
        except Exception as err:
            note_predicate_error(err, tree, offset + index, is_leaf)
            raise
    return masks


def _check_spec(spec: Any) -> None:
    if type(spec) is not bool and not callable(spec):
        raise bad_filter_spec(spec)


def _split(pytree: Any, filter_spec: Any, is_leaf: Any) -> tuple[list, list[bool], Any]:
    """(leaves, masks, rebuild) of `pytree` under `filter_spec`, as Equinox resolves it:
    the filter_spec's own structure down to its leaves, then each subtree flattened with
    `is_leaf`. `rebuild(new_leaves)` gives the output tree."""
    if not _is_node(filter_spec):
        _check_spec(filter_spec)
        all_leaves, treedef = _flatten(pytree, is_leaf)
        masks = _leaf_masks(all_leaves, filter_spec, pytree, is_leaf, 0)
        return all_leaves, masks, treedef.unflatten
    spec_leaves, spec_def = _flatten(filter_spec, None)
    try:
        subtrees = spec_def.flatten_up_to(pytree)
    except Exception as err:
        raise_structure_error("filter_spec", filter_spec, pytree, None, 0, err)
    leaves: list = []
    masks = []
    defs: list[Any] = []  # jaxlib ships no stub for PyTreeDef
    for spec, subtree in zip(spec_leaves, subtrees, strict=True):
        _check_spec(spec)
        sub_leaves, sub_def = _guarded_flatten(jtu.tree_flatten, subtree, is_leaf, is_leaf, pytree)
        masks.extend(_leaf_masks(sub_leaves, spec, pytree, is_leaf, len(leaves)))
        leaves.extend(sub_leaves)
        defs.append(sub_def)

    def rebuild_tree(new_leaves: list) -> Any:
        parts = []
        start = 0
        for sub_def in defs:
            end = start + sub_def.num_leaves
            parts.append(sub_def.unflatten(new_leaves[start:end]))
            start = end
        return spec_def.unflatten(parts)

    return leaves, masks, rebuild_tree


def tree_partition(
    pytree: Any, filter_spec: Any, replace: Any = None, is_leaf: Any = None
) -> tuple[Any, Any]:
    """`equinox.partition`: `(matching, rest)`, `replace` where a leaf went to the other."""
    leaves, masks, rebuild_tree = _split(pytree, filter_spec, is_leaf)
    left = [leaf if keep else replace for leaf, keep in zip(leaves, masks, strict=True)]
    right = [replace if keep else leaf for leaf, keep in zip(leaves, masks, strict=True)]
    return rebuild_tree(left), rebuild_tree(right)


def tree_filter(
    pytree: Any, filter_spec: Any, inverse: Any = False, replace: Any = None, is_leaf: Any = None
) -> Any:
    """`equinox.filter`: the leaves matching `filter_spec` (`inverse`: the others), `replace`
    elsewhere."""
    inverse = bool(inverse)
    leaves, masks, rebuild_tree = _split(pytree, filter_spec, is_leaf)
    kept = [leaf if keep != inverse else replace for leaf, keep in zip(leaves, masks, strict=True)]
    return rebuild_tree(kept)


def _none_or(is_leaf: Any) -> Callable[[Any], bool] | None:
    if is_leaf is None:
        return None
    return lambda x: x is None or is_leaf(x)


def tree_combine(pytrees: tuple, is_leaf: Any = None) -> Any:
    """`equinox.combine(*pytrees, is_leaf=is_leaf)`: the first tree's structure (its None
    leaves may stand for whole subtrees), each leaf the first non-None one."""
    if not pytrees:
        raise TypeError("combine needs at least one PyTree")
    first = pytrees[0]
    leaves, treedef = _guarded_flatten(
        _none_leaf_registry.flatten, first, _none_or(is_leaf), is_leaf
    )
    for index in range(1, len(pytrees)):
        try:
            others = treedef.flatten_up_to(pytrees[index])
        except Exception as err:
            raise_structure_error("combine", first, pytrees[index], is_leaf, index, err)
        leaves = [o if x is None else x for x, o in zip(leaves, others, strict=True)]
    return treedef.unflatten(leaves)


def tree_apply_updates(model: Any, updates: Any) -> Any:
    """`equinox.apply_updates`: `model + update` where the update is not None."""
    deltas, treedef = _guarded_flatten(_none_leaf_registry.flatten, updates, None, None)
    try:
        leaves = treedef.flatten_up_to(model)
    except Exception as err:
        raise_structure_error("updates", updates, model, None, 0, err)
    return treedef.unflatten(
        [
            leaf if delta is None else leaf + delta
            for delta, leaf in zip(deltas, leaves, strict=True)
        ]
    )
