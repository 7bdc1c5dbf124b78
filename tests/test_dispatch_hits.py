"""The per-call path of filter_jit on repeated calls: what it reuses between calls (the last
static signature found, the last keyword shape) must never change which program runs or
how often the function is traced. Traces are counted by a side effect that runs only while
JAX traces."""

from __future__ import annotations

import functools
import threading

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import filterjax as fj


class Counted:
    """A function that counts its traces (by the static arguments it was traced with)."""

    def __init__(self):
        self.traces: list = []

    def __call__(self, x, n=1, *, tag="a"):
        self.traces.append((n, tag))
        return x * n if tag == "a" else x + n


def _jit():
    counted = Counted()
    return counted, fj.filter_jit(counted)


def _check(out, x, n, tag="a"):
    expected = np.asarray(x) * n if tag == "a" else np.asarray(x) + n
    np.testing.assert_allclose(np.asarray(out), expected)


def test_alternating_statics_hit_their_own_programs():
    counted, f = _jit()
    x = jnp.arange(3.0)
    for n in [1, 2, 1, 1, 2, 3, 1, 3, 2]:
        _check(f(x, n), x, n)
    assert sorted(counted.traces) == [(1, "a"), (2, "a"), (3, "a")]


def test_equal_statics_of_another_type_do_not_share_a_program():
    counted, f = _jit()
    x = jnp.arange(3.0)
    for n in [1, 1.0, True, 1, 1.0, True]:
        out = f(x, n)
        _check(out, x, n)
    assert [type(n) for n, _ in counted.traces] == [int, float, bool]


class Box:
    """A static whose hash and equality follow a value that can change in place."""

    def __init__(self, value):
        self.value = value

    def __hash__(self):
        return hash(self.value)

    def __eq__(self, other):
        return type(other) is Box and other.value == self.value

    def __mul__(self, other):
        return self.value * other

    __rmul__ = __mul__


def test_a_static_changed_in_place_is_a_new_signature():
    counted, f = _jit()
    x = jnp.arange(3.0)
    box = Box(2)
    _check(f(x, box), x, 2)
    _check(f(x, box), x, 2)
    box.value = 5
    _check(f(x, box), x, 5)
    _check(f(x, box), x, 5)
    assert len(counted.traces) == 2


class RaisingEq:
    """Hashes alike, but comparing two different instances raises."""

    def __hash__(self):
        return 0

    def __eq__(self, other):
        if self is other:
            return True
        raise RuntimeError("no comparing")

    def __rmul__(self, other):
        return other


def test_a_static_whose_eq_raises_names_the_leaf_and_later_calls_still_hit():
    counted, f = _jit()
    x = jnp.arange(3.0)
    first = RaisingEq()
    f(x, first)
    f(x, first)
    with pytest.raises(TypeError, match=r"static leaf at args\[1\].*no comparing"):
        f(x, RaisingEq())
    f(x, first)
    f(x, 2)
    f(x, first)
    assert len(counted.traces) == 2


def test_outputs_with_and_without_static_parts_alternate():
    def g(x, mode):
        return (x * 2, mode) if mode else x * 3

    f = fj.filter_jit(g)
    x = jnp.arange(3.0)
    for mode in ["s", "", "s", "t", "", "t"]:
        out = f(x, mode)
        if mode:
            np.testing.assert_allclose(np.asarray(out[0]), np.asarray(x) * 2)
            assert out[1] == mode
        else:
            np.testing.assert_allclose(np.asarray(out), np.asarray(x) * 3)


def test_weak_types_are_separate_programs_on_repeated_calls():
    counted, f = _jit()
    weak = jnp.asarray(2.0)
    strong = jnp.asarray(2.0, dtype=jnp.float32)
    assert weak.weak_type and not strong.weak_type
    for x in [weak, strong, weak, strong]:
        out = f(x, 3)
        assert out.weak_type == x.weak_type
    assert len(counted.traces) == 2


def test_clear_caches_between_repeated_calls_retraces_once():
    counted, f = _jit()
    x = jnp.arange(3.0)
    f(x, 2)
    f(x, 2)
    fj.clear_caches()
    _check(f(x, 2), x, 2)
    _check(f(x, 2), x, 2)
    assert len(counted.traces) == 2


def test_keyword_spellings_and_orders_repeated():
    counted, f = _jit()
    x = jnp.arange(3.0)
    calls = [
        lambda: f(x, 2, tag="b"),
        lambda: f(x, n=2, tag="b"),
        lambda: f(x=x, n=2, tag="b"),
        lambda: f(tag="b", n=2, x=x),
        lambda: f(x, tag="b", n=2),
    ]
    for _ in range(3):
        for call in calls:
            _check(call(), x, 2, "b")
    # Names built at run time are equal strings but other objects than the literals.
    names = {"".join(["t", "a", "g"]): "b", "".join(["n"]): 2}
    _check(f(x, **names), x, 2, "b")
    _check(f(x, **names), x, 2, "b")
    assert counted.traces == [(2, "b")]


def test_keyword_arguments_of_one_kind_each_reach_their_own_parameter():
    # Repeated calls bind keyword values by position in the call: arguments alike in kind
    # and shape must not swap or repeat, in any order or spelling.
    f = fj.filter_jit(lambda x, y, z: x + 10 * y + 100 * z)
    calls = [
        lambda x, y, z: f(x, y=y, z=z),
        lambda x, y, z: f(x, z=z, y=y),
        lambda x, y, z: f(z=z, y=y, x=x),
        lambda x, y, z: f(x, y, z=z),
    ]
    for step in range(3):
        x, y, z = (jnp.full(2, float(step + i)) for i in range(3))
        expected = np.asarray(x) + 10 * np.asarray(y) + 100 * np.asarray(z)
        for call in calls:
            for _ in range(3):
                np.testing.assert_allclose(np.asarray(call(x, y, z)), expected)


def test_same_number_of_keywords_with_other_names():
    def g(x, a=1, b=10):
        return x * a + b

    f = fj.filter_jit(g)
    x = jnp.arange(3.0)
    for _ in range(2):
        np.testing.assert_allclose(np.asarray(f(x, a=2)), np.asarray(x) * 2 + 10)
        np.testing.assert_allclose(np.asarray(f(x, b=2)), np.asarray(x) + 2)


def test_empty_keyword_dict_is_a_positional_call():
    counted, f = _jit()
    x = jnp.arange(3.0)
    f(x, 2)
    _check(f(x, 2, **{}), x, 2)
    assert len(counted.traces) == 1


def test_wrappers_sharing_programs_each_hit():
    counted = Counted()
    f, g = fj.filter_jit(counted), fj.filter_jit(counted)
    x = jnp.arange(3.0)
    for n in [2, 2, 3, 2, 3]:
        _check(f(x, n), x, n)
        _check(g(x, n), x, n)
    assert len(counted.traces) == 2


def test_threads_repeating_calls_agree_and_trace_each_signature_once():
    counted, f = _jit()
    x = jnp.arange(3.0)
    errors: list = []
    barrier = threading.Barrier(4)

    def worker(seed):
        try:
            barrier.wait()
            for i in range(200):
                n = (seed + i) % 3 + 1
                out = f(x, n) if i % 2 else f(x, n=n)
                _check(out, x, n)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(counted.traces) == [(1, "a"), (2, "a"), (3, "a")]


_STATICS = st.sampled_from([1, 2, 2.0, True, "s", None, (1, 2)])


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(
            _STATICS,
            st.sampled_from(["pos", "kw", "kwx"]),
            st.sampled_from([(3,), (2, 2)]),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_any_sequence_of_calls_traces_each_signature_once(calls):
    seen = []

    def g(x, s):
        seen.append((x.shape, type(s), s))
        return x + 1, s

    f = fj.filter_jit(g)
    for s, spelling, shape in calls:
        x = jnp.ones(shape)
        if spelling == "pos":
            out = f(x, s)
        elif spelling == "kw":
            out = f(x, s=s)
        else:
            out = f(s=s, x=x)
        np.testing.assert_allclose(np.asarray(out[0]), np.asarray(x) + 1)
        assert out[1] == s and type(out[1]) is type(s)
    signatures = {(shape, type(s), s) for s, _, shape in calls}
    assert len(seen) == len(signatures)
    assert {(shape, t, s) for shape, t, s in seen} == signatures


def test_nested_jit_calls_inside_a_trace():
    inner_counted, inner = _jit()

    @fj.filter_jit
    def outer(x, n):
        return inner(x, n) + inner(x, n)

    x = jnp.arange(3.0)
    for _ in range(3):
        np.testing.assert_allclose(np.asarray(outer(x, 2)), np.asarray(x) * 4)
    assert jax.numpy.allclose(outer(x, 3), x * 6)


def test_repeated_calls_leak_no_references():
    import sys

    counted, f = _jit()
    x = jnp.arange(3.0)
    static = Box(2)
    names = {"n": static, "tag": "a"}
    for call in (lambda: f(x, static), lambda: f(x, **names), lambda: f(x=x, **names)):
        call()
        call()
        before = (sys.getrefcount(x), sys.getrefcount(static))
        for _ in range(500):
            call()
        assert (sys.getrefcount(x), sys.getrefcount(static)) == before


def _contains_str_array(spec) -> bool:
    kind, meta, kids = spec
    if kind == "np" and meta[0] == "<U3":
        return True
    return any(_contains_str_array(kid) for kid in kids)


def _assert_same_values(out, tree):
    none_leaf = lambda x: x is None
    out_leaves, out_def = jax.tree_util.tree_flatten(out, is_leaf=none_leaf)
    leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=none_leaf)
    assert out_def == treedef
    for got, expected in zip(out_leaves, leaves, strict=True):
        if fj.is_array(expected):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
        else:
            assert type(got) is type(expected) and got == expected


@settings(max_examples=60, deadline=None)
@given(helpers.changed_specs(), st.lists(st.booleans(), max_size=6))
def test_a_call_differing_anywhere_from_the_last_runs_its_own_program(pair, order):
    # The Dispatcher compares each call with the last one's signature while it flattens
    # it: a difference at any place (structure, node data, a leaf's kind, a static's type
    # or value) must still find the other program, and the first call again after it.
    spec, changed = pair
    assume(not _contains_str_array(spec) and not _contains_str_array(changed))
    traces = []

    def g(tree):
        traces.append(None)
        return tree

    f = fj.filter_jit(g)
    # Each signature is repeated (a hit remembers it), then followed by the other.
    for use_changed in [False, True, False, False, True, True, False, *order]:
        tree = helpers.build(changed if use_changed else spec)
        _assert_same_values(f(tree), tree)
    assert len(traces) == 2


def test_the_wrapper_class_is_called_straight_into_the_dispatcher():
    wrapper = fj.filter_jit(lambda x, *, scale: x * scale)
    cls = type(wrapper)
    assert cls.__name__ == cls.__qualname__ == "_JitWrapper"
    assert cls.__module__ == "filterjax._jit"
    assert issubclass(cls, fj._backend.Dispatcher)
    # Made like a class statement: registered as a PyTree by Wrapper.__init_subclass__.
    leaves, treedef = jax.tree_util.tree_flatten(wrapper)
    assert wrapper not in leaves
    assert jax.tree_util.tree_unflatten(treedef, leaves)(jnp.ones(2), scale=2.0).shape == (2,)
    kwargs = {"scale": 3.0}
    x = jnp.arange(3.0)
    for _ in range(3):
        np.testing.assert_allclose(np.asarray(wrapper(x, **kwargs)), np.asarray(x) * 3)
    assert kwargs == {"scale": 3.0}


def test_the_native_wrapper_class_is_entered_by_vectorcall(backend):
    # Calls then pass their arguments as an array: no tuple, no keyword dict.
    if backend != "native":
        pytest.skip("the native core's entry")
    have_vectorcall = 1 << 11  # Py_TPFLAGS_HAVE_VECTORCALL
    assert type(fj.filter_jit(lambda x: x)).__flags__ & have_vectorcall


def test_calls_by_vectorcall_and_by_tp_call_agree_and_share_programs():
    counted, f = _jit()
    x = jnp.arange(3.0)
    slot = functools.partial(type(f).__call__, f)
    calls = [
        lambda call: call(x, 2),
        lambda call: call(x, n=2),
        lambda call: call(x=x, n=2),
        lambda call: call(n=2, x=x),
        lambda call: call(*[x], **{"n": 2}),
    ]
    for _ in range(2):
        for call in calls:
            _check(call(f), x, 2)
            _check(call(slot), x, 2)
    assert counted.traces == [(2, "a")]
    with pytest.raises(TypeError):
        f(x, 2, n=3)
    with pytest.raises(TypeError):
        slot(x, 2, n=3)


def test_dispatcher_subclass_needs_a_dispatcher_base():
    with pytest.raises(TypeError, match="Dispatcher"):
        fj._backend._core.dispatcher_subclass((object,))


def test_arguments_are_not_kept_alive_after_a_call():
    # Repeated calls reuse the list they pass to the program; it must not hold on to the
    # last call's arrays.
    import weakref

    _, f = _jit()
    for _ in range(3):
        x = np.arange(3.0)
        alive = weakref.ref(x)
        _check(f(x, 2), x, 2)
        del x
        assert alive() is None


def test_a_program_keeping_its_arguments_sees_them_unchanged():
    # A program that keeps the list of leaves it was called with (as a traceback or a
    # Python-level program could) must not see later calls' leaves appear in it.
    _, f = _jit()
    f(jnp.arange(3.0), 2)
    kept = []

    def keep(leaves):
        kept.append((leaves, list(leaves)))
        return leaves[0]

    programs = f._program.programs
    compiled = dict(programs)
    try:
        for key in compiled:
            programs[key] = keep
        arrays = [jnp.full(3, float(i)) for i in range(4)]
        for x in arrays:
            assert f(x, 2) is x
    finally:
        programs.update(compiled)
    assert len(kept) == len(arrays)
    for (leaves, copy), x in zip(kept, arrays, strict=True):
        assert len(leaves) == 1 and leaves[0] is x and copy[0] is x


@settings(max_examples=80, deadline=None)
@given(
    helpers.changed_shallow_calls(),
    st.lists(st.booleans(), max_size=6),
    st.booleans(),
    st.lists(st.booleans(), min_size=13, max_size=13),
)
def test_a_shallow_call_differing_anywhere_from_the_last_runs_its_own_program(
    pair, order, keywords, through_slot
):
    # Positional arguments that are leaves or flat containers of leaves are matched with
    # the last call's key argument by argument: any one change below them (a leaf's kind,
    # a static's type or value, a container's kind, length or keys) must still find the
    # other program, whether the call is shallow or not, positional or bound by keyword,
    # made by vectorcall (an argument array) or through `tp_call` (a tuple and a dict).
    spec, changed = pair
    assume(not _contains_str_array(spec) and not _contains_str_array(changed))
    traces = []

    def g(*args):
        traces.append(None)
        return args

    def named(a, b, c, d):
        traces.append(None)
        return (a, b, c, d)

    f = fj.filter_jit(named if keywords else g)
    # `type(f).__call__` is the class's `tp_call` slot: a tuple and a dict.
    ways = [f, functools.partial(type(f).__call__, f)]
    calls = [False, True, False, False, True, True, False, *order]
    for use_changed, slot in zip(calls, through_slot[: len(calls)], strict=True):
        call = ways[slot]
        args = helpers.build(changed if use_changed else spec)
        if keywords:
            args = (*args, *[None] * (4 - len(args)))
            out = call(args[0], b=args[1], c=args[2], d=args[3])
        else:
            out = call(*args)
        _assert_same_values(out, args)
    assert len(traces) == 2


class _ListSub(list):
    # Not a PyTree node (a leaf), static: hashable.
    def __hash__(self):
        return hash(tuple(self))


class _DictSub(dict):
    def __hash__(self):
        return hash(tuple(self.items()))


class _StrSub(str):
    pass


def _shallow_pairs():
    x = jnp.arange(2.0)
    return {
        "tuple length": ((x,), (x, x)),
        "list length": ([x], [x, x]),
        "list subclass": ([2, 1], _ListSub([2, 1])),
        "tuple or list": ((x, 1), [x, 1]),
        "dict key": ({"a": x}, {"b": x}),
        "dict size": ({"a": x}, {"a": x, "b": x}),
        "dict static": ({"a": x, "n": 1}, {"a": x, "n": 2}),
        "dict subclass": ({"a": 1}, _DictSub(a=1)),
        "int or float": (3, 3.0),
        "int or bool": (1, True),
        "str subclass": ("ab", _StrSub("ab")),
        "None or array": (None, x),
        "array or static": (x, 2),
        "kinds swapped": ((x, 2), (2, x)),
        "dict kinds swapped": ({"a": x, "b": 2}, {"a": 2, "b": x}),
        "leaf or tuple": (x, (x,)),
    }


@pytest.mark.parametrize("name", sorted(_shallow_pairs()))
def test_shallow_arguments_that_differ_run_their_own_programs(name):
    first, second = _shallow_pairs()[name]
    traces = []

    def g(y, z):
        traces.append(None)
        return y, z

    f = fj.filter_jit(g)
    x = jnp.ones(3)
    for arg in [first, second, first, first, second, second, first]:
        out = f(x, arg)
        _assert_same_values(out, (x, arg))
        assert type(out[1]) is type(arg)
    assert len(traces) == 2
