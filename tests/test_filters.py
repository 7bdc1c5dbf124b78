"""The public filtering helpers (`partition`, `filter`, `combine`, `apply_updates`) run on the
core: the native module and the Python twin must agree with each other and with Equinox on
results (structure and the very same leaf objects) and on errors.

The tree and filter_spec generators are those of tests/test_core_properties.py.
"""

from __future__ import annotations

import sys
from collections import OrderedDict, defaultdict, namedtuple
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
from helpers import (
    SETTINGS,
    Box,
    KeyedBox,
    Tag,
    assert_same_tree,
    build,
    changed_specs,
    filter_specs_for,
    specs_with_filter_spec,
    tree_specs,
)
from hypothesis import given
from hypothesis import strategies as st

import filterjax
from filterjax import _backend, _pycore

try:
    from filterjax import _native
except ImportError:  # the conftest decides whether that is an error
    _native = None

CORES = [_pycore] + ([_native] if _native is not None else [])
_REPLACED = Tag("replaced")


def _is_box(x):
    return isinstance(x, (Box, KeyedBox))


def _outcome(fn, *args, **kwargs):
    """("ok", result) or ("err", exception)."""
    try:
        return "ok", fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - the tests compare whatever was raised
        return "err", err


def assert_same_outcome(ours, theirs, pair=False, message=True):
    """Both succeeded with the same trees (same leaf objects, the whole structure compared:
    nodes that `is_leaf` stopped at may be rebuilt by a filter_spec that goes deeper) or both
    raised alike."""
    assert ours[0] == theirs[0], (ours, theirs)
    if ours[0] == "err":
        assert type(ours[1]) is type(theirs[1]) or (
            not message and isinstance(ours[1], type(theirs[1]))
        ), (ours[1], theirs[1])
        if message:
            assert str(ours[1]) == str(theirs[1])
        return
    if pair:
        assert type(ours[1]) is tuple and len(ours[1]) == 2
        assert_same_tree(ours[1][0], theirs[1][0])
        assert_same_tree(ours[1][1], theirs[1][1])
    else:
        assert_same_tree(ours[1], theirs[1])


# --------------------------------------------------------------------------------------------
# Random trees: native vs python vs Equinox
# --------------------------------------------------------------------------------------------


@pytest.mark.single_backend
@SETTINGS
@given(specs_with_filter_spec(), st.sampled_from([None, _REPLACED]), st.booleans())
def test_cores_partition_and_filter_like_equinox(specs, replace, with_is_leaf):
    spec, filter_spec = specs
    tree = build(spec)
    is_leaf = _is_box if with_is_leaf else None
    theirs = _outcome(eqx.partition, tree, filter_spec, replace=replace, is_leaf=is_leaf)
    theirs_f = _outcome(eqx.filter, tree, filter_spec, replace=replace, is_leaf=is_leaf)
    theirs_i = _outcome(
        eqx.filter, tree, filter_spec, inverse=True, replace=replace, is_leaf=is_leaf
    )
    results = []
    for core in CORES:
        ours = _outcome(core.tree_partition, tree, filter_spec, replace, is_leaf)
        assert_same_outcome(ours, theirs, pair=True, message=False)
        ours_f = _outcome(core.tree_filter, tree, filter_spec, False, replace, is_leaf)
        assert_same_outcome(ours_f, theirs_f, message=False)
        ours_i = _outcome(core.tree_filter, tree, filter_spec, True, replace, is_leaf)
        assert_same_outcome(ours_i, theirs_i, message=False)
        results.append((ours, ours_f, ours_i))
    for native, python in zip(results[-1], results[0], strict=True):
        assert_same_outcome(native, python, pair=native is results[-1][0])


@pytest.mark.single_backend
@SETTINGS
@given(tree_specs, st.data())
def test_cores_combine_like_equinox(spec, data):
    tree = build(spec)
    filter_specs = [data.draw(filter_specs_for(spec)) for _ in range(data.draw(st.integers(1, 3)))]
    # Pieces whose combination in any order is `tree`, plus an all-None piece.
    pieces = []
    for fs in filter_specs:
        pieces.extend(eqx.partition(tree, fs))
    pieces.append(eqx.filter(tree, False))
    order = data.draw(st.permutations(range(len(pieces))))
    trees = tuple(pieces[i] for i in order)
    theirs = _outcome(eqx.combine, *trees)
    assert theirs[0] == "ok"
    assert_same_tree(theirs[1], tree)
    for core in CORES:
        assert_same_outcome(_outcome(core.tree_combine, trees, None), theirs)
    single = _outcome(eqx.combine, trees[0])
    for core in CORES:
        assert_same_outcome(_outcome(core.tree_combine, trees[:1], None), single)


@pytest.mark.single_backend
@SETTINGS
@given(changed_specs(), st.data())
def test_cores_reject_non_prefix_filter_specs_like_equinox(specs, data):
    spec, changed = specs
    tree = build(spec)
    filter_spec = data.draw(filter_specs_for(changed))
    theirs = _outcome(eqx.partition, tree, filter_spec)
    outcomes = [_outcome(core.tree_partition, tree, filter_spec, None, None) for core in CORES]
    for ours in outcomes:
        assert_same_outcome(ours, theirs, pair=True, message=False)
    assert_same_outcome(outcomes[-1], outcomes[0], pair=True)


@pytest.mark.single_backend
@SETTINGS
@given(changed_specs())
def test_cores_combine_mismatched_trees_like_equinox(specs):
    spec, changed = specs
    first, second = build(spec), build(changed)
    second_half = eqx.filter(second, eqx.is_array, inverse=True)
    for trees in [(first, second_half), (second_half, first), (eqx.filter(first, False), second)]:
        theirs = _outcome(eqx.combine, *trees)
        outcomes = [_outcome(core.tree_combine, trees, None) for core in CORES]
        for ours in outcomes:
            assert_same_outcome(ours, theirs, message=False)
        assert_same_outcome(outcomes[-1], outcomes[0])


def _one_like(x):
    return jnp.ones_like(x) if filterjax.is_inexact_array(x) else None


@pytest.mark.single_backend
@SETTINGS
@given(tree_specs, st.booleans())
def test_cores_apply_updates_like_equinox(spec, prefix):
    model = build(spec)
    updates = jtu.tree_map(_one_like, model)
    if prefix and type(updates) is dict and updates:
        updates = {k: None for k in updates}  # None prefixes whole subtrees
    theirs = _outcome(eqx.apply_updates, model, updates)
    assert theirs[0] == "ok"
    for core in CORES:
        kind, ours = _outcome(core.tree_apply_updates, model, updates)
        assert kind == "ok"
        ours_leaves, ours_def = jtu.tree_flatten(ours)
        theirs_leaves, theirs_def = jtu.tree_flatten(theirs[1])
        assert ours_def == theirs_def
        for a, b in zip(ours_leaves, theirs_leaves, strict=True):
            assert type(a) is type(b)
            if filterjax.is_array(b) and not isinstance(b, np.ndarray):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            elif filterjax.is_array(b):
                np.testing.assert_array_equal(a, b)
            else:
                assert a is b or a == b


# --------------------------------------------------------------------------------------------
# The public API, on each backend
# --------------------------------------------------------------------------------------------


class Layer(eqx.Module):
    w: Any
    b: Any
    act: str = eqx.field(static=True)

    def __call__(self, x):
        return x


NT = namedtuple("NT", ["a", "b"])


def _model():
    return {
        "layers": [Layer(jnp.ones(2), np.zeros(2), "relu"), Layer(jnp.ones(3), 1.0, "tanh")],
        "nt": NT(jnp.zeros(1), "s"),
        "od": OrderedDict([("z", 2), ("a", jnp.ones(1))]),
        "dd": defaultdict(list, {"k": np.float32(1), "j": None}),
        "none": None,
        "fn": jax.nn.relu,
    }


@pytest.mark.parametrize("use_is_leaf", [False, True])
def test_api_matches_equinox_on_a_model(use_is_leaf):
    tree = _model()
    is_leaf = (lambda x: isinstance(x, NT)) if use_is_leaf else None
    for spec in (
        True,
        False,
        filterjax.is_array,
        eqx.is_array,
        filterjax.is_inexact_array,
        {
            "layers": [Layer(True, False, "relu"), filterjax.is_array],
            "nt": False,
            "od": True,
            "dd": filterjax.is_array,
            "none": None,
            "fn": True,
        },
    ):
        for replace in (None, _REPLACED):
            left, right = filterjax.partition(tree, spec, replace=replace, is_leaf=is_leaf)
            eleft, eright = eqx.partition(tree, spec, replace=replace, is_leaf=is_leaf)
            assert_same_tree(left, eleft, is_leaf=is_leaf)
            assert_same_tree(right, eright, is_leaf=is_leaf)
            for inverse in (False, True):
                ours = filterjax.filter(
                    tree, spec, inverse=inverse, replace=replace, is_leaf=is_leaf
                )
                theirs = eqx.filter(tree, spec, inverse=inverse, replace=replace, is_leaf=is_leaf)
                assert_same_tree(ours, theirs, is_leaf=is_leaf)
        left, right = filterjax.partition(tree, spec, is_leaf=is_leaf)
        assert_same_tree(filterjax.combine(left, right, is_leaf=is_leaf), tree, is_leaf=is_leaf)
        assert_same_tree(
            filterjax.combine(right, left, is_leaf=is_leaf),
            eqx.combine(right, left, is_leaf=is_leaf),
            is_leaf=is_leaf,
        )


def test_module_with_call_is_a_prefix_not_a_predicate():
    tree = [Layer(jnp.ones(2), "x", "relu")]
    spec = [Layer(False, True, "relu")]
    ours = filterjax.filter(tree, spec)
    assert ours[0].w is None and ours[0].b == "x"
    assert_same_tree(ours, eqx.filter(tree, spec))


def test_callable_spec_sees_each_leaf_once_in_order():
    tree = {"b": [1, "x"], "a": (2.0, None)}
    seen = []

    def spec(x):
        seen.append(x)
        return isinstance(x, int)

    left, right = filterjax.partition(tree, spec)
    assert seen == [2.0, 1, "x"]
    assert left == {"b": [1, None], "a": (None, None)}
    assert right == {"b": [None, "x"], "a": (2.0, None)}


def test_node_registered_after_import():
    class Late:
        def __init__(self, x, y, aux):
            self.x, self.y, self.aux = x, y, aux

    jtu.register_pytree_node(
        Late, lambda n: ((n.x, n.y), n.aux), lambda aux, ch: Late(ch[0], ch[1], aux)
    )
    arr = jnp.ones(2)
    tree = [Late(arr, "s", 3)]
    left, right = filterjax.partition(tree, filterjax.is_array)
    assert type(left[0]) is Late and left[0].x is arr and left[0].y is None
    assert right[0].x is None and right[0].y == "s" and right[0].aux == 3
    back = filterjax.combine(left, right)
    assert back[0].x is arr and back[0].y == "s"
    spec = [Late(True, False, 3)]
    assert filterjax.filter(tree, spec)[0].x is arr
    with pytest.raises(ValueError, match=r"tree\[0\]"):
        filterjax.filter(tree, [Late(True, False, 4)])


def test_combine_many_trees_and_none_holes():
    a, b = jnp.ones(1), np.zeros(2)
    trees = ([None, None, None], [a, None, None], [5, b, (None, 3)], [None, 7, (1, 2)])
    out = filterjax.combine(*trees)
    assert out[0] is a and out[1] is b and out[2] == (None, 3)
    assert_same_tree(out, eqx.combine(*trees))
    assert filterjax.combine(None, None) is None
    assert filterjax.combine([None], [(1, 2)]) == [(1, 2)]


def test_combine_with_is_leaf_does_not_ask_about_none():
    asked = []

    def is_leaf(x):
        asked.append(x)
        return isinstance(x, NT)

    t1 = [NT(1, 2), None]
    t2 = [None, NT(3, 4)]
    out = filterjax.combine(t1, t2, is_leaf=is_leaf)
    assert out == [NT(1, 2), NT(3, 4)]
    assert None not in asked


def test_apply_updates_adds_and_keeps():
    model = {"w": jnp.ones(2), "act": "relu", "n": 2.0, "sub": [jnp.zeros(1)]}
    updates = {"w": jnp.ones(2), "act": None, "n": 0.5, "sub": None}
    out = filterjax.apply_updates(model, updates)
    np.testing.assert_array_equal(out["w"], 2 * np.ones(2))
    assert out["act"] == "relu" and out["n"] == 2.5 and out["sub"] is model["sub"]


# --------------------------------------------------------------------------------------------
# is_array runs without a Python call per leaf
# --------------------------------------------------------------------------------------------


def _count_calls(code, fn):
    calls = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code is code:
            calls.append(1)

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return len(calls)


def test_is_array_spec_is_not_called_per_leaf():
    tree = {f"k{i}": (jnp.ones(1) if i % 2 else "s") for i in range(20)}
    code = filterjax.is_array.__code__
    assert _count_calls(code, lambda: filterjax.is_array(1)) == 1  # the probe works
    assert _count_calls(code, lambda: filterjax.partition(tree, filterjax.is_array)) == 0
    assert _count_calls(code, lambda: filterjax.filter(tree, filterjax.is_array)) == 0
    spec = {k: filterjax.is_array for k in tree}
    assert _count_calls(code, lambda: filterjax.partition(tree, spec)) == 0
    left, right = filterjax.partition(tree, filterjax.is_array)
    assert_same_tree(left, eqx.filter(tree, eqx.is_array))


# --------------------------------------------------------------------------------------------
# Errors: both backends raise the same, with the path
# --------------------------------------------------------------------------------------------


def _both(fn):
    """The exception `fn` raises on each backend: must be the same type and message."""
    errors = []
    previous = _backend.backend()
    try:
        for name in [c.BACKEND for c in CORES]:
            _backend.set_backend(name)
            with pytest.raises(Exception) as info:
                fn()
            errors.append(info.value)
    finally:
        _backend.set_backend(previous)
    first = errors[0]
    for other in errors[1:]:
        assert type(other) is type(first)
        assert str(other) == str(first)
        assert getattr(other, "__notes__", None) == getattr(first, "__notes__", None)
    return first


@pytest.mark.single_backend
def test_non_prefix_filter_spec_names_the_path():
    tree = {"a": [1, 2], "b": (3, (4, 5))}
    err = _both(lambda: filterjax.filter(tree, {"a": True, "b": (True, [True, False])}))
    assert isinstance(err, ValueError)
    assert "filter_spec" in str(err) and "tree['b'][1]" in str(err)
    err = _both(lambda: filterjax.partition(tree, {"a": True, "c": False}))
    assert isinstance(err, ValueError) and "tree" in str(err)
    err = _both(lambda: filterjax.partition(tree, {"a": [True, True, True], "b": True}))
    assert "tree['a']" in str(err)
    err = _both(lambda: filterjax.partition(tree, {"a": None, "b": True}))
    assert "tree['a']" in str(err)


@pytest.mark.single_backend
def test_bad_filter_spec_leaf():
    err = _both(lambda: filterjax.filter([1, 2], ["x", True]))
    assert isinstance(err, ValueError) and "booleans and callables" in str(err)
    err = _both(lambda: filterjax.partition([1, 2], 3))
    assert isinstance(err, ValueError) and "booleans and callables" in str(err)


@pytest.mark.single_backend
def test_raising_predicate_keeps_its_error_and_names_the_leaf():
    def spec(x):
        if x == "boom":
            raise KeyError("no")
        return False

    tree = {"a": [1, "boom"]}
    err = _both(lambda: filterjax.partition(tree, spec))
    assert type(err) is KeyError
    assert any("tree['a'][1]" in note for note in err.__notes__)
    err = _both(lambda: filterjax.filter(tree, {"a": spec}))
    assert type(err) is KeyError
    assert any("tree['a'][1]" in note for note in err.__notes__)


@pytest.mark.single_backend
def test_cycles_and_depth():
    loop: list = [1]
    loop.append(loop)
    err = _both(lambda: filterjax.partition(loop, filterjax.is_array))
    assert isinstance(err, filterjax.PyTreeCycleError)
    err = _both(lambda: filterjax.filter({"x": loop}, {"x": True}))
    assert isinstance(err, filterjax.PyTreeCycleError) and "tree['x']" in str(err)
    err = _both(lambda: filterjax.combine(loop, loop))
    assert isinstance(err, filterjax.PyTreeCycleError)
    deep: list = []
    node = deep
    for _ in range(sys.getrecursionlimit() + 10):
        node.append([])
        node = node[0]
    err = _both(lambda: filterjax.partition(deep, True))
    assert isinstance(err, RecursionError)


def _nested(kind: str, depth: int, leaf: object) -> object:
    """`leaf` at `depth` (the root is at depth 0), inside lists, tuples or dicts."""
    tree = leaf
    for _ in range(depth):
        if kind == "list":
            tree = [tree]
        elif kind == "tuple":
            tree = (tree,)
        else:
            tree = {"a": tree, "b": 1}
    return tree


@pytest.mark.parametrize("kind", ["list", "tuple", "dict"])
@pytest.mark.parametrize("leaf", ["leaf", "empty node"])
def test_the_depth_limit_is_the_recursion_limit_on_both_cores(kind, leaf):
    """A node at depth `sys.getrecursionlimit()` or deeper is refused with a RecursionError
    naming the problem, one above it is flattened, on every Python version and both cores;
    the interpreter stays healthy either way."""
    limit = sys.getrecursionlimit()
    innermost = [] if leaf == "empty node" else 1.0
    fits = _nested(kind, limit - 1, innermost)
    too_deep = _nested(kind, limit, innermost)
    for core in CORES:
        dynamic, key = core.flatten_split(fits, lambda x: True)
        assert key.num_leaves == (limit - 1 if kind == "dict" else 0) + (leaf == "leaf")
        with pytest.raises(RecursionError, match="deeper than the recursion limit"):
            core.flatten_split(too_deep)
    with pytest.raises(RecursionError, match="deeper than the recursion limit"):
        filterjax.partition(too_deep, filterjax.is_array)
    assert _count_down(limit - 100) == 0


def _count_down(n: int) -> int:
    return n if n == 0 else _count_down(n - 1)


@pytest.mark.single_backend
def test_combine_and_apply_updates_mismatch_name_the_path():
    err = _both(lambda: filterjax.combine([1, (2, 3)], [None, [None, None]]))
    assert isinstance(err, ValueError) and "tree[1]" in str(err)
    err = _both(lambda: filterjax.apply_updates({"a": 1.0}, {"b": 1.0}))
    assert isinstance(err, ValueError)
    with pytest.raises(ValueError):
        eqx.apply_updates({"a": 1.0}, {"b": 1.0})
