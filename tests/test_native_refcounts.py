"""The native core neither leaks nor over-releases references, on success and error paths.

Each test takes `sys.getrefcount` of every object handed to (or returned by) the native
module, runs the operation 10,000 times, and checks that every count is back where it was.
"""

from __future__ import annotations

import dataclasses
import gc
import sys

import jax.tree_util as jtu
import numpy as np
import pytest
from helpers import native_core

_native = native_core(module_level=True)

pytestmark = pytest.mark.single_backend

CALLS = 10_000


class Tag:
    """A hashable static leaf that nothing else references."""

    def __init__(self, name):
        self.name = name

    def __hash__(self):
        return hash(self.name)

    def __eq__(self, other):
        return type(other) is Tag and other.name == self.name


class EqRaises:
    """Hashable, but comparing two of them raises."""

    def __hash__(self):
        return 7

    def __eq__(self, other):
        raise RuntimeError("no comparing")


class Node:
    def __init__(self, *children):
        self.children = children


class Raising:
    pass


class Malformed:
    pass


jtu.register_pytree_node(Node, lambda n: (n.children, "aux"), lambda aux, ch: Node(*ch))
jtu.register_pytree_node(Raising, lambda n: 1 / 0, lambda aux, ch: Raising())
jtu.register_pytree_node(Malformed, lambda n: ["not", "a tuple"], lambda aux, ch: Malformed())


def _counts(objects):
    gc.collect()
    return [sys.getrefcount(o) for o in objects]


def assert_refcounts_stable(call, objects, expect=None):
    """Run `call` CALLS times; the refcounts of `objects` must not change.

    `expect` is the exception type every call must raise (None: must succeed).
    """

    def once():
        if expect is None:
            call()
            return
        try:
            call()
        except expect:
            pass
        else:
            raise AssertionError(f"expected {expect.__name__}")

    for _ in range(20):  # warm up lazily created module state and type caches
        once()
    before = _counts(objects)
    for _ in range(CALLS):
        once()
    after = _counts(objects)
    assert after == before


def _tree():
    arrays = [np.ones(2) * i for i in range(3)]
    statics = [Tag("a"), Tag("b"), "".join(["st", "atic"])]
    tree = {
        "x": (arrays[0], statics[0]),
        "y": [arrays[1], Node(statics[1], arrays[2])],
        "z": statics[2],
    }
    return tree, arrays, statics


def test_partition_success():
    tree, arrays, statics = _tree()
    predicate = lambda x: isinstance(x, np.ndarray)  # noqa: E731
    is_leaf = lambda x: x is None  # noqa: E731
    objects = [tree, tree["x"], tree["y"], *arrays, *statics, predicate, is_leaf]
    assert_refcounts_stable(lambda: _native.flatten_split(tree), objects)
    assert_refcounts_stable(lambda: _native.flatten_split(tree, predicate, is_leaf), objects)
    assert_refcounts_stable(lambda: _native.flatten_split(tree, hashed=False), objects)


def test_outputs_and_key_methods():
    tree, arrays, statics = _tree()
    dynamic, key = _native.flatten_split(tree)
    other = _native.flatten_split(tree)[1]
    objects = [dynamic, key, other, key.statics, *arrays, *statics]
    assert_refcounts_stable(lambda: (key.statics, key.mask, key.num_leaves), objects)
    assert_refcounts_stable(lambda: hash(key), objects)
    assert_refcounts_stable(lambda: key == other and not key != other, objects)
    assert_refcounts_stable(lambda: repr(key), objects)


def test_rebuild_success():
    tree, arrays, statics = _tree()
    dynamic, key = _native.flatten_split(tree)
    as_tuple = tuple(dynamic)
    nones = [None] * key.num_static
    objects = [dynamic, as_tuple, key, nones, *arrays, *statics]
    assert_refcounts_stable(lambda: _native.rebuild(key, dynamic), objects)
    assert_refcounts_stable(lambda: _native.rebuild(key, as_tuple, nones), objects)
    assert_refcounts_stable(lambda: _native.rebuild(key, [None] * key.num_dynamic), objects)


@dataclasses.dataclass(frozen=True, slots=True)
class Slotted:
    a: object
    tag: object = dataclasses.field(metadata={"static": True})


@dataclasses.dataclass
class Plain:
    a: object
    b: object
    tag: object = dataclasses.field(metadata={"static": True})


jtu.register_dataclass(Slotted)
jtu.register_dataclass(Plain)


def test_dataclass_rebuilt_without_calling_the_type():
    arrays = [np.ones(2) * i for i in range(3)]
    tags = [Tag("p"), Tag("s")]
    tree = Plain(arrays[0], Slotted(arrays[1], tags[1]), tags[0])
    dynamic, key = _native.flatten_split(tree)
    objects = [dynamic, key, Plain, Slotted, *arrays, *tags]
    assert_refcounts_stable(lambda: _native.rebuild(key, dynamic), objects)
    assert_refcounts_stable(lambda: _native.tree_combine((tree,)), objects)
    assert_refcounts_stable(lambda: _native.tree_partition(tree, True), objects)


def test_unhashable_static():
    leaf = {"a", "set"}
    tree = [np.ones(1), leaf]
    objects = [tree, leaf]
    assert_refcounts_stable(lambda: _native.flatten_split(tree), objects, expect=TypeError)
    # hashed=False: the error comes from the key's first hash instead.
    key = _native.flatten_split(tree, hashed=False)[1]
    assert_refcounts_stable(lambda: hash(key), [key, *objects], expect=TypeError)


def test_custom_flatten_raising_and_malformed():
    leaf = Tag("x")
    raising = [leaf, Raising()]
    malformed = [leaf, Malformed()]
    objects = [leaf, raising, raising[1], malformed, malformed[1]]
    assert_refcounts_stable(
        lambda: _native.flatten_split(raising), objects, expect=ZeroDivisionError
    )
    assert_refcounts_stable(lambda: _native.flatten_split(malformed), objects, expect=ValueError)


def test_is_leaf_and_predicate_raising():
    tree, arrays, statics = _tree()

    def bad_is_leaf(x):
        raise KeyError("is_leaf")

    def bad_predicate(x):
        raise KeyError("predicate")

    objects = [tree, *arrays, *statics, bad_is_leaf, bad_predicate]
    assert_refcounts_stable(
        lambda: _native.flatten_split(tree, is_leaf=bad_is_leaf), objects, expect=KeyError
    )
    assert_refcounts_stable(
        lambda: _native.flatten_split(tree, bad_predicate), objects, expect=KeyError
    )


def test_eq_raising():
    first, second = EqRaises(), EqRaises()
    k1 = _native.flatten_split([first], hashed=False)[1]
    k2 = _native.flatten_split([second], hashed=False)[1]
    objects = [first, second, k1, k2]
    assert_refcounts_stable(lambda: k1 == k2, objects, expect=RuntimeError)


def test_rebuild_wrong_lengths():
    tree, arrays, statics = _tree()
    dynamic, key = _native.flatten_split(tree)
    short = dynamic[:-1]
    objects = [key, dynamic, short, *arrays, *statics]
    assert_refcounts_stable(lambda: _native.rebuild(key, short), objects, expect=ValueError)
    assert_refcounts_stable(
        lambda: _native.rebuild(key, dynamic, statics[:1]), objects, expect=ValueError
    )
    assert_refcounts_stable(lambda: _native.rebuild("nope", dynamic), objects, expect=TypeError)


# --------------------------------------------------------------------------------------------
# The filtering helpers: tree_partition, tree_filter, tree_combine, tree_apply_updates
# --------------------------------------------------------------------------------------------


def test_filter_helpers_success():
    tree, arrays, statics = _tree()
    is_array = _native.is_array  # an unknown callable: called per leaf
    replace = Tag("replace")
    spec = {"x": (True, is_array), "y": False, "z": is_array}
    is_leaf = lambda x: isinstance(x, Node)  # noqa: E731
    objects = [tree, tree["x"], tree["y"], *arrays, *statics, is_array, replace, is_leaf, spec]
    assert_refcounts_stable(lambda: _native.tree_partition(tree, is_array), objects)
    assert_refcounts_stable(lambda: _native.tree_partition(tree, True, replace), objects)
    assert_refcounts_stable(lambda: _native.tree_partition(tree, spec, None, is_leaf), objects)
    assert_refcounts_stable(lambda: _native.tree_filter(tree, spec, True, replace), objects)
    left, right = _native.tree_partition(tree, is_array)
    objects += [left, right]
    assert_refcounts_stable(lambda: _native.tree_combine((left, right)), objects)
    assert_refcounts_stable(lambda: _native.tree_combine((right, left, tree), is_leaf), objects)
    updates = {"x": (np.ones(2), None), "y": None, "z": None}
    model = {"x": (arrays[0], statics[0]), "y": tree["y"], "z": statics[2]}
    objects += [updates, model]
    assert_refcounts_stable(lambda: _native.tree_apply_updates(model, updates), objects)


def test_filter_helpers_errors():
    tree, arrays, statics = _tree()

    def bad_predicate(x):
        raise KeyError("predicate")

    loop = [statics[0]]
    loop.append(loop)
    not_prefix = {"x": [True, True], "y": True, "z": True}
    raising = [statics[1], Raising()]
    objects = [tree, *arrays, *statics, bad_predicate, loop, not_prefix, raising]
    assert_refcounts_stable(
        lambda: _native.tree_partition(tree, bad_predicate), objects, expect=KeyError
    )
    assert_refcounts_stable(
        lambda: _native.tree_filter(tree, {"x": bad_predicate, "y": True, "z": True}),
        objects,
        expect=KeyError,
    )
    assert_refcounts_stable(
        lambda: _native.tree_partition(tree, not_prefix), objects, expect=ValueError
    )
    assert_refcounts_stable(lambda: _native.tree_filter(tree, "x"), objects, expect=ValueError)
    assert_refcounts_stable(lambda: _native.tree_filter(loop, True), objects, expect=ValueError)
    assert_refcounts_stable(
        lambda: _native.tree_combine((tree, raising)), objects, expect=ValueError
    )
    assert_refcounts_stable(
        lambda: _native.tree_combine((raising, tree)), objects, expect=ZeroDivisionError
    )
    assert_refcounts_stable(
        lambda: _native.tree_apply_updates(tree, not_prefix), objects, expect=ValueError
    )
