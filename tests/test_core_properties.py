"""Property tests for the core (`_backend.flatten_split`, `_backend.rebuild`, the StaticKey) and the
filtering API, checked against `jax.tree_util`, the Python twin, the native module and Equinox.

Trees are drawn as *specs* (plain nested tuples `(kind, meta, children)`) and built into real
PyTrees on demand. The same spec can then be built twice with distinct-but-equal statics and
different arrays (the keys must be equal), or changed in exactly one place (the keys must not
be). `FILTERJAX_CORE_PROFILE=thorough` runs many more examples.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict, defaultdict, namedtuple
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
from helpers import (
    DC,
    NT2,
    SETTINGS,
    Box,
    EqxNode,
    KeyedBox,
    NT2Twin,
    Tag,
    assert_same_tree,
    build,
    changed_specs,
    dataclass_nodes,
    identity_fn,
    is_python_number,
    leaf_specs,
    native_core,
    specs_with_filter_spec,
    tree_specs,
)
from hypothesis import given
from hypothesis import strategies as st

import filterjax
from filterjax import _backend, _pycore


@pytest.fixture(params=["python", "native"])
def core(request):
    """A core module named explicitly (not through `_backend`)."""
    if request.param == "python":
        return _pycore
    return native_core()


def _always(_):
    return True


# --------------------------------------------------------------------------------------------
# (a) flatten
# --------------------------------------------------------------------------------------------


@SETTINGS
@given(tree_specs)
def test_all_dynamic_leaves_are_the_jax_leaves(spec):
    tree = build(spec)
    expected = jtu.tree_leaves(tree)
    dynamic, key = _backend.flatten_split(tree, _always)
    assert len(dynamic) == len(expected)
    assert all(d is e for d, e in zip(dynamic, expected, strict=True))
    assert key.num_leaves == key.num_dynamic == len(expected)
    assert key.num_static == 0 and key.statics == ()
    assert key.mask == (True,) * len(expected)


@pytest.mark.single_backend
@SETTINGS
@given(spec=tree_specs)
def test_explicit_cores_flatten_like_jax(core, spec):
    tree = build(spec)
    expected = jtu.tree_leaves(tree)
    dynamic, key = core.flatten_split(tree, _always)
    assert [id(x) for x in dynamic] == [id(x) for x in expected]
    assert key.mask == (True,) * len(expected)
    assert_same_tree(core.rebuild(key, dynamic), tree)


def _dataclass_node_specs(children):
    return st.one_of(
        *dataclass_nodes(children),
        st.lists(children, max_size=3).map(lambda c: ("tuple", None, tuple(c))),
    )


dataclass_tree_specs = st.recursive(leaf_specs, _dataclass_node_specs, max_leaves=12)


@pytest.mark.single_backend
@SETTINGS
@given(dataclass_tree_specs)
def test_register_dataclass_trees_agree_with_jax_on_both_cores(spec):
    """Leaves, structure, node data (the meta fields) and rebuild of `register_dataclass`
    nodes, flat and nested, as `jax.tree_util` has them."""
    tree = build(spec)
    leaves, treedef = jtu.tree_flatten(tree)
    for core in (_pycore, native_core()):
        dynamic, key = core.flatten_split(tree, _always)
        assert [id(x) for x in dynamic] == [id(x) for x in leaves]
        assert str(treedef) in repr(key)
        rebuilt = core.rebuild(key, dynamic)
        assert_same_tree(rebuilt, tree)
        assert jtu.tree_structure(rebuilt) == treedef
        _, again = core.flatten_split(build(spec, variant=1), _always, hashed=False)
        assert again == key


def test_a_type_registered_after_use_as_a_leaf_becomes_a_node(core):
    @dataclasses.dataclass
    class Late:
        a: Any
        b: Any

    class LateNode:
        def __init__(self, a):
            self.a = a

    late, late_node = Late(jnp.ones(1), 2), LateNode(jnp.ones(2))
    tree = [late, late_node, late, late_node]
    deep = [[[[tree]]]]  # through the Python core's depth walk too
    for t in (tree, deep):
        dynamic, key = core.flatten_split(t, _always)
        assert key.num_leaves == 4
    jtu.register_dataclass(Late, data_fields=["a", "b"], meta_fields=[])
    jtu.register_pytree_node(LateNode, lambda n: ((n.a,), None), lambda _, c: LateNode(*c))
    for t in (tree, deep):
        dynamic, key = core.flatten_split(t, _always)
        assert [id(x) for x in dynamic] == [id(x) for x in jtu.tree_leaves(t)]
        assert key.num_leaves == 6
        rebuilt = core.rebuild(key, dynamic)
        assert jtu.tree_structure(rebuilt) == jtu.tree_structure(t)


@pytest.mark.single_backend
def test_native_core_reads_register_dataclass_fields_itself():
    """On this jax, the native core reads a `register_dataclass` node's fields itself (depth
    first, as jaxlib does) rather than calling the registered flatten function (which reads
    all of a node's fields before its children's). Fails if a jax release changes how
    `register_dataclass` records its fields, so the fast path is not lost unnoticed."""
    reads = []

    class Logged:
        def __getattribute__(self, name):
            if not name.startswith("__"):
                reads.append(f"{type(self).__name__}.{name}")
            return object.__getattribute__(self, name)

    @dataclasses.dataclass
    class Inner(Logged):
        x: Any

    @dataclasses.dataclass
    class Outer(Logged):
        a: Any
        b: Any
        tag: str

    jtu.register_dataclass(Inner, data_fields=["x"], meta_fields=[])
    jtu.register_dataclass(Outer, data_fields=["a", "b"], meta_fields=["tag"])
    native_core().flatten_split(Outer(Inner(1), 2, "t"))
    assert reads == ["Outer.tag", "Outer.a", "Inner.x", "Outer.b"]


@pytest.mark.single_backend
def test_native_core_calls_the_registered_functions_of_an_unusual_dataclass_entry():
    """A dataclass node whose registry entry is not the pair `register_dataclass` made is
    flattened and rebuilt by the registered functions, as any custom node."""
    from jax._src import tree_util as jax_tree_util

    @dataclasses.dataclass
    class Wrapped:
        a: Any
        b: Any

    jtu.register_dataclass(Wrapped, data_fields=["a", "b"], meta_fields=[])
    entry = jax_tree_util._registry[Wrapped]
    calls = []

    def to_iter(x):
        calls.append("flatten")
        return entry.to_iter(x)

    def from_iter(aux, children):
        calls.append("unflatten")
        return entry.from_iter(aux, children)

    jax_tree_util._registry[Wrapped] = type(entry)(to_iter, from_iter)
    try:
        native = native_core()
        dynamic, key = native.flatten_split(Wrapped(1, jnp.ones(1)))
        assert calls == ["flatten"]
        rebuilt = native.rebuild(key, dynamic)
        assert calls == ["flatten", "unflatten"]
        assert type(rebuilt) is Wrapped and rebuilt.a == 1 and rebuilt.b is dynamic[0]
    finally:
        jax_tree_util._registry[Wrapped] = entry


@pytest.mark.single_backend
@SETTINGS
@given(tree_specs, st.sampled_from([None, filterjax.is_array, is_python_number, _always]))
def test_native_agrees_with_python_and_jax(spec, predicate):
    native = native_core()
    tree = build(spec)
    leaves = jtu.tree_leaves(tree)
    # Arrays may be static here, and arrays are not hashable: do not hash the keys.
    py_dyn, py_key = _pycore.flatten_split(tree, predicate, hashed=False)
    nat_dyn, nat_key = native.flatten_split(tree, predicate, hashed=False)
    test = filterjax.is_array if predicate is None else predicate
    assert py_key.mask == nat_key.mask == tuple(bool(test(x)) for x in leaves)
    assert [id(x) for x in nat_dyn] == [id(x) for x in py_dyn]
    assert [id(x) for x in nat_key.statics] == [id(x) for x in py_key.statics]
    assert (nat_key.num_leaves, nat_key.num_dynamic, nat_key.num_static) == (
        py_key.num_leaves,
        py_key.num_dynamic,
        py_key.num_static,
    )
    assert_same_tree(native.rebuild(nat_key, nat_dyn), _pycore.rebuild(py_key, py_dyn))
    statics_none = [None] * nat_key.num_static
    assert_same_tree(
        native.rebuild(nat_key, nat_dyn, statics_none),
        _pycore.rebuild(py_key, py_dyn, statics_none),
    )
    assert native.is_array(tree) == _pycore.is_array(tree)
    assert [native.is_array(x) for x in leaves] == [_pycore.is_array(x) for x in leaves]


# --------------------------------------------------------------------------------------------
# (b) partition by is_array and rebuild
# --------------------------------------------------------------------------------------------


@SETTINGS
@given(tree_specs)
def test_array_partition_round_trips(spec):
    tree = build(spec)
    leaves = jtu.tree_leaves(tree)
    dynamic, key = _backend.flatten_split(tree)
    assert key.mask == tuple(filterjax.is_array(x) for x in leaves)
    pairs = list(zip(leaves, key.mask, strict=True))
    assert [id(x) for x in dynamic] == [id(x) for x, m in pairs if m]
    assert [id(x) for x in key.statics] == [id(x) for x, m in pairs if not m]
    assert key.num_dynamic + key.num_static == key.num_leaves == len(leaves)

    rebuilt = _backend.rebuild(key, dynamic)
    assert jtu.tree_structure(rebuilt) == jtu.tree_structure(tree)
    assert_same_tree(rebuilt, tree)

    # The explicit predicate takes the slow path and must agree with the fast one.
    dynamic2, key2 = _backend.flatten_split(tree, filterjax.is_array)
    assert key2.mask == key.mask and key2 == key
    assert [id(x) for x in dynamic2] == [id(x) for x in dynamic]


@SETTINGS
@given(tree_specs)
def test_rebuild_with_none_gives_the_filtered_halves(spec):
    tree = build(spec)
    dynamic, key = _backend.flatten_split(tree)
    arrays_only = _backend.rebuild(key, dynamic, [None] * key.num_static)
    statics_only = _backend.rebuild(key, [None] * key.num_dynamic)
    assert_same_tree(arrays_only, filterjax.filter(tree, filterjax.is_array))
    assert_same_tree(statics_only, filterjax.filter(tree, filterjax.is_array, inverse=True))
    assert_same_tree(arrays_only, eqx.filter(tree, eqx.is_array))
    assert_same_tree(filterjax.combine(arrays_only, statics_only), tree)


@SETTINGS
@given(tree_specs)
def test_hashed_false_gives_the_same_result(spec):
    tree = build(spec)
    dynamic, key = _backend.flatten_split(tree)
    dynamic_lazy, key_lazy = _backend.flatten_split(tree, hashed=False)
    assert [id(x) for x in dynamic_lazy] == [id(x) for x in dynamic]
    assert key_lazy == key and hash(key_lazy) == hash(key)


# --------------------------------------------------------------------------------------------
# (c) keys
# --------------------------------------------------------------------------------------------


@SETTINGS
@given(tree_specs)
def test_equal_structure_and_statics_give_equal_keys(spec):
    first, second = build(spec, variant=0), build(spec, variant=1)
    _, key1 = _backend.flatten_split(first)
    _, key2 = _backend.flatten_split(second)
    assert key1 == key2 and not (key1 != key2)
    assert hash(key1) == hash(key2)
    assert {key1: "hit"}[key2] == "hit"
    assert isinstance(key1, _backend.StaticKey)


@SETTINGS
@given(changed_specs())
def test_any_single_difference_gives_unequal_keys(specs):
    spec, changed = specs
    _, key = _backend.flatten_split(build(spec))
    _, other = _backend.flatten_split(build(changed))
    assert key != other and not (key == other)
    assert other not in {key: None}


@pytest.mark.single_backend
@SETTINGS
@given(changed_specs(), st.booleans())
def test_native_and_python_keys_agree_on_equality(specs, change):
    native = native_core()
    spec, changed = specs
    a, b = build(spec, 0), build(changed if change else spec, 1)
    py_equal = _pycore.flatten_split(a)[1] == _pycore.flatten_split(b)[1]
    nat_a, nat_b = native.flatten_split(a)[1], native.flatten_split(b)[1]
    assert (nat_a == nat_b) == py_equal == (not change)
    if py_equal:
        assert hash(nat_a) == hash(nat_b)


@pytest.mark.parametrize(
    "left, right",
    [
        ([1], [1.0]),
        ([1], [True]),
        ([1.0], [True]),
        ([0], [False]),
        ([1 + 0j], [1.0]),
        ({"a": 1}, {"b": 1}),
        ({1: "x"}, {"1": "x"}),
        ([1, 2], (1, 2)),
        (NT2(1, 2), NT2Twin(1, 2)),
        (NT2(1, 2), (1, 2)),
        ({"a": 1}, OrderedDict(a=1)),
        ({"a": 1}, defaultdict(list, a=1)),
        (OrderedDict(a=1, b=2), OrderedDict(b=2, a=1)),
        (Box([1], 0), Box([1], 1)),
        (Box([1], 0), KeyedBox([1], 0)),
        (DC(1, 2, 0), DC(1, 2, 1)),
        (EqxNode(1, 2, tag="relu"), EqxNode(1, 2, tag="tanh")),
        ([jnp.ones(2), "a"], ["a", jnp.ones(2)]),
        ([jnp.ones(2)], [1.0]),
        ([np.float32(1)], [1.0]),
        ([None], [()]),
        ([None], [1]),
        (["a"], ["b"]),
        ([Tag(1)], [Tag(2)]),
    ],
)
def test_listed_differences_give_unequal_keys(left, right):
    _, key1 = _backend.flatten_split(left)
    _, key2 = _backend.flatten_split(right)
    assert key1 != key2


def test_statics_compare_by_value_not_identity():
    first = {"act": "".join(["re", "lu"]), "n": 10**30, "t": Tag(3), "w": jnp.ones(3)}
    second = {"act": "".join(["r", "elu"]), "n": 10**30 + 0, "t": Tag(3), "w": jnp.zeros((5, 2))}
    assert first["act"] is not second["act"] and first["t"] is not second["t"]
    _, key1 = _backend.flatten_split(first)
    _, key2 = _backend.flatten_split(second)
    assert key1 == key2 and hash(key1) == hash(key2)


# --------------------------------------------------------------------------------------------
# (d) filtering API against Equinox
# --------------------------------------------------------------------------------------------

_REPLACED = Tag("replaced")


@SETTINGS
@given(specs_with_filter_spec(), st.sampled_from([None, _REPLACED]))
def test_partition_and_combine_match_equinox(specs, replace):
    spec, filter_spec = specs
    tree = build(spec)
    left, right = filterjax.partition(tree, filter_spec, replace=replace)
    eqx_left, eqx_right = eqx.partition(tree, filter_spec, replace=replace)
    assert_same_tree(left, eqx_left)
    assert_same_tree(right, eqx_right)
    if replace is None:
        assert_same_tree(filterjax.combine(left, right), tree)
        assert_same_tree(filterjax.combine(left, right), eqx.combine(eqx_left, eqx_right))
        nothing = filterjax.filter(tree, False)
        assert_same_tree(filterjax.combine(nothing, right, left), tree)


@SETTINGS
@given(specs_with_filter_spec(), st.booleans(), st.sampled_from([None, _REPLACED]))
def test_filter_matches_equinox(specs, inverse, replace):
    spec, filter_spec = specs
    tree = build(spec)
    ours = filterjax.filter(tree, filter_spec, inverse=inverse, replace=replace)
    theirs = eqx.filter(tree, filter_spec, inverse=inverse, replace=replace)
    assert_same_tree(ours, theirs)
    kept, dropped = filterjax.partition(tree, filter_spec, replace=replace)
    assert_same_tree(ours, dropped if inverse else kept)


def _is_box(x):
    return isinstance(x, (Box, KeyedBox))


@SETTINGS
@given(tree_specs, st.sampled_from([filterjax.is_array, _is_box, _always]))
def test_is_leaf_is_honoured(spec, predicate):
    tree = build(spec)
    expected = jtu.tree_leaves(tree, is_leaf=_is_box)
    dynamic, key = _backend.flatten_split(tree, _always, is_leaf=_is_box)
    assert [id(x) for x in dynamic] == [id(x) for x in expected]
    dynamic, key = _backend.flatten_split(tree, predicate, is_leaf=_is_box, hashed=False)
    assert key.mask == tuple(bool(predicate(x)) for x in expected)
    assert_same_tree(_backend.rebuild(key, dynamic), tree)

    ours = filterjax.partition(tree, predicate, is_leaf=_is_box)
    theirs = eqx.partition(tree, predicate, is_leaf=_is_box)
    assert_same_tree(ours[0], theirs[0], is_leaf=_is_box)
    assert_same_tree(ours[1], theirs[1], is_leaf=_is_box)
    combined = filterjax.combine(*ours, is_leaf=_is_box)
    assert_same_tree(combined, eqx.combine(*theirs, is_leaf=_is_box), is_leaf=_is_box)
    assert_same_tree(combined, tree)


def _one_like(x):
    return jnp.ones_like(x) if filterjax.is_inexact_array(x) else None


@SETTINGS
@given(tree_specs)
def test_apply_updates_matches_equinox(spec):
    model = build(spec)
    updates = jtu.tree_map(_one_like, model)
    ours = filterjax.apply_updates(model, updates)
    theirs = eqx.apply_updates(model, updates)
    ours_leaves, ours_def = jtu.tree_flatten(ours)
    theirs_leaves, theirs_def = jtu.tree_flatten(theirs)
    assert ours_def == theirs_def == jtu.tree_structure(model)
    for a, b, original in zip(ours_leaves, theirs_leaves, jtu.tree_leaves(model), strict=True):
        if filterjax.is_inexact_array(original):
            assert type(a) is type(b)
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            np.testing.assert_array_equal(np.asarray(a), np.asarray(original) + 1)
        else:
            assert a is original and b is original


def test_apply_updates_with_prefix_updates():
    model = {"a": [jnp.ones(2), "act"], "b": (jnp.zeros(3), 2.0)}
    updates = {"a": None, "b": (jnp.ones(3), 1.0)}
    ours = filterjax.apply_updates(model, updates)
    theirs = eqx.apply_updates(model, updates)
    assert ours["a"][0] is model["a"][0]
    np.testing.assert_array_equal(ours["b"][0], theirs["b"][0])
    assert ours["b"][1] == theirs["b"][1] == 3.0


def test_prefix_filter_spec_of_bools_and_callables():
    tree = {"enc": [jnp.ones(2), 3, "x"], "dec": (jnp.zeros(1), 4.0), "cfg": {"lr": 0.1}}
    spec = {"enc": filterjax.is_array, "dec": True, "cfg": False}
    ours = filterjax.filter(tree, spec)
    assert_same_tree(ours, eqx.filter(tree, spec))
    assert ours["enc"][0] is tree["enc"][0] and ours["enc"][1] is None
    assert ours["dec"][1] == 4.0 and ours["cfg"]["lr"] is None
    with pytest.raises(ValueError):
        filterjax.filter(tree, {"enc": 1, "dec": True, "cfg": False})


# --------------------------------------------------------------------------------------------
# Predicates against Equinox
# --------------------------------------------------------------------------------------------


class _HasJaxArray:
    def __init__(self, value):
        self.value = value

    def __jax_array__(self):
        return self.value


def _predicate_values():
    values = [
        jnp.ones(()),
        jnp.ones((2, 3), jnp.float16),
        jnp.ones(2, jnp.bfloat16),
        jnp.arange(3),
        jnp.array([True]),
        jnp.ones(2, jnp.complex64),
        jnp.zeros((0,), jnp.uint8),
        np.ones(2),
        np.arange(3),
        np.array(["a"]),
        np.array([object()], dtype=object),
        np.ma.masked_array([1.0, 2.0], mask=[0, 1]),
        np.float32(1),
        np.float64(1),
        np.int8(1),
        np.bool_(True),
        np.complex64(1),
        np.str_("s"),
        np.datetime64("2020-01-01"),
        1,
        1.0,
        True,
        1j,
        2**80,
        "s",
        b"b",
        None,
        object(),
        [1.0],
        (),
        {},
        identity_fn,
        jax.ShapeDtypeStruct((2,), jnp.float32),
        _HasJaxArray(jnp.ones(2)),
        _HasJaxArray(jnp.arange(2)),
        _HasJaxArray(np.float32(1)),
    ]
    try:
        from jax._src import literals
    except ImportError:
        return values
    values.append(literals.TypedNdArray(np.ones(2, np.float32), None))
    values.append(literals.TypedFloat(1.0, np.dtype(np.float32)))
    values.append(literals.TypedInt(1, np.dtype(np.int32)))
    return values


_PREDICATE_PAIRS = [
    (filterjax.is_array, eqx.is_array),
    (filterjax.is_array_like, eqx.is_array_like),
    (filterjax.is_inexact_array, eqx.is_inexact_array),
    (filterjax.is_inexact_array_like, eqx.is_inexact_array_like),
    (filterjax.if_array(0), eqx.if_array(0)),
    (filterjax.if_array(1), eqx.if_array(1)),
]


def _outcome(predicate, value):
    try:
        return predicate(value)
    except Exception as err:
        return f"raises {type(err).__name__}: {err}"


def _verdicts(value):
    verdicts = []
    for ours, theirs in _PREDICATE_PAIRS:
        expected = _outcome(theirs, value)
        if theirs is eqx.is_inexact_array_like and isinstance(value, jax.Array):
            # Equinox 0.13.8 raises here on tracers (their `__jax_array__` attribute is None
            # under JAX 0.10); the answer it means is that of `is_inexact_array`.
            expected = eqx.is_inexact_array(value)
        verdicts.append((_outcome(ours, value), expected))
    return verdicts


def _assert_agree(value, verdicts):
    for (ours, theirs), (fj_pred, _) in zip(verdicts, _PREDICATE_PAIRS, strict=True):
        assert ours == theirs, f"{fj_pred!r} on {type(value).__name__}: {ours} vs {theirs}"
        assert type(ours) is type(theirs) or {type(ours), type(theirs)} <= {bool, np.bool_}


@pytest.mark.parametrize("value", _predicate_values(), ids=lambda v: type(v).__name__)
def test_predicates_agree_with_equinox(value):
    _assert_agree(value, _verdicts(value))
    assert filterjax.is_array(value) == _pycore.is_array(value) == _backend.is_array_fast(value)


@pytest.mark.parametrize("dtype", ["float32", "int32", "bool", "complex64", "float16"])
@pytest.mark.parametrize("transform", ["jit", "vmap", "grad", "jvp"])
def test_predicates_agree_on_tracers(transform, dtype):
    seen = []

    def probe(x):
        seen.append((type(x), _verdicts(x), filterjax.is_array(x)))
        return jnp.sum(x.astype(jnp.float32)) if dtype != "complex64" else jnp.sum(x.real)

    x = jnp.ones((2, 3), dtype)
    if transform == "jit":
        jax.jit(probe)(x)
    elif transform == "vmap":
        jax.vmap(probe)(x)
    elif transform == "grad":
        if not jnp.issubdtype(x.dtype, jnp.floating):
            pytest.skip("grad needs a float input")
        jax.grad(probe)(x)
    else:
        if not jnp.issubdtype(x.dtype, jnp.floating):
            pytest.skip("jvp needs a float input")
        jax.jvp(probe, (x,), (jnp.ones_like(x),))
    assert len(seen) == 1
    kind, verdicts, fast = seen[0]
    assert issubclass(kind, jax.core.Tracer)
    _assert_agree(kind, verdicts)
    assert fast is True


def test_core_partition_sees_tracers_as_dynamic():
    results = []

    def f(w):
        tree = {"w": w, "n": 3, "act": "relu"}
        dynamic, key = _backend.flatten_split(tree)
        results.append((len(dynamic), dynamic[0] is w, key.statics))
        return _backend.rebuild(key, dynamic)["w"] * 2

    out = jax.jit(f)(jnp.ones(3))
    jax.vmap(f)(jnp.ones((2, 3)))
    jax.grad(lambda w: f(w).sum())(jnp.ones(3))
    np.testing.assert_array_equal(out, 2 * np.ones(3))
    assert results == [(1, True, ("relu", 3))] * 3


# --------------------------------------------------------------------------------------------
# Types registered after the first partition call
# --------------------------------------------------------------------------------------------


def test_type_registered_after_first_partition_is_honoured():
    class Late:
        def __init__(self, a, b):
            self.a, self.b = a, b

    a, b = jnp.ones(2), "static"
    tree = [Late(a, b), jnp.zeros(1)]
    dynamic, key = _backend.flatten_split(tree, _always)
    assert [id(x) for x in dynamic] == [id(tree[0]), id(tree[1])]
    assert key.num_leaves == 2

    jtu.register_pytree_node(Late, lambda n: ((n.a, n.b), None), lambda _, c: Late(*c))
    dynamic, key = _backend.flatten_split(tree, _always)
    assert [id(x) for x in dynamic] == [id(a), id(b), id(tree[1])]
    dynamic, key = _backend.flatten_split(tree)
    assert [id(x) for x in dynamic] == [id(a), id(tree[1])]
    assert key.statics == ("static",)
    rebuilt = _backend.rebuild(key, dynamic)
    assert type(rebuilt[0]) is Late and rebuilt[0].a is a and rebuilt[0].b == "static"


@pytest.mark.single_backend
def test_late_registration_seen_by_both_cores(core):
    @dataclasses.dataclass(eq=False)  # hashable by identity while it is still a leaf
    class LateDC:
        x: Any
        m: int

    @jax.tree_util.register_static
    class LateStatic:
        def __init__(self, v):
            self.v = v

        def __eq__(self, other):
            return type(other) is type(self) and other.v == self.v

        def __hash__(self):
            return hash(self.v)

    LateNT = namedtuple("LateNT", ["p", "q"])
    tree = [LateDC(jnp.ones(1), 3), LateNT(1, jnp.ones(2))]
    _, key_before = core.flatten_split(tree)
    assert key_before.num_leaves == 3 and key_before.statics == (tree[0], 1)
    jtu.register_dataclass(LateDC, data_fields=["x"], meta_fields=["m"])
    dynamic, key = core.flatten_split(tree)
    assert key.num_leaves == 3 and key.statics == (1,)
    assert [id(x) for x in dynamic] == [id(tree[0].x), id(tree[1].q)]
    assert key != core.flatten_split([LateDC(jnp.ones(1), 4), LateNT(1, jnp.ones(2))])[1]
    # register_static: the object is structure (part of the key), not a leaf
    _, key_a = core.flatten_split([LateStatic(1), jnp.ones(1)])
    _, key_b = core.flatten_split([LateStatic(1), jnp.ones(1)])
    _, key_c = core.flatten_split([LateStatic(2), jnp.ones(1)])
    assert key_a.num_leaves == 1 and key_a == key_b and key_a != key_c


@pytest.mark.single_backend
def test_cores_are_safe_to_call_from_threads(core):
    import threading

    tree = {"w": [jnp.ones(2), jnp.zeros(3)], "cfg": ("relu", 3, Tag(1)), "box": Box([1.0], 2)}
    expected_leaves = jtu.tree_leaves(tree)
    _, expected_key = core.flatten_split(tree)
    failures = []

    def work():
        try:
            for _ in range(300):
                dynamic, key = core.flatten_split(tree)
                assert key == expected_key and hash(key) == hash(expected_key)
                assert_same_tree(core.rebuild(key, dynamic), tree)
                dynamic, _ = core.flatten_split(tree, _always)
                assert [id(x) for x in dynamic] == [id(x) for x in expected_leaves]
        except BaseException as err:  # collected and re-raised in the main thread
            failures.append(err)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures[0]
