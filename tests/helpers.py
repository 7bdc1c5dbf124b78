"""Shared test helpers: the Hypothesis strategies that generate PyTrees (as specs, built by
`build`), the node types they use, and tree comparisons.

Used by the core property tests (test_core_properties.py) and the filtering helpers'
tests (test_filters.py).
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter, OrderedDict, defaultdict, namedtuple
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st

import filterjax

# The autouse `backend` fixture is function scoped on purpose: the backend stays the same for
# every example of one test, so the health check about function-scoped fixtures does not apply.
_HEALTH = [
    HealthCheck.function_scoped_fixture,
    HealthCheck.too_slow,
    HealthCheck.data_too_large,
]
settings.register_profile(
    "filterjax-core", max_examples=100, deadline=None, suppress_health_check=_HEALTH
)
settings.register_profile(
    "filterjax-core-thorough", max_examples=1000, deadline=None, suppress_health_check=_HEALTH
)
_PROFILE = (
    "filterjax-core-thorough" if os.environ.get("FILTERJAX_CORE_PROFILE") else "filterjax-core"
)
SETTINGS = settings.get_profile(_PROFILE)


# --------------------------------------------------------------------------------------------
# Node types and leaf values the generated trees are made of
# --------------------------------------------------------------------------------------------

NT2 = namedtuple("NT2", ["a", "b"])
NT2Twin = namedtuple("NT2Twin", ["a", "b"])  # same fields as NT2, different type
NT3 = namedtuple("NT3", ["x", "y", "z"])
_NAMEDTUPLES = {"NT2": NT2, "NT2Twin": NT2Twin, "NT3": NT3}


class Box:
    """Registered with `register_pytree_node`; `aux` is its aux data."""

    def __init__(self, children, aux):
        self.children = list(children)
        self.aux = aux


jtu.register_pytree_node(Box, lambda b: (tuple(b.children), b.aux), lambda a, c: Box(c, a))


class KeyedBox:
    """Registered with `register_pytree_with_keys`; `aux` is its aux data."""

    def __init__(self, children, aux):
        self.children = list(children)
        self.aux = aux


def _keyed_flatten(box):
    keyed = tuple((jtu.GetAttrKey(f"c{i}"), c) for i, c in enumerate(box.children))
    return keyed, box.aux


jtu.register_pytree_with_keys(KeyedBox, _keyed_flatten, lambda a, c: KeyedBox(c, a))


@dataclasses.dataclass
class DC:
    a: Any
    b: Any
    meta: Any


jtu.register_dataclass(DC, data_fields=["a", "b"], meta_fields=["meta"])


@jtu.register_dataclass
@dataclasses.dataclass(frozen=True)
class DCFields:
    """Fields found by `register_dataclass` itself: two meta fields between data fields."""

    x: Any
    name: str = dataclasses.field(metadata={"static": True})
    y: Any = None
    size: int = dataclasses.field(default=0, metadata={"static": True})
    z: Any = None


@jtu.register_dataclass
@dataclasses.dataclass
class DCData:
    """Data fields only: its node data is the empty tuple."""

    p: Any
    q: Any


# --------------------------------------------------------------------------------------------
# `register_dataclass` variants: how their rebuild must match `type(**fields)`
# --------------------------------------------------------------------------------------------

# What a variant's own methods record: (variant special, event) -> calls.
DATACLASS_EVENTS: Counter = Counter()

# What each variant adds to a plain dataclass. Only "plain" may be rebuilt without calling
# the type; the others must see their method run exactly as `type(**fields)` runs it.
DATACLASS_SPECIALS = (
    "plain",
    "post_init",  # records that it ran
    "post_init_transform",  # rewrites a meta field
    "user_init",  # a user-written __init__
    "setattr",  # a class with its own __setattr__ (never frozen)
    "initvar",  # an InitVar (with a default) passed on to __post_init__
    "init_false",  # a field with init=False (registered explicitly, without it)
    "new",  # a class with its own __new__
)


@dataclasses.dataclass(frozen=True)
class DataclassVariant:
    frozen: bool = False
    slots: bool = False
    kw_only: bool = False
    defaults: bool = False  # the last two fields have a default / default factory
    meta_first: bool = False  # field order: n, tag, w, b (else w, n, b, tag)
    inherit: bool = False  # the first two fields in a dataclass base
    special: str = "plain"
    auto: bool = True  # register_dataclass finds the fields itself (static metadata)

    def normalized(self) -> DataclassVariant:
        """The variant as built: a class with `__setattr__` cannot be frozen, and a field
        with init=False can only be registered by naming the others."""
        changes: dict[str, Any] = {}
        if self.special == "setattr":
            changes["frozen"] = False
        if self.special == "init_false":
            changes["auto"] = False
        return dataclasses.replace(self, **changes)


def _variant_field(name: str, with_default: bool):
    static = {"static": True} if name in ("n", "tag") else {}
    if not with_default:
        return dataclasses.field(metadata=static)
    if name == "b":
        return dataclasses.field(default_factory=list, metadata=static)
    default = {"w": None, "n": 0, "tag": "t"}[name]
    return dataclasses.field(default=default, metadata=static)


def _variant_namespace(special: str) -> dict:
    count = DATACLASS_EVENTS

    def post_init(self, *initvars):
        count[special, "post_init"] += 1
        if special == "post_init_transform" and self.tag != self.tag.upper():
            # Once upper case, kept as the same object: rebuilt nodes hold the same tag.
            object.__setattr__(self, "tag", self.tag.upper())

    def init(self, **fields):
        count[special, "init"] += 1
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def setattr_(self, name, value):
        count[special, "setattr"] += 1
        object.__setattr__(self, name, value)

    def new(cls, *args, **kwargs):
        count[special, "new"] += 1
        return object.__new__(cls)

    return {
        "post_init": {"__post_init__": post_init},
        "post_init_transform": {"__post_init__": post_init},
        "initvar": {"__post_init__": post_init},
        "user_init": {"__init__": init},
        "setattr": {"__setattr__": setattr_},
        "new": {"__new__": new},
    }.get(special, {})


_VARIANT_CLASSES: dict[DataclassVariant, type] = {}


def dataclass_variant(variant: DataclassVariant) -> type:
    """The registered dataclass for `variant` (made once): data fields `w`, `b` and meta
    fields `n` (int), `tag` (str), as `variant` orders and decorates them."""
    variant = variant.normalized()
    if variant in _VARIANT_CLASSES:
        return _VARIANT_CLASSES[variant]
    order = ["n", "tag", "w", "b"] if variant.meta_first else ["w", "n", "b", "tag"]
    specs = [
        (name, Any, _variant_field(name, variant.defaults and i >= 2))
        for i, name in enumerate(order)
    ]
    extra = []
    if variant.special == "initvar":
        extra.append(("scale", dataclasses.InitVar[int], dataclasses.field(default=1)))
    if variant.special == "init_false":
        extra.append(("extra", int, dataclasses.field(default=7, init=False)))
    options = {"frozen": variant.frozen, "slots": variant.slots, "kw_only": variant.kw_only}
    name = f"DCV_{abs(hash(variant)):x}"
    namespace = _variant_namespace(variant.special)
    if variant.inherit:
        base = dataclasses.make_dataclass(name + "Base", specs[:2], **options)
        kind = dataclasses.make_dataclass(
            name, specs[2:] + extra, bases=(base,), namespace=namespace, **options
        )
    else:
        kind = dataclasses.make_dataclass(name, specs + extra, namespace=namespace, **options)
    if variant.auto:
        jtu.register_dataclass(kind)
    else:
        # Names in an order of their own: the rebuild must not depend on it.
        jtu.register_dataclass(kind, data_fields=["b", "w"], meta_fields=["tag", "n"])
    _VARIANT_CLASSES[variant] = kind
    return kind


dataclass_variants = st.builds(
    DataclassVariant,
    frozen=st.booleans(),
    slots=st.booleans(),
    kw_only=st.booleans(),
    defaults=st.booleans(),
    meta_first=st.booleans(),
    inherit=st.booleans(),
    special=st.sampled_from(DATACLASS_SPECIALS),
    auto=st.booleans(),
).map(DataclassVariant.normalized)


class EqxNode(eqx.Module):
    w: Any
    b: Any
    tag: str = eqx.field(static=True)


class Tag:
    """A hashable non-array leaf; equal tags are distinct objects."""

    __slots__ = ("v",)

    def __init__(self, v):
        self.v = v

    def __eq__(self, other):
        return type(other) is Tag and other.v == self.v

    def __hash__(self):
        return hash(("Tag", self.v))

    def __repr__(self):
        return f"Tag({self.v})"


def identity_fn(x):
    return x


_plus_one = lambda x: x + 1
_FUNCTIONS = (identity_fn, _plus_one, jnp.sum, len, jax.nn.relu)

_JAX_DTYPES = ("float32", "int32", "bool", "complex64", "bfloat16", "float16", "uint8")
_NP_DTYPES = ("float64", "int64", "bool", "complex128", "float32", "<U3")
_NP_SCALARS = {
    "float32": np.float32,
    "float64": np.float64,
    "int8": np.int8,
    "uint16": np.uint16,
    "bool": np.bool_,
    "complex64": np.complex64,
}
_SHAPES = ((), (0,), (3,), (2, 3))


def _numbers(shape, variant):
    # The variant changes both values and shape: keys must not depend on either.
    if variant:
        shape = tuple(shape) + (variant + 1,)
    size = int(np.prod(shape, dtype=np.int64))
    return (np.arange(size) + variant).reshape(shape)


def _jax_leaf(meta, variant):
    dtype, shape = meta
    return jnp.asarray(_numbers(shape, variant), dtype=dtype)


def _np_leaf(meta, variant):
    dtype, shape = meta
    return _numbers(shape, variant).astype(dtype)


def _fresh_str(s: str) -> str:
    # A new str object equal to `s` (for length >= 2; shorter ones are cached by CPython).
    return "".join(list(s))


# Each builder returns a new object equal to the one built from the same spec.
_LEAF_BUILDERS = {
    "jax": _jax_leaf,
    "np": _np_leaf,
    "npscalar": lambda m, v: _NP_SCALARS[m](v + 1),
    "int": lambda m, v: int(str(m)),
    "float": lambda m, v: float(repr(m)),
    "bool": lambda m, v: bool(m),
    "complex": lambda m, v: complex(m[0], m[1]),
    "str": lambda m, v: _fresh_str(m),
    "fn": lambda m, v: _FUNCTIONS[m],
    "tag": lambda m, v: Tag(m),
}
_DYNAMIC_KINDS = frozenset({"jax", "np", "npscalar"})


def _make_node(kind, meta, children):
    if kind == "none":
        return None
    if kind == "tuple":
        return tuple(children)
    if kind == "list":
        return list(children)
    if kind == "dict":
        return dict(zip(meta, children, strict=True))
    if kind == "odict":
        return OrderedDict(zip(meta, children, strict=True))
    if kind == "ddict":
        return defaultdict(list, zip(meta, children, strict=True))
    if kind == "nt":
        return _NAMEDTUPLES[meta](*children)
    if kind == "box":
        return Box(children, int(str(meta)))
    if kind == "keyed":
        return KeyedBox(children, int(str(meta)))
    if kind == "dc":
        return DC(children[0], children[1], int(str(meta)))
    if kind == "dcfields":
        return DCFields(
            children[0], _fresh_str(meta[0]), children[1], int(str(meta[1])), children[2]
        )
    if kind == "dcdata":
        return DCData(children[0], children[1])
    if kind == "eqx":
        return EqxNode(children[0], children[1], tag=_fresh_str(meta))
    raise AssertionError(kind)


def build(spec, variant: int = 0):
    """The PyTree described by `spec`. Different variants differ only in their arrays."""
    kind, meta, kids = spec
    builder = _LEAF_BUILDERS.get(kind)
    if builder is not None:
        return builder(meta, variant)
    return _make_node(kind, meta, [build(k, variant) for k in kids])


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------

_finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)

leaf_specs = st.one_of(
    st.tuples(st.sampled_from(_JAX_DTYPES), st.sampled_from(_SHAPES)).map(lambda m: ("jax", m, ())),
    st.tuples(st.sampled_from(_NP_DTYPES), st.sampled_from(_SHAPES)).map(lambda m: ("np", m, ())),
    st.sampled_from(sorted(_NP_SCALARS)).map(lambda m: ("npscalar", m, ())),
    st.one_of(st.integers(-3, 300), st.integers(-(2**70), 2**70)).map(lambda m: ("int", m, ())),
    _finite.map(lambda m: ("float", m, ())),
    st.booleans().map(lambda m: ("bool", m, ())),
    st.tuples(_finite, _finite).map(lambda m: ("complex", m, ())),
    st.text(max_size=4).map(lambda m: ("str", m, ())),
    st.integers(0, len(_FUNCTIONS) - 1).map(lambda m: ("fn", m, ())),
    st.integers(0, 9).map(lambda m: ("tag", m, ())),
    st.just(("none", None, ())),
)

_STR_KEYS = st.text(alphabet="abcxyz_", min_size=1, max_size=3)
_INT_KEYS = st.integers(-3, 40)


def dataclass_nodes(children) -> list:
    """Strategies for the three `register_dataclass` node types, over `children`."""
    pair = st.tuples(children, children)
    return [
        st.tuples(st.integers(0, 5), pair).map(lambda t: ("dc", t[0], t[1])),
        st.tuples(
            st.tuples(st.sampled_from(("a", "b")), st.integers(0, 2)),
            st.tuples(children, children, children),
        ).map(lambda t: ("dcfields", t[0], t[1])),
        pair.map(lambda c: ("dcdata", None, c)),
    ]


def _node_specs(children):
    kids = st.lists(children, max_size=4).map(tuple)

    def mapping(kind):
        # str keys or int keys, never mixed (mixed keys cannot be sorted). Keys and children
        # are drawn apart: `unique_by` on (key, child) pairs would repr the child strategy.
        keys = st.one_of(
            st.lists(_STR_KEYS, max_size=4, unique=True),
            st.lists(_INT_KEYS, max_size=4, unique=True),
        )
        return st.tuples(keys, kids).map(
            lambda t: (kind, tuple(t[0][: len(t[1])]), t[1][: len(t[0])])
        )

    pair = st.tuples(children, children)
    return st.one_of(
        kids.map(lambda c: ("tuple", None, c)),
        kids.map(lambda c: ("list", None, c)),
        mapping("dict"),
        mapping("odict"),
        mapping("ddict"),
        st.tuples(st.sampled_from(("NT2", "NT2Twin")), pair).map(lambda t: ("nt", t[0], t[1])),
        st.tuples(children, children, children).map(lambda c: ("nt", "NT3", c)),
        st.tuples(st.integers(0, 5), kids).map(lambda t: ("box", t[0], t[1])),
        st.tuples(st.integers(0, 5), kids).map(lambda t: ("keyed", t[0], t[1])),
        *dataclass_nodes(children),
        st.tuples(st.sampled_from(("relu", "tanh")), pair).map(lambda t: ("eqx", t[0], t[1])),
    )


tree_specs = st.recursive(leaf_specs, _node_specs, max_leaves=16)


# --------------------------------------------------------------------------------------------
# Single-place changes: each gives a tree whose key must differ from the original's
# --------------------------------------------------------------------------------------------


def _new_key(keys):
    if keys and isinstance(keys[0], int):
        return max(keys) + 1
    return "new_key"  # longer than any drawn str key


def _alternatives(spec):
    """Specs that differ from `spec` in this one place (and so must give a different key)."""
    kind, meta, kids = spec
    scalar = lambda k, m: (k, m, ())
    if kind in _DYNAMIC_KINDS:
        return [scalar("int", 0), scalar("str", "dynamic->static")]
    if kind == "int":
        out = [scalar("int", meta + 1), scalar("float", float(meta)), scalar("jax", ("int32", ()))]
        if meta in (0, 1):
            out.append(scalar("bool", bool(meta)))
        return out
    if kind == "float":
        return [scalar("float", meta + 1.0), scalar("int", int(meta)), scalar("complex", (meta, 0))]
    if kind == "bool":
        return [scalar("bool", not meta), scalar("int", int(meta)), scalar("float", float(meta))]
    if kind == "complex":
        return [scalar("complex", (meta[0] + 1.0, meta[1])), scalar("float", meta[0])]
    if kind == "str":
        return [scalar("str", meta + "_"), scalar("np", ("<U3", ()))]
    if kind == "fn":
        return [scalar("fn", (meta + 1) % len(_FUNCTIONS))]
    if kind == "tag":
        return [scalar("tag", meta + 1), scalar("int", meta)]
    if kind == "none":
        return [("tuple", None, ()), scalar("int", 0)]
    if kind == "tuple":
        return [("list", None, kids)]
    if kind == "list":
        return [("tuple", None, kids)]
    if kind in ("dict", "odict", "ddict"):
        out = [(other, meta, kids) for other in ("dict", "odict", "ddict") if other != kind]
        if meta:
            out.append((kind, (_new_key(meta),) + meta[1:], kids))
        if kind == "odict" and len(meta) >= 2:
            out.append((kind, meta[::-1], kids[::-1]))
        return out
    if kind == "nt":
        if meta == "NT3":
            return [("tuple", None, kids)]
        return [("nt", "NT2Twin" if meta == "NT2" else "NT2", kids), ("tuple", None, kids)]
    if kind == "box":
        return [("box", meta + 1, kids), ("keyed", meta, kids)]
    if kind == "keyed":
        return [("keyed", meta + 1, kids)]
    if kind == "dc":
        return [("dc", meta + 1, kids)]
    if kind == "dcfields":
        name, size = meta
        return [("dcfields", (name + "_", size), kids), ("dcfields", (name, size + 1), kids)]
    if kind == "dcdata":
        return [("dc", 0, kids), ("tuple", None, kids)]
    if kind == "eqx":
        return [("eqx", meta + "2", kids)]
    raise AssertionError(kind)


def _positions(spec, path=()):
    yield path, spec
    for i, kid in enumerate(spec[2]):
        yield from _positions(kid, path + (i,))


def _replace_at(spec, path, new):
    if not path:
        return new
    kind, meta, kids = spec
    i = path[0]
    return (kind, meta, kids[:i] + (_replace_at(kids[i], path[1:], new),) + kids[i + 1 :])


@st.composite
def changed_specs(draw):
    """(spec, the same spec changed in exactly one place)."""
    spec = draw(tree_specs)
    changes = [
        (path, alt) for path, sub in _positions(spec) for alt in _alternatives(sub) if alt != sub
    ]
    # Draw an index: `sampled_from(changes)` would repr every spec in the list.
    path, alt = changes[draw(st.integers(0, len(changes) - 1))]
    return spec, _replace_at(spec, path, alt)


# --------------------------------------------------------------------------------------------
# Filter specs: prefix trees of bools and callables
# --------------------------------------------------------------------------------------------


def is_python_number(x):
    return isinstance(x, (bool, int, float, complex))


def _is_str(x):
    return isinstance(x, str)


def _is_jax_array(x):
    return isinstance(x, jax.Array)


_SPEC_LEAVES = (
    True,
    False,
    filterjax.is_array,
    filterjax.is_inexact_array,
    is_python_number,
    _is_str,
    _is_jax_array,
)


@st.composite
def filter_specs_for(draw, spec):
    kind, meta, kids = spec
    if kind in _LEAF_BUILDERS or draw(st.booleans()):
        return draw(st.sampled_from(_SPEC_LEAVES))
    return _make_node(kind, meta, [draw(filter_specs_for(k)) for k in kids])


@st.composite
def specs_with_filter_spec(draw):
    spec = draw(tree_specs)
    return spec, draw(filter_specs_for(spec))


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _is_none(x):
    return x is None


def assert_same_tree(actual, expected, is_leaf=None):
    """Same structure (None counted as a leaf) and the very same leaf objects."""
    leaf_test = _is_none if is_leaf is None else (lambda x: x is None or is_leaf(x))
    actual_leaves, actual_def = jtu.tree_flatten(actual, is_leaf=leaf_test)
    expected_leaves, expected_def = jtu.tree_flatten(expected, is_leaf=leaf_test)
    assert actual_def == expected_def
    assert len(actual_leaves) == len(expected_leaves)
    for i, (a, e) in enumerate(zip(actual_leaves, expected_leaves, strict=True)):
        assert a is e, f"leaf {i}: {a!r} is not {e!r}"


def native_core(module_level: bool = False):
    """The native core module. Where it is not built the test is skipped, unless CI
    requires it (`FILTERJAX_REQUIRE_NATIVE=1`, as .ci/run sets), where that fails."""
    import pytest

    try:
        import filterjax._native as native
    except ImportError:
        if os.environ.get("FILTERJAX_REQUIRE_NATIVE") == "1":
            pytest.fail("filterjax._native is not built but FILTERJAX_REQUIRE_NATIVE=1")
        pytest.skip("filterjax._native is not built", allow_module_level=module_level)
    return native


# --------------------------------------------------------------------------------------------
# Shallow calls: positional arguments that are leaves, or tuples, lists and dicts of leaves
# (the Dispatcher matches these argument by argument, without its general walk)
# --------------------------------------------------------------------------------------------

_leaf_kids = st.lists(leaf_specs, max_size=4).map(tuple)
_flat_containers = st.one_of(
    _leaf_kids.map(lambda kids: ("tuple", None, kids)),
    _leaf_kids.map(lambda kids: ("list", None, kids)),
    st.tuples(st.lists(_STR_KEYS, max_size=4, unique=True), _leaf_kids).map(
        lambda t: ("dict", tuple(t[0][: len(t[1])]), t[1][: len(t[0])])
    ),
)
shallow_call_specs = st.lists(st.one_of(leaf_specs, _flat_containers), max_size=4).map(
    lambda args: ("tuple", None, tuple(args))
)


@st.composite
def changed_shallow_calls(draw):
    """(the spec of a shallow call's arguments, the same changed in one place below the
    arguments tuple: some changes leave it shallow, others do not)."""
    spec = draw(shallow_call_specs)
    changes = [
        (path, alt)
        for path, sub in _positions(spec)
        if path
        for alt in _alternatives(sub)
        if alt != sub
    ]
    assume(changes)
    path, alt = changes[draw(st.integers(0, len(changes) - 1))]
    return spec, _replace_at(spec, path, alt)
