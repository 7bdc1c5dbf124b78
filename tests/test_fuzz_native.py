"""Fuzz the native core's entry points against the Python twin.

`filterjax._native.flatten_split`, `rebuild`, `is_array` and `StaticKey`'s hash and equality
get adversarial inputs: nested containers and custom PyTree nodes (some registered with
flatten functions that return garbage or raise), leaves whose `__hash__`/`__eq__`/`__len__`/
`__iter__`/`__bool__`/`__repr__` raise or return garbage, huge ints, NaNs, bytes, trees that
contain themselves, and wrong argument types and counts. Two properties:

- the interpreter never crashes;
- the native module and the Python twin agree: same outputs, or the same exception type.

Each campaign runs in a child interpreter (this file run as a script), so a segfault or a
hang fails one test cleanly instead of killing the test run. The campaigns are bounded to
about a minute in total; `FILTERJAX_FUZZ_SCALE=10` runs ten times as many examples.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import helpers
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from filterjax import _pycore

# ---------------------------------------------------------------------------------------
# Adversarial leaves. Every object built from a spec carries a `tag` (its position in the
# spec), so outputs built separately for the two backends can be compared by description.


class Boom(Exception):
    """What every misbehaving dunder raises (one type, so evaluation order can't matter)."""


class Tagged:
    def __init__(self, tag: str):
        self.tag = tag

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.tag})"


class Plain(Tagged):
    """Hashable by identity."""


class ValueEq(Tagged):
    """Equal to another ValueEq with the same tag."""

    def __hash__(self):
        return hash(self.tag)

    def __eq__(self, other):
        return type(other) is ValueEq and other.tag == self.tag


class HashRaises(Tagged):
    def __hash__(self):
        raise Boom("hash")


class HashGarbage(Tagged):
    def __hash__(self):
        return "not an int"  # type: ignore[return-value]


class HashHuge(Tagged):
    def __hash__(self):
        return 2**200 + 7

    def __eq__(self, other):
        return type(other) is HashHuge


class EqRaises(Tagged):
    def __hash__(self):
        return 17

    def __eq__(self, other):
        raise Boom("eq")


class _BoolRaises:
    def __bool__(self):
        raise Boom("bool")


class EqGarbage(Tagged):
    """`__eq__` returns an object whose truth value raises."""

    def __hash__(self):
        return 18

    def __eq__(self, other):
        return _BoolRaises()


class EqNotImplemented(Tagged):
    def __hash__(self):
        return 19

    def __eq__(self, other):
        return NotImplemented


class Unhashable(Tagged):
    __hash__ = None  # type: ignore[assignment]


class LenIterRaise(Tagged):
    """Looks like a sequence, but `__len__`, `__iter__` and `__getitem__` raise."""

    def __len__(self):
        raise Boom("len")

    def __iter__(self):
        raise Boom("iter")

    def __getitem__(self, index):
        raise Boom("getitem")


class LenGarbage(Tagged):
    def __len__(self):
        return -1

    def __iter__(self):
        return 5  # type: ignore[return-value]


class ReprRaises(Tagged):
    def __repr__(self):
        raise Boom("repr")

    def __str__(self):
        raise Boom("str")


class BoolRaises(Tagged, _BoolRaises):
    pass


class ClassRaises(Tagged):
    """`__class__` raises: `isinstance` against an ABC consults it."""

    @property  # type: ignore[misc]
    def __class__(self):
        raise Boom("__class__")


class IntSubclass(int):
    def __eq__(self, other):
        raise Boom("int eq")

    def __hash__(self):
        return 3


ADVERSARIAL = {
    cls.__name__: cls
    for cls in (
        Plain,
        ValueEq,
        HashRaises,
        HashGarbage,
        HashHuge,
        EqRaises,
        EqGarbage,
        EqNotImplemented,
        Unhashable,
        LenIterRaise,
        LenGarbage,
        ReprRaises,
        BoolRaises,
        ClassRaises,
    )
}


def module_function(x):
    return x


_JAX_ARRAYS = {
    "f32": jnp.arange(3.0),
    "i32-scalar": jnp.array(4),
    "bool": jnp.array([True, False]),
    "empty": jnp.zeros((0, 2)),
}
_HUGE_INTS = [2**63, -(2**63) - 1, 2**64 + 1, 10**30, -(10**40), 2**1000]


def _leaf(kind: str, param: Any, tag: str) -> Any:
    if kind == "value":
        # Immutable Python values, fresh where Python allows (floats, big ints, bytes).
        if type(param) is float:
            return float(repr(param)) if not math.isnan(param) else float("nan")
        if type(param) is int and abs(param) > 256:
            return int(str(param))
        return param
    if kind == "bytearray":
        return bytearray(param)
    if kind == "set":
        return set(param)
    if kind == "frozenset":
        return frozenset(param)
    if kind == "np":
        return np.asarray(param[0], dtype=param[1])
    if kind == "npscalar":
        return np.dtype(param[1]).type(param[0])
    if kind == "jax":
        return _JAX_ARRAYS[param]
    if kind == "type":
        return {"int": int, "object": object, "ndarray": np.ndarray, "Array": jax.Array}[param]
    if kind == "function":
        return module_function
    if kind == "IntSubclass":
        return IntSubclass(param)
    return ADVERSARIAL[kind](tag)


# ---------------------------------------------------------------------------------------
# Nodes: containers, well-behaved custom nodes, and nodes whose flatten misbehaves.


class Pair(NamedTuple):
    a: Any
    b: Any


class Box(Tagged):
    def __init__(self, children, aux, tag="box"):
        super().__init__(tag)
        self.children = list(children)
        self.aux = aux


jtu.register_pytree_node(Box, lambda b: (tuple(b.children), b.aux), lambda a, c: Box(c, a))


class KeyBox(Box):
    pass


jtu.register_pytree_with_keys(
    KeyBox,
    lambda b: (tuple((jtu.GetAttrKey(f"c{i}"), c) for i, c in enumerate(b.children)), b.aux),
    lambda a, c: KeyBox(c, a),
)


@dataclasses.dataclass
class DC:
    x: Any
    y: Any
    meta: Any


jtu.register_dataclass(DC, data_fields=["x", "y"], meta_fields=["meta"])


class Evil(Box):
    """A node whose registered flatten (or unflatten) misbehaves in the way `aux` names."""


_EVIL_MODES = (
    "raise",
    "return-none",
    "return-int",
    "three-tuple",
    "one-tuple",
    "children-generator",
    "children-iter-raises",
    "children-len-raises",
    "children-int",
    "children-dict",
    "children-str",
    "aux-unhashable",
    "aux-eq-raises",
    "unflatten-raises",
    "unflatten-garbage",
    "fine",
)


def _evil_flatten(node: Evil):
    mode = node.aux
    children = tuple(node.children)
    if mode == "raise":
        raise Boom("flatten")
    if mode == "return-none":
        return None
    if mode == "return-int":
        return 5
    if mode == "three-tuple":
        return children, mode, "extra"
    if mode == "one-tuple":
        return (children,)
    if mode == "children-generator":
        return (c for c in children), mode
    if mode == "children-iter-raises":
        return LenIterRaise("children"), mode
    if mode == "children-len-raises":
        return LenGarbage("children"), mode
    if mode == "children-int":
        return 7, mode
    if mode == "children-dict":
        return {f"k{i}": c for i, c in enumerate(children)}, mode
    if mode == "children-str":
        return "ab", mode
    if mode == "aux-unhashable":
        return children, [mode]
    if mode == "aux-eq-raises":
        return children, EqRaises("aux")
    return children, mode


def _evil_unflatten(aux, children):
    if aux == "unflatten-raises":
        raise Boom("unflatten")
    if aux == "unflatten-garbage":
        return 42
    return Evil(children, aux)


jtu.register_pytree_node(Evil, _evil_flatten, _evil_unflatten)


@jtu.register_static
class StaticThing:
    def __init__(self, value):
        self.value = value

    def __hash__(self):
        return hash(self.value)

    def __eq__(self, other):
        return type(other) is StaticThing and other.value == self.value


def _node(kind: str, meta: Any, children: list, tag: str) -> Any:
    if kind == "tuple":
        return tuple(children)
    if kind == "list":
        return list(children)
    if kind in ("dict", "OrderedDict", "defaultdict"):
        keys = [_dict_key(meta[i % len(meta)], i) for i in range(len(children))] if meta else []
        items = list(zip(keys, children, strict=True))
        if kind == "dict":
            return dict(items)
        if kind == "OrderedDict":
            return collections.OrderedDict(items)
        return collections.defaultdict(list, items)
    if kind == "Pair":
        return Pair(*(children + [None, None])[:2])
    if kind == "Box":
        return Box(children, _aux(meta, tag), tag)
    if kind == "KeyBox":
        return KeyBox(children, _aux(meta, tag), tag)
    if kind == "DC":
        first, second = (children + [None, None])[:2]
        return DC(first, second, _aux(meta, tag))
    if kind == "Evil":
        return Evil(children, meta, tag)
    if kind == "Static":
        return StaticThing(meta if not isinstance(meta, list) else tuple(meta))
    raise AssertionError(kind)


def _dict_key(spec: Any, index: int) -> Any:
    kind, value = spec
    if kind == "str":
        return f"{value}{index}"
    if kind == "int":
        return value + index
    if kind == "nan":
        return float("nan")
    if kind == "tuple":
        return (value, index)
    if index == 0:  # one unorderable (and worse) key, so that the dict can be built
        return ADVERSARIAL[kind](f"key{index}")
    return f"s{index}"


def _aux(meta: Any, tag: str) -> Any:
    kind, value = meta
    if kind == "value":
        return value
    if kind == "nan":
        return float("nan")
    if kind == "list":
        return [value]
    return ADVERSARIAL[kind](f"aux:{tag}")


def build(spec: Any, tag: str = "r") -> Any:
    """A fresh PyTree from a spec: equal specs give equal-but-distinct objects."""
    if spec[0] == "leaf":
        return _leaf(spec[1], spec[2], tag)
    _, kind, meta, children = spec
    built = [build(child, f"{tag}.{i}") for i, child in enumerate(children)]
    return _node(kind, meta, built, tag)


# ---------------------------------------------------------------------------------------
# Strategies


_plain_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from(_HUGE_INTS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.complex_numbers(allow_nan=True),
    st.text(max_size=4),
    st.binary(max_size=4),
    st.just(Ellipsis),
    st.tuples(st.integers(-3, 3), st.text(max_size=2)),
)
_np_dtypes = st.sampled_from(["float32", "float64", "int8", "int64", "bool", "complex64"])


def _leaves_of(kinds: list[str], params: st.SearchStrategy) -> st.SearchStrategy:
    return st.tuples(st.just("leaf"), st.sampled_from(kinds), params)


leaf_specs = st.one_of(
    _leaves_of(["value"], _plain_values),
    _leaves_of(["bytearray", "set", "frozenset"], st.binary(max_size=3)),
    _leaves_of(["np", "npscalar"], st.tuples(st.integers(-5, 5), _np_dtypes)),
    _leaves_of(["jax"], st.sampled_from(sorted(_JAX_ARRAYS))),
    _leaves_of(["type"], st.sampled_from(["int", "object", "ndarray", "Array"])),
    _leaves_of(["function"], st.none()),
    _leaves_of(["IntSubclass"], st.integers(-3, 3)),
    _leaves_of(sorted(ADVERSARIAL), st.none()),
)

_dict_key_specs = st.one_of(
    st.tuples(st.just("str"), st.text(max_size=2)),
    st.tuples(st.just("int"), st.integers(-5, 5)),
    st.tuples(st.just("nan"), st.none()),
    st.tuples(st.just("tuple"), st.integers(-2, 2)),
    st.tuples(st.sampled_from(["Plain", "ValueEq", "EqRaises", "EqGarbage"]), st.none()),
)
_aux_specs = st.one_of(
    st.tuples(st.just("value"), _plain_values),
    st.tuples(st.sampled_from(["nan", "list"]), st.integers(0, 3)),
    st.tuples(
        st.sampled_from(["ValueEq", "EqRaises", "EqGarbage", "HashRaises", "Plain"]), st.none()
    ),
)


def _nodes(children):
    sized = st.lists(children, max_size=4)
    return st.one_of(
        st.tuples(st.just("node"), st.sampled_from(["tuple", "list", "Pair"]), st.none(), sized),
        st.tuples(
            st.just("node"),
            st.sampled_from(["dict", "OrderedDict", "defaultdict"]),
            st.lists(_dict_key_specs, min_size=1, max_size=3),
            sized,
        ),
        st.tuples(st.just("node"), st.sampled_from(["Box", "KeyBox", "DC"]), _aux_specs, sized),
        st.tuples(st.just("node"), st.just("Evil"), st.sampled_from(_EVIL_MODES), sized),
        st.tuples(st.just("node"), st.just("Static"), _plain_values, st.just([])),
    )


tree_specs = st.recursive(leaf_specs, _nodes, max_leaves=12)


class _Garbage:
    """A callback result whose truth value raises."""

    def __bool__(self):
        raise Boom("callback result")


_CALLBACKS: dict[str, Any] = {
    "none": None,
    "true": lambda x: True,
    "false": lambda x: False,
    "is-array-py": _pycore.is_array,
    "is-list": lambda x: type(x) is list,
    "is-box": lambda x: isinstance(x, Box),
    "truthy-str": lambda x: "yes",
    "falsy-int": lambda x: 0,
    "np-true": lambda x: np.bool_(True),
    "ambiguous": lambda x: np.array([1, 2]),
    "garbage": lambda x: _Garbage(),
    "raises": lambda x: (_ for _ in ()).throw(Boom("callback")),
    "wrong-arity": lambda: True,
    "not-callable": 5,
    "string": "is_array",
}
_BAD_CALLBACKS = ("ambiguous", "garbage", "raises", "wrong-arity", "not-callable", "string")
_benign_callbacks = st.sampled_from(sorted(set(_CALLBACKS) - set(_BAD_CALLBACKS)))
# Mostly benign callbacks (a bad one fails the whole call, hiding everything else).
callbacks = st.one_of(
    st.just("none"), _benign_callbacks, _benign_callbacks, st.sampled_from(_BAD_CALLBACKS)
)
hashed_flags = st.sampled_from([True, False, 0, 1, "", "x", None, "garbage"])


def _flag(name: Any) -> Any:
    return _Garbage() if name == "garbage" else name


# ---------------------------------------------------------------------------------------
# Describing outcomes so that the two backends' results can be compared


def describe(x: Any, depth: int = 0) -> Any:
    """A comparable description of a (rebuilt) tree, a leaf, or a key's statics."""
    if depth > 50:
        return "<deep>"
    kind = type(x)
    if isinstance(x, Tagged) and kind not in (Box, KeyBox, Evil):
        return (kind.__name__, x.tag)
    if kind in (Box, KeyBox, Evil):
        return (kind.__name__, describe(x.aux, depth + 1), describe(x.children, depth + 1))
    if kind is DC:
        return ("DC", describe(x.x, depth + 1), describe(x.y, depth + 1), describe(x.meta))
    if kind in (tuple, list, Pair):
        return (kind.__name__, [describe(c, depth + 1) for c in x])
    if kind in (dict, collections.OrderedDict, collections.defaultdict):
        return (kind.__name__, [(describe(k), describe(v, depth + 1)) for k, v in x.items()])
    if kind is float:
        return ("float", "nan" if math.isnan(x) else x.hex())
    if kind in (int, bool, str, bytes, complex, type(None), type(Ellipsis)):
        return (kind.__name__, repr(x))
    if kind in (bytearray, set, frozenset):
        return (kind.__name__, sorted(x) if kind is not bytearray else bytes(x))
    if isinstance(x, np.ndarray | np.generic | jax.Array):
        value = np.asarray(x)
        return (kind.__name__, str(value.dtype), value.shape, value.tobytes())
    if kind is IntSubclass:
        return ("IntSubclass", int.__repr__(x))
    if kind is StaticThing:
        return ("StaticThing", describe(x.value))
    if kind is ClassRaises:
        return ("ClassRaises", x.tag)
    return (kind.__name__,)


def describe_key(key: Any) -> Any:
    return (
        key.num_leaves,
        key.num_dynamic,
        key.num_static,
        tuple(key.mask),
        [describe(s) for s in key.statics],
    )


EXAMPLES_RUN = [0]
SUCCESSES = [0]  # examples whose main call succeeded on both cores (the rest raised)


class Outcome(NamedTuple):
    ok: bool
    value: Any  # the description when ok, else the exception type


def outcome(thunk: Callable[[], Any], describe_result: Callable[[Any], Any] = describe) -> Outcome:
    try:
        result = thunk()
    except RecursionError:
        return Outcome(False, RecursionError)
    except Exception as err:  # noqa: BLE001 -- the type is what is compared
        return Outcome(False, type(err))
    try:
        return Outcome(True, describe_result(result))
    except Exception as err:  # noqa: BLE001
        return Outcome(False, ("describe failed", type(err)))


def assert_agree(native: Outcome, python: Outcome, what: str, any_error: bool = False) -> None:
    """Same result, or the same exception type (any exception type, with `any_error`)."""
    if any_error and not native.ok and not python.ok:
        return
    assert native == python, f"{what}: native {native} != python {python}"


def _compare(a: Any, b: Any, negated: bool) -> Any:
    return a != b if negated else a == b


def assert_same_verdict(native: Outcome, python: Outcome, negated: bool, what: str) -> None:
    """Key equality agrees: both say "equal", or neither does.

    "Not equal" and an exception count as the same verdict: a core may see that two keys
    differ (say, by hash) without ever calling a static leaf's raising `__eq__`.
    """
    equal_verdict = Outcome(True, not negated)
    assert (native == equal_verdict) == (python == equal_verdict), (
        f"{what}: native {native} != python {python}"
    )


# ---------------------------------------------------------------------------------------
# The campaigns (run in a child interpreter)


def _cores():
    from filterjax import _native

    return _native, _pycore


def _partition_both(spec, predicate, is_leaf, hashed):
    """Partition fresh builds of `spec` with each core; returns their outcomes and results."""
    results = {}
    outcomes = []
    label = f"partition({spec!r}, {predicate!r}, {is_leaf!r}, {hashed!r})"
    for core in _cores():
        tree = build(spec)
        holder: dict = {}

        def run(core=core, tree=tree, holder=holder):
            holder["result"] = core.flatten_split(tree, predicate, is_leaf, hashed)
            return holder["result"]

        free = _free_recursion_depth()
        outcomes.append(outcome(run, lambda r: ([describe(d) for d in r[0]], describe_key(r[1]))))
        _check_recursion_depth(free, f"{core.BACKEND} partition", label)
        results[core.BACKEND] = holder.get("result")
    return outcomes, results


def campaign_partition(examples: int) -> None:
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(tree_specs, callbacks, callbacks, hashed_flags)
    def check(spec, predicate_name, is_leaf_name, hashed):
        EXAMPLES_RUN[0] += 1
        predicate = _CALLBACKS[predicate_name]
        is_leaf = _CALLBACKS[is_leaf_name]
        outcomes, results = _partition_both(spec, predicate, is_leaf, _flag(hashed))
        assert_agree(
            *outcomes,
            f"partition(predicate={predicate_name}, is_leaf={is_leaf_name}, hashed={hashed!r})",
            # The native core reads `hashed` up front, the twin once the tree is split: when
            # the flag's truth value raises and something else fails too, either may win.
            any_error=hashed == "garbage",
        )
        if not outcomes[0].ok:
            return
        SUCCESSES[0] += 1
        native_core, python_core = _cores()
        for core in (native_core, python_core):
            _, key = results[core.BACKEND]
            # repr may fail only because a static leaf's own repr does.
            repr_outcome = outcome(lambda key=key: repr(key), lambda r: type(r))
            assert repr_outcome.ok or repr_outcome.value is Boom, (core.BACKEND, repr_outcome)
        # rebuild, in the ways filterjax uses it, and hashing/equality of the keys.
        (native_dynamic, native_key) = results["native"]
        (python_dynamic, python_key) = results["python"]
        pairs = (
            ("rebuild", lambda c, k, d: c.rebuild(k, d)),
            ("rebuild-tuple", lambda c, k, d: c.rebuild(k, tuple(d))),
            ("dynamic-part", lambda c, k, d: c.rebuild(k, d, [None] * k.num_static)),
            ("static-part", lambda c, k, d: c.rebuild(k, [None] * k.num_dynamic)),
            ("statics-none", lambda c, k, d: c.rebuild(k, d, None)),
        )
        for name, call in pairs:
            assert_agree(
                outcome(lambda call=call: call(native_core, native_key, native_dynamic)),
                outcome(lambda call=call: call(python_core, python_key, python_dynamic)),
                name,
            )
        assert_agree(
            outcome(lambda: hash(native_key), lambda h: type(h)),
            outcome(lambda: hash(python_key), lambda h: type(h)),
            "hash",
        )
        # A second, fresh build: equal spec -> the keys compare the same way in both cores.
        second, second_results = _partition_both(spec, predicate, is_leaf, True)
        if second[0].ok and second[1].ok:
            other_native = second_results["native"][1]
            other_python = second_results["python"][1]
            for negate in (False, True):
                assert_same_verdict(
                    outcome(lambda n=negate: _compare(native_key, other_native, n), bool),
                    outcome(lambda n=negate: _compare(python_key, other_python, n), bool),
                    negate,
                    f"key {'!=' if negate else '=='} key of a fresh build",
                )
            if outcome(lambda: native_key == other_native, bool) == Outcome(True, True):
                assert hash(native_key) == hash(other_native)
        assert native_key == native_key  # identity: no static is compared
        assert (native_key == 5) is False and (native_key != "x") is True
        assert (native_key == python_key) is False  # keys of different cores never match

    check()


def _bad_rebuilds(rebuild, key, dynamic, bad_dynamic, bad_key, statics, nargs) -> list:
    return [
        outcome(lambda: rebuild(key, bad_dynamic)),
        outcome(lambda: rebuild(bad_key, dynamic)),
        outcome(lambda: rebuild(key, dynamic, statics)),
        outcome(lambda: rebuild(*[key, dynamic, None, None, None][:nargs])),
        outcome(lambda: rebuild(key=key, dynamic=dynamic)),
        outcome(lambda: rebuild(key, dynamic, statics=None, extra=1)),
    ]


def campaign_rebuild_arguments(examples: int) -> None:
    native_core, python_core = _cores()
    bad_dynamic = st.sampled_from(
        ["short", "long", "str", "int", "iter", "generator", "dict", "none", "bytes", "set"]
    )
    bad_key = st.sampled_from(["none", "int", "other-core", "tuple", "treedef", "string"])

    def dynamic_variant(name, dynamic):
        return {
            "short": lambda: list(dynamic[:-1]),
            "long": lambda: [*dynamic, 1],
            "str": lambda: "ab"[: len(dynamic)],
            "int": lambda: 5,
            "iter": lambda: iter(dynamic),
            "generator": lambda: (d for d in dynamic),
            "dict": lambda: dict(enumerate(dynamic)),
            "none": lambda: None,
            "bytes": lambda: b"\x00" * len(dynamic),
            "set": lambda: set(range(len(dynamic))),
        }[name]()

    def key_variant(name, core, key):
        return {
            "none": None,
            "int": 3,
            "other-core": "swap",
            "tuple": (key,),
            "treedef": jtu.tree_structure([1]),
            "string": "StaticKey",
        }[name]

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        st.recursive(
            st.one_of(
                st.tuples(st.just("leaf"), st.just("value"), _plain_values),
                st.tuples(st.just("leaf"), st.just("jax"), st.sampled_from(sorted(_JAX_ARRAYS))),
            ),
            lambda c: st.tuples(
                st.just("node"), st.sampled_from(["tuple", "list", "Box"]), st.just(("value", 1)),
                st.lists(c, max_size=3),
            ),
            max_leaves=6,
        ),
        bad_dynamic,
        bad_key,
        st.sampled_from(["short", "long", "int", "str", "none-list"]),
        st.integers(0, 5),
    )  # fmt: skip
    def check(spec, dynamic_name, key_name, statics_name, nargs):
        EXAMPLES_RUN[0] += 1
        outcomes = []
        keys = {}
        partitions = {}
        for core in (native_core, python_core):
            dynamic, key = core.flatten_split(build(spec))
            partitions[core.BACKEND] = (dynamic, key)
            keys[core.BACKEND] = key
        for core in (native_core, python_core):
            dynamic, key = partitions[core.BACKEND]
            other = keys["python" if core is native_core else "native"]
            weird_key = key_variant(key_name, core, key)
            # (old jaxlib's PyTreeDef.__eq__ raises on a str, hence the isinstance)
            weird_key = other if isinstance(weird_key, str) and weird_key == "swap" else weird_key
            statics = {
                "short": list(key.statics[:-1]),
                "long": [*key.statics, 0],
                "int": 0,
                "str": "s" * key.num_static,
                "none-list": [None] * key.num_static,
            }[statics_name]
            bad_dynamic = dynamic_variant(dynamic_name, dynamic)
            outcomes.append(
                _bad_rebuilds(core.rebuild, key, dynamic, bad_dynamic, weird_key, statics, nargs)
            )
        names = ("dynamic", "key", "statics", f"{nargs} args", "keywords", "extra keyword")
        for name, n, p in zip(names, *outcomes, strict=True):
            assert_agree(
                n, p, f"rebuild with bad {name} ({dynamic_name}/{key_name}/{statics_name})"
            )

    check()


def campaign_arguments_and_is_array(examples: int) -> None:
    native_core, python_core = _cores()

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(leaf_specs, st.integers(0, 6), callbacks, callbacks, hashed_flags)
    def check(spec, nargs, predicate_name, is_leaf_name, hashed):
        EXAMPLES_RUN[0] += 1
        predicate = _CALLBACKS[predicate_name]
        is_leaf = _CALLBACKS[is_leaf_name]
        assert_agree(
            outcome(lambda: native_core.is_array(build(spec))),
            outcome(lambda: python_core.is_array(build(spec))),
            "is_array",
        )
        assert_agree(
            outcome(lambda: native_core.is_array(*[build(spec)] * nargs)),
            outcome(lambda: python_core.is_array(*[build(spec)] * nargs)),
            f"is_array with {nargs} args",
        )
        args = [build(spec), predicate, is_leaf, _flag(hashed), None, None][:nargs]
        assert_agree(
            outcome(lambda: native_core.flatten_split(*args), lambda r: describe_key(r[1])),
            outcome(lambda: python_core.flatten_split(*args), lambda r: describe_key(r[1])),
            f"partition with {nargs} args",
            any_error=hashed == "garbage" and nargs >= 4,
        )
        for kwargs in (
            {"tree": build(spec)},
            {"tree": build(spec), "predicate": predicate},
            {"tree": build(spec), "is_leaf": is_leaf, "hashed": _flag(hashed)},
            {"tree": build(spec), "bogus": 1},
        ):
            assert_agree(
                outcome(
                    lambda kw=kwargs: native_core.flatten_split(**kw), lambda r: describe_key(r[1])
                ),
                outcome(
                    lambda kw=kwargs: python_core.flatten_split(**kw), lambda r: describe_key(r[1])
                ),
                f"partition(**{sorted(kwargs)})",
                any_error=hashed == "garbage" and "hashed" in kwargs,
            )
        # Constructing a native StaticKey from Python is not supported: it must fail cleanly.
        attempt = outcome(lambda: native_core.StaticKey(*args))
        assert not attempt.ok and issubclass(attempt.value, TypeError), attempt

    check()


def _free_recursion_depth() -> int:
    """How many more Python frames fit under the recursion limit right now."""

    def probe(n: int = 0) -> int:
        try:
            return probe(n + 1)
        except RecursionError:
            return n

    return probe()


def _check_recursion_depth(free_before: int, what: str, inputs: str = "") -> None:
    # A few frames of slack: the probe itself is not exact to the frame.
    free_after = _free_recursion_depth()
    if free_after < free_before - 20:
        # The interpreter can't be trusted any more (Hypothesis could not even shrink):
        # report the input and stop here.
        sys.stderr.write(what + " leaked the interpreter's recursion depth: " + inputs + "\n")
        sys.stderr.flush()
        os._exit(3)


def _nested(kind: str, depth: int, cyclic: bool) -> Any:
    """A chain of `depth` nested lists, dicts or Boxes; with `cyclic`, the last holds the first."""

    def make(i: int) -> Any:
        if kind == "list":
            return [i]
        if kind == "dict":
            return {"v": i}
        return Box([i], "aux")

    def attach(parent: Any, child: Any) -> None:
        if kind == "list":
            parent.append(child)
        elif kind == "dict":
            parent["c"] = child
        else:
            parent.children.append(child)

    root = node = make(-1)
    for i in range(depth):
        child = make(i)
        attach(node, child)
        node = child
    if cyclic:
        attach(node, root)
    return root


_TWIN_MAX_DEPTH = 300


def campaign_deep_and_cyclic(examples: int) -> None:
    """Deep nesting, trees that contain themselves, and the interpreter's recursion count.

    Trees that contain themselves are checked on the native core alone: it must raise
    `PyTreeCycleError` (or `RecursionError` when the cycle is deeper than the recursion
    limit) and leave the interpreter's recursion count as it was. The Python twin can't be
    the reference here: `jax.tree_util.tree_flatten`, which it calls, leaks the
    interpreter's recursion depth on some cyclic trees (a self-containing dict; a
    self-containing list flattened with `is_leaf`) and on trees deeper than the recursion
    limit, in jaxlib 0.10.2. Trees deeper than `_TWIN_MAX_DEPTH` are native-only too.
    """
    from filterjax import PyTreeCycleError

    native_core, python_core = _cores()

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        st.sampled_from(["list", "dict", "box"]),
        st.sampled_from([0, 1, 10, 300, 900, 5000, 50_000]),
        st.booleans(),
        st.sampled_from(["none", "is-list", "false", "is-box", "is-array-py"]),
        st.sampled_from(["none", "true", "is-array-py"]),
    )
    def check(kind, depth, cyclic, is_leaf_name, predicate_name):
        EXAMPLES_RUN[0] += 1
        is_leaf = _CALLBACKS[is_leaf_name]
        predicate = _CALLBACKS[predicate_name]
        label = f"{kind} nested {depth} deep, cyclic={cyclic}, is_leaf={is_leaf_name}"
        free = _free_recursion_depth()
        native = outcome(
            lambda: native_core.flatten_split(_nested(kind, depth, cyclic), predicate, is_leaf),
            lambda r: describe_key(r[1])[:3],
        )
        _check_recursion_depth(free, "native partition", label)
        root_is_leaf = (is_leaf_name, kind) in (("is-list", "list"), ("is-box", "box"))
        if root_is_leaf:
            return  # one static leaf: the partition campaign covers those
        if cyclic:
            assert not native.ok, f"{label}: {native}"
            assert native.value in (PyTreeCycleError, RecursionError), f"{label}: {native}"
        if cyclic or depth > _TWIN_MAX_DEPTH:
            # Deeper than the recursion limit: the native core either manages or raises
            # RecursionError (it has no reference to agree with, see above).
            assert native.ok or native.value in (PyTreeCycleError, RecursionError), native
            return
        python = outcome(
            lambda: python_core.flatten_split(_nested(kind, depth, cyclic), predicate, is_leaf),
            lambda r: describe_key(r[1])[:3],
        )
        _check_recursion_depth(free, "python partition", label)
        assert_agree(native, python, label)
        SUCCESSES[0] += native.ok

    check()


CAMPAIGNS = {
    "partition": (campaign_partition, 1200),
    "rebuild-arguments": (campaign_rebuild_arguments, 250),
    "arguments-and-is-array": (campaign_arguments_and_is_array, 400),
    "deep-and-cyclic": (campaign_deep_and_cyclic, 40),
}


# ---------------------------------------------------------------------------------------
# The tests: one child interpreter per campaign


@pytest.mark.single_backend
@pytest.mark.parametrize("campaign", sorted(CAMPAIGNS))
def test_fuzz_native_against_python(campaign):
    helpers.native_core()
    import filterjax

    scale = float(os.environ.get("FILTERJAX_FUZZ_SCALE", "1"))
    package_parent = os.path.dirname(os.path.dirname(filterjax.__file__))
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([package_parent, tests_dir]),
        "JAX_PLATFORMS": "cpu",
        "FILTERJAX_FUZZ_SCALE": str(scale),
    }
    try:
        result = subprocess.run(
            [sys.executable, os.path.abspath(__file__), campaign],
            capture_output=True,
            text=True,
            env=env,
            timeout=max(120.0, 120.0 * scale),
        )
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"fuzz campaign {campaign!r} hung (no result after {err.timeout:.0f} s)")
    tail = (result.stdout + result.stderr)[-6000:]
    if result.returncode < 0:
        name = signal.Signals(-result.returncode).name
        pytest.fail(f"fuzz campaign {campaign!r} crashed the interpreter ({name}):\n{tail}")
    assert result.returncode == 0, f"fuzz campaign {campaign!r} failed:\n{tail}"
    assert f"campaign {campaign} passed" in result.stdout


def _main(argv: list[str]) -> int:
    (campaign,) = argv
    run, examples = CAMPAIGNS[campaign]
    scale = float(os.environ.get("FILTERJAX_FUZZ_SCALE", "1"))
    run(max(1, int(examples * scale)))
    detail = f", {SUCCESSES[0]} with a successful partition" if SUCCESSES[0] else ""
    print(f"campaign {campaign} passed ({EXAMPLES_RUN[0]} examples{detail})")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
