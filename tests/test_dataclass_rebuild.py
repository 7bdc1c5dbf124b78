"""`register_dataclass` nodes rebuilt by the cores and the public helpers give the objects
`jax.tree_util` gives (it calls `type(**fields)`): same type, same attributes in the same
order, same slots, the very same leaves, and the same calls of `__post_init__`, a
user-written `__init__`, `__setattr__` or `__new__`, whether or not the core skipped the
call for a plain dataclass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import sys
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
from helpers import (
    DATACLASS_EVENTS,
    DATACLASS_SPECIALS,
    SETTINGS,
    DataclassVariant,
    dataclass_variant,
    dataclass_variants,
    native_core,
)
from hypothesis import given
from hypothesis import strategies as st

import filterjax as fj
from filterjax import _backend, _dataclass_init

# --------------------------------------------------------------------------------------------
# Trees and comparisons
# --------------------------------------------------------------------------------------------


def _instance(kind: type, w, b, n: int, tag: str):
    return kind(w=w, b=b, n=n, tag=tag)


def _tree(variant: DataclassVariant, n: int, tag: str, nested: bool):
    """A node of `variant` holding an array, a list (a float and, if `nested`, another
    node of the same type) and its meta fields, inside a dict."""
    kind = dataclass_variant(variant)
    inner = [_instance(kind, np.ones(2), [], n + 1, tag + "i")] if nested else []
    node = _instance(kind, jnp.arange(3.0), [1.5, *inner], n, tag)
    return {"node": node, "other": (jnp.zeros(1), "s")}


def _state(obj) -> list[tuple[str, Any]]:
    """An object's attributes: its `__dict__` in order, then every slot that is set."""
    state = list(vars(obj).items()) if hasattr(obj, "__dict__") else []
    for klass in type(obj).__mro__:
        slots = vars(klass).get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name in ("__dict__", "__weakref__"):
                continue
            with contextlib.suppress(AttributeError):
                state.append((name, getattr(obj, name)))
    return state


def assert_identical(actual, expected, same_leaf=None):
    """The same objects: same types, containers and node attributes alike, and leaves that
    are the very same objects (or pass `same_leaf`)."""
    is_node = dataclasses.is_dataclass(expected) or type(expected) in (list, tuple, dict)
    if not is_node:
        if same_leaf is None or expected is None:
            assert actual is expected, (actual, expected)
        else:
            assert same_leaf(actual, expected), (actual, expected)
        return
    assert type(actual) is type(expected), (actual, expected)
    if type(expected) is dict:
        assert list(actual) == list(expected)
        actual, expected = list(actual.values()), list(expected.values())
    elif dataclasses.is_dataclass(expected):
        actual_state, expected_state = _state(actual), _state(expected)
        assert [k for k, _ in actual_state] == [k for k, _ in expected_state]
        actual = [v for _, v in actual_state]
        expected = [v for _, v in expected_state]
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert_identical(a, e, same_leaf)


@contextlib.contextmanager
def events():
    """The variants' method calls made inside the block (a Counter, filled on exit)."""
    before = DATACLASS_EVENTS.copy()
    seen = DATACLASS_EVENTS.copy()
    seen.clear()
    yield seen
    seen.update(DATACLASS_EVENTS)
    seen.subtract(before)
    for key in [k for k, v in seen.items() if v == 0]:
        del seen[key]


def _keep(leaves, mask, keep):
    return [leaf if m == keep else None for leaf, m in zip(leaves, mask, strict=True)]


# --------------------------------------------------------------------------------------------
# Both cores, every variant
# --------------------------------------------------------------------------------------------

_trees = st.tuples(
    dataclass_variants, st.integers(-3, 3), st.sampled_from(["ab", "relu"]), st.booleans()
)


@SETTINGS
@given(_trees)
def test_partition_filter_combine_build_what_jax_builds(case):
    tree = _tree(*case)
    leaves, treedef = jtu.tree_flatten(tree)
    mask = [fj.is_array(leaf) for leaf in leaves]

    with events() as ours:
        left, right = fj.partition(tree, fj.is_array)
    with events() as theirs:
        expected_left = treedef.unflatten(_keep(leaves, mask, True))
        expected_right = treedef.unflatten(_keep(leaves, mask, False))
    assert_identical(left, expected_left)
    assert_identical(right, expected_right)
    assert ours == theirs

    with events() as ours:
        kept = fj.filter(tree, fj.is_array, inverse=True)
    with events() as theirs:
        expected = treedef.unflatten(_keep(leaves, mask, False))
    assert_identical(kept, expected)
    assert ours == theirs

    with events() as ours:
        combined = fj.combine(left, right)
    with events() as theirs:
        expected = treedef.unflatten(leaves)
    assert_identical(combined, expected)
    assert ours == theirs


@SETTINGS
@given(_trees)
def test_the_cores_rebuild_what_jax_unflattens(case):
    tree = _tree(*case)
    leaves, treedef = jtu.tree_flatten(tree)
    dynamic, key = _backend.flatten_split(tree)
    with events() as ours:
        rebuilt = _backend.rebuild(key, dynamic)
        halves = _backend.rebuild(key, dynamic, [None] * key.num_static)
    with events() as theirs:
        expected = treedef.unflatten(leaves)
        expected_halves = treedef.unflatten([x if fj.is_array(x) else None for x in leaves])
    assert_identical(rebuilt, expected)
    assert_identical(halves, expected_halves)
    assert ours == theirs
    assert jtu.tree_structure(rebuilt) == treedef


def _same_value(a, b):
    if isinstance(b, jax.Array | np.ndarray):
        return isinstance(a, jax.Array) and a.shape == b.shape and bool((a == b).all())
    return type(a) is type(b) and a == b


@SETTINGS
@given(_trees)
def test_filter_jit_returns_what_tree_map_builds(case):
    tree = _tree(*case)
    f = fj.filter_jit(lambda t: t)
    expected = jtu.tree_map(lambda x: x, tree)
    for _ in range(2):  # the trace, then the cached program
        out = f(tree)
        assert jtu.tree_structure(out) == jtu.tree_structure(tree)
        assert_identical(out, expected, same_leaf=_same_value)


def test_a_default_factory_marker_as_a_value_runs_the_factory():
    """`__init__` calls a field's default factory when given the factory's marker object:
    a node holding that marker is rebuilt by calling the type."""
    kind = dataclass_variant(DataclassVariant(defaults=True))
    marker = inspect.signature(kind.__init__).parameters["b"].default
    node = kind(w=jnp.ones(1), b=[], n=1, tag="x")
    leaves, treedef = jtu.tree_flatten(node)
    # `b` is an empty list: put the marker in its place, as a leaf.
    odd = treedef.unflatten(leaves)
    object.__setattr__(odd, "b", marker)
    leaves, treedef = jtu.tree_flatten(odd)
    assert any(leaf is marker for leaf in leaves)
    dynamic, key = _backend.flatten_split(odd)
    rebuilt = _backend.rebuild(key, dynamic)
    assert_identical(rebuilt, treedef.unflatten(leaves))
    assert rebuilt.b == []


# --------------------------------------------------------------------------------------------
# The native core skips the call exactly for plain dataclasses
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def python_calls():
    """The code objects of the Python functions called inside the block."""
    called: list = []

    def profile(frame, event, arg):
        if event == "call":
            called.append(frame.f_code)

    sys.setprofile(profile)
    try:
        yield called
    finally:
        sys.setprofile(None)


@pytest.mark.single_backend
@SETTINGS
@given(dataclass_variants)
def test_the_native_core_calls_the_type_unless_the_call_only_assigns(variant):
    native = native_core()
    kind = dataclass_variant(variant)
    tree = _instance(kind, jnp.ones(1), [_instance(kind, jnp.zeros(1), [], 1, "b")], 0, "a")
    dynamic, key = native.flatten_split(tree)
    with python_calls() as called:
        native.rebuild(key, dynamic)
    inits = [code for code in called if code is kind.__init__.__code__]
    if variant.special == "plain":
        # Nothing of the class's, nor anything `dataclasses` compiled, ran.
        assert inits == []
        assert not [code for code in called if code.co_filename == "<string>"], called
    else:
        assert len(inits) == 2, called


@pytest.mark.single_backend
@pytest.mark.parametrize("special", DATACLASS_SPECIALS)
def test_only_plain_dataclasses_are_built_directly(special):
    for frozen in (False, True):
        variant = DataclassVariant(frozen=frozen, special=special).normalized()
        kind = dataclass_variant(variant)
        plan = _dataclass_init.direct_fields(kind, ("w", "b"), ("n", "tag"))
        if special == "plain":
            assert plan == (
                ("w", False, 0, None),
                ("n", True, 0, None),
                ("b", False, 1, None),
                ("tag", True, 1, None),
            )
        else:
            assert plan is None


@pytest.mark.single_backend
def test_direct_build_refusals():
    @dataclasses.dataclass
    class Plain:
        a: Any

    assert _dataclass_init.direct_fields(Plain, ("a",), ()) is not None
    # Fields that are not exactly the init fields.
    assert _dataclass_init.direct_fields(Plain, ("a", "z"), ()) is None
    assert _dataclass_init.direct_fields(Plain, (), ()) is None

    class Meta(type):
        def __call__(cls, *args, **kwargs):
            return super().__call__(*args, **kwargs)

    @dataclasses.dataclass
    class WithMeta(metaclass=Meta):
        a: Any

    assert _dataclass_init.direct_fields(WithMeta, ("a",), ()) is None

    class NotADataclass:
        def __init__(self, a):
            self.a = a

    assert _dataclass_init.direct_fields(NotADataclass, ("a",), ()) is None

    # An undecorated subclass runs its base's generated __init__: built directly too.
    class Sub(Plain):
        pass

    assert _dataclass_init.direct_fields(Sub, ("a",), ()) is not None

    class SubWithSetattr(Plain):
        def __setattr__(self, name, value):
            object.__setattr__(self, name, value)

    assert _dataclass_init.direct_fields(SubWithSetattr, ("a",), ()) is None

    @dataclasses.dataclass(frozen=True)
    class Frozen:
        a: Any

    class FrozenSub(Frozen):
        def __setattr__(self, name, value):  # bypassed by the frozen __init__, as by us
            raise AssertionError

    assert _dataclass_init.direct_fields(FrozenSub, ("a",), ()) is not None

    # A subclass with fields of its own but no __init__ of its own: the base's is called.
    @dataclasses.dataclass(init=False)
    class NoInit(Plain):
        b: Any = None

    assert _dataclass_init.direct_fields(NoInit, ("a", "b"), ()) is None


@pytest.mark.single_backend
def test_drop_fields_keep_the_call():
    if "drop_fields" not in inspect.signature(jtu.register_dataclass).parameters:
        pytest.skip("this jax's register_dataclass has no drop_fields")

    @dataclasses.dataclass
    class Dropped:
        a: Any
        b: Any = 5

    jtu.register_dataclass(Dropped, data_fields=["a"], meta_fields=[], drop_fields=["b"])
    node = Dropped(jnp.ones(1), 9)
    leaves, treedef = jtu.tree_flatten(node)
    dynamic, key = _backend.flatten_split(node)
    rebuilt = _backend.rebuild(key, dynamic)
    assert_identical(rebuilt, treedef.unflatten(leaves))
    assert rebuilt.b == 5
