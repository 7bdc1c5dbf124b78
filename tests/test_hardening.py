"""filterjax stays correct and usable after things go wrong during a call.

Errors raised by the user's function while tracing, KeyboardInterrupt at awkward moments
(inside the trace, inside a PyTree flatten, inside a static leaf's `__hash__`), errors from
JAX itself, and static arguments whose `__eq__` raises.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
from jax_features import JAX_VERSION

import filterjax as fj
from filterjax import _backend


class _Counter:
    def __init__(self):
        self.n = 0

    def __call__(self):
        self.n += 1


# ---------------------------------------------------------------------------------------
# An exception while tracing leaves no half-built cache entry


def _failing_on(mode_bad: str):
    traces = _Counter()

    @fj.filter_jit
    def f(x, mode):
        traces()
        if mode == mode_bad:
            raise ValueError("bad mode")
        return x * 2

    return f, traces


def test_error_while_tracing_on_first_call():
    f, traces = _failing_on("bad")
    x = jnp.arange(3.0)
    with pytest.raises(ValueError, match="bad mode"):
        f(x, "bad")
    assert traces.n == 1
    assert np.allclose(f(x, "good"), x * 2)
    assert np.allclose(f(x, "good"), x * 2)
    assert traces.n == 2  # the good call traced exactly once
    with pytest.raises(ValueError, match="bad mode"):
        f(x, "bad")  # the failure was not cached as a success
    assert traces.n == 3
    assert np.allclose(f(x + 1, "good"), (x + 1) * 2)
    assert traces.n == 3


def test_error_while_tracing_after_a_good_call_with_the_same_structure():
    f, traces = _failing_on("bad")
    x = jnp.arange(3.0)
    assert np.allclose(f(x, "good"), x * 2)
    for _ in range(3):
        with pytest.raises(ValueError, match="bad mode"):
            f(x, "bad")
    assert traces.n == 4
    assert np.allclose(f(x, "good"), x * 2)
    assert traces.n == 4


def test_shape_dependent_error_then_good_shape():
    traces = _Counter()

    @fj.filter_jit
    def f(x, y):
        traces()
        return x @ y

    a, b = jnp.ones((2, 3)), jnp.ones((3, 4))
    with pytest.raises(TypeError):
        f(a, a)
    assert f(a, b).shape == (2, 4)
    assert f(a, b + 1).shape == (2, 4)
    assert traces.n == 2
    with pytest.raises(TypeError):
        f(a, a)
    assert traces.n == 3


def test_error_in_output_with_static_parts_then_good_call():
    traces = _Counter()

    @fj.filter_jit
    def f(x, fail):
        traces()
        out = {"value": x + 1, "shape": x.shape, "name": "out"}
        if fail:
            raise RuntimeError("late failure")
        return out

    x = jnp.zeros(2)
    with pytest.raises(RuntimeError, match="late failure"):
        f(x, True)
    out = f(x, False)
    assert out["shape"] == (2,) and out["name"] == "out" and np.allclose(out["value"], 1.0)
    assert traces.n == 2


def test_call_that_does_not_bind_then_good_calls():
    traces = _Counter()

    @fj.filter_jit
    def f(x, y=1):
        traces()
        return x + y

    for _ in range(2):  # a failed binding is not remembered as a plan
        with pytest.raises(TypeError):
            f(jnp.ones(2), 1, 2)
        with pytest.raises(TypeError):
            f(jnp.ones(2), z=3)
    assert np.allclose(f(jnp.ones(2), 2), 3.0)
    assert np.allclose(f(jnp.ones(2), y=2), 3.0)
    assert traces.n == 1


def test_error_inside_filter_vmap_and_filter_grad_then_good_calls():
    filter_vmap = fj.filter_vmap
    filter_grad = fj.filter_grad

    def g(x, fail):
        if fail:
            raise ValueError("vmap/grad failure")
        return jnp.sum(x**2)

    xs = jnp.arange(6.0).reshape(3, 2)
    with pytest.raises(ValueError, match="failure"):
        filter_vmap(g)(xs, True)
    assert np.allclose(filter_vmap(g)(xs, False), jnp.sum(xs**2, axis=1))
    grad = fj.filter_jit(filter_grad(g))
    with pytest.raises(ValueError, match="failure"):
        grad(xs, True)
    assert np.allclose(grad(xs, False), 2 * xs)


# ---------------------------------------------------------------------------------------
# KeyboardInterrupt


def test_keyboard_interrupt_inside_the_traced_function():
    traces = _Counter()
    interrupt = [True]

    @fj.filter_jit
    def f(x, k):
        traces()
        if interrupt[0]:
            raise KeyboardInterrupt
        return x * k

    x = jnp.arange(3.0)
    with pytest.raises(KeyboardInterrupt):
        f(x, 2)
    interrupt[0] = False
    assert np.allclose(f(x, 2), x * 2)
    assert np.allclose(f(x + 1, 2), (x + 1) * 2)
    assert traces.n == 2
    fj.clear_caches()
    assert np.allclose(f(x, 3), x * 3)
    assert np.allclose(fj.filter_jit(lambda y: y - 1)(x), x - 1)


class _Interruptible:
    """A PyTree node whose flatten raises KeyboardInterrupt while `armed`."""

    armed = False

    def __init__(self, value):
        self.value = value


def _flatten_interruptible(node):
    if _Interruptible.armed:
        raise KeyboardInterrupt
    return (node.value,), None


jtu.register_pytree_node(
    _Interruptible, _flatten_interruptible, lambda _, children: _Interruptible(*children)
)


@pytest.fixture
def disarm():
    yield
    _Interruptible.armed = False


def test_keyboard_interrupt_in_a_flatten_during_partition(disarm):
    traces = _Counter()

    @fj.filter_jit
    def f(node, k):
        traces()
        return node.value * k

    x = jnp.arange(3.0)
    assert np.allclose(f(_Interruptible(x), 2), x * 2)
    _Interruptible.armed = True
    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            f(_Interruptible(x), 2)
        with pytest.raises(KeyboardInterrupt):
            fj.partition(_Interruptible(x), fj.is_array)
    _Interruptible.armed = False
    assert np.allclose(f(_Interruptible(x + 1), 2), (x + 1) * 2)
    assert np.allclose(f(_Interruptible(x), 3), x * 3)
    assert traces.n == 2
    dynamic, static = fj.partition(_Interruptible(x), fj.is_array)
    assert np.allclose(fj.combine(dynamic, static).value, x)


def test_keyboard_interrupt_in_a_flatten_of_the_output(disarm):
    traces = _Counter()

    @fj.filter_jit
    def f(x):
        traces()
        return _Interruptible(x + 1)

    x = jnp.arange(3.0)
    _Interruptible.armed = True
    with pytest.raises(KeyboardInterrupt):
        f(x)
    _Interruptible.armed = False
    out = f(x)
    assert type(out) is _Interruptible and np.allclose(out.value, x + 1)
    f(x)
    assert traces.n == 2


class _InterruptingHash:
    armed = True

    def __hash__(self):
        if _InterruptingHash.armed:
            raise KeyboardInterrupt
        return 0

    def __eq__(self, other):
        return type(other) is _InterruptingHash


def test_keyboard_interrupt_in_a_static_leafs_hash():
    f = fj.filter_jit(lambda x, s: x + 1)
    x = jnp.arange(2.0)
    with pytest.raises(KeyboardInterrupt):
        f(x, _InterruptingHash())
    _InterruptingHash.armed = False
    try:
        assert np.allclose(f(x, _InterruptingHash()), x + 1)
        assert np.allclose(f(x, "fine"), x + 1)
    finally:
        _InterruptingHash.armed = True


# ---------------------------------------------------------------------------------------
# Errors from JAX itself keep their types


def _matmul_mismatch(x):
    return x @ jnp.ones((5, 5))


def _reshape_mismatch(x):
    return x.reshape(7)


def _bool_of_tracer(x):
    return x if x.sum() > 0 else -x


def _concrete_shape_from_tracer(x):
    return jnp.zeros(x[0].astype(int))


def _int_of_tracer(x):
    return int(x[0])


def _mixed_dtypes_in_lax(x):
    return jax.lax.add(x, jnp.ones(3, jnp.int32))


def _bad_index(x):
    return x[:, 0]


@pytest.mark.parametrize(
    "fn",
    [
        _matmul_mismatch,
        _reshape_mismatch,
        _bool_of_tracer,
        _concrete_shape_from_tracer,
        _int_of_tracer,
        _mixed_dtypes_in_lax,
        _bad_index,
    ],
)
def test_jax_errors_propagate_with_the_same_type_as_jax_jit(fn):
    x = jnp.arange(3.0)
    with pytest.raises(Exception) as plain:
        jax.jit(fn)(x)
    with pytest.raises(Exception) as ours:
        fj.filter_jit(fn)(x)
    assert type(ours.value) is type(plain.value), (ours.value, plain.value)
    # and filterjax is fine afterwards
    assert np.allclose(fj.filter_jit(lambda y: y * 2)(x), x * 2)


def test_jax_error_with_static_argument_keeps_its_type():
    def fn(x, n):
        return x.reshape(n)

    x = jnp.arange(6.0)
    with pytest.raises(Exception) as plain:
        jax.jit(fn, static_argnums=1)(x, 4)
    with pytest.raises(Exception) as ours:
        fj.filter_jit(fn)(x, 4)
    assert type(ours.value) is type(plain.value)
    assert fj.filter_jit(fn)(x, (2, 3)).shape == (2, 3)


# ---------------------------------------------------------------------------------------
# A static argument whose __eq__ raises


class BadEqCallable:
    """Hashable, but comparing it raises: only noticed when a cache lookup compares."""

    def __call__(self, x):
        return x + 1

    def __hash__(self):
        return 12345

    def __eq__(self, other):
        raise RuntimeError("BadEqCallable refuses to be compared")


def _raise_from_bad_eq(f, x):
    """Cache one BadEqCallable, then call with another; returns (error, the cached one)."""
    cached = BadEqCallable()
    assert np.allclose(f(cached, x), x + 1)  # first call: nothing to compare with
    with pytest.raises(Exception) as info:
        f(BadEqCallable(), x)  # a distinct, equal-hash object: the cache compares
    return info.value, cached


def _message_chain(err: BaseException) -> str:
    parts = []
    while err is not None and len(parts) < 10:
        parts.append(f"{type(err).__name__}: {err}")
        err = err.__cause__ or err.__context__
    return "\n".join(parts)


class ArrayEq:
    """Hashable, but `==` gives an array, whose truth value raises."""

    def __init__(self, value):
        self.value = value

    def __hash__(self):
        return 7

    def __eq__(self, other):
        return np.array([True, False])


class EqFailsOnlyAgainstOthers:
    """Equal to itself (found by identity); comparing two of them gives an array."""

    def __hash__(self):
        return 7

    def __eq__(self, other):
        return other is self or np.array([True, False])


@pytest.mark.parametrize("kind", [ArrayEq, EqFailsOnlyAgainstOthers])
def test_static_whose_eq_has_no_truth_value_is_named_by_its_path(kind):
    @fj.filter_jit
    def f(x, cfg):
        return x

    x = jnp.arange(3.0)
    make = (lambda: kind(0)) if kind is ArrayEq else kind
    f(x, {"unused": 1, "cfg": make()})
    with pytest.raises(TypeError) as info:
        f(x, {"unused": 1, "cfg": make()})
    message = str(info.value)
    assert "args[1]['cfg']" in message, message
    assert kind.__qualname__ in message, message
    assert "truth value" in message, message


def test_cores_say_which_static_leaf_failed_to_compare():
    from filterjax._errors import STATIC_INDEX_ATTR

    _, first = _backend.flatten_split([1, jnp.ones(1), "a", EqFailsOnlyAgainstOthers()])
    _, second = _backend.flatten_split([1, jnp.ones(1), "a", EqFailsOnlyAgainstOthers()])
    with pytest.raises(ValueError) as info:
        first == second  # noqa: B015
    assert getattr(info.value, STATIC_INDEX_ATTR) == 2


def test_static_whose_eq_raises_gives_an_error_and_filterjax_stays_usable():
    traces = _Counter()

    @fj.filter_jit
    def f(g, x):
        traces()
        return g(x)

    x = jnp.arange(3.0)
    err, cached = _raise_from_bad_eq(f, x)
    assert isinstance(err, (TypeError, ValueError, RuntimeError))
    assert "refuses to be compared" in _message_chain(err)
    # The same wrapper and new ones keep working: for the cached object (found by
    # identity, no comparison), for other statics, and after the caches are cleared.
    assert np.allclose(f(cached, x), x + 1)
    assert np.allclose(f(cached, x + 1), x + 2)
    assert traces.n == 1  # the failed lookup traced nothing
    assert np.allclose(f(lambda y: y * 2, x), x * 2)
    assert np.allclose(fj.filter_jit(lambda y: y - 1)(x), x - 1)
    # As with jax.jit, JAX's own caches still remember the cached object until cleared.
    jax.clear_caches()
    fj.clear_caches()
    assert np.allclose(f(BadEqCallable(), x), x + 1)


def test_static_whose_eq_raises_error_names_the_users_type():
    f = fj.filter_jit(lambda g, x: g(x))
    err, _ = _raise_from_bad_eq(f, jnp.arange(3.0))
    message = _message_chain(err)
    assert "BadEqCallable" in message
    assert "StaticKey" not in str(err)
    assert isinstance(err, TypeError) and "args[0]" in str(err)


# ---------------------------------------------------------------------------------------
# A static leaf's __eq__ or __hash__ that calls back into filterjax: never a hang


def _finishes(body, timeout: float = 60.0):
    """Run `body` in a daemon thread: what it returned or raised, or fail on a hang."""
    import threading

    outcome: list = []

    def target():
        try:
            outcome.append(("returned", body()))
        except BaseException as err:  # noqa: BLE001 - reported to the test
            outcome.append(("raised", err))

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "the call hung (a lock held while running user code?)"
    ((kind, value),) = outcome
    if kind == "raised":
        raise value
    return value


class _CallsBack:
    """Equal by value, every instance colliding in hash; comparing (or hashing) calls
    `callback` first, with a fresh number each time."""

    calls = 0

    def __init__(self, value, callback, in_hash=False):
        self.value = value
        self.callback = callback
        self.in_hash = in_hash

    def _call_back(self):
        type(self).calls += 1
        self.callback(type(self).calls)

    def __hash__(self):
        if self.in_hash:
            self._call_back()
        return 0

    def __eq__(self, other):
        if not self.in_hash:
            self._call_back()
        return type(other) is _CallsBack and self.value == other.value


@pytest.mark.parametrize("in_hash", [False, True])
@pytest.mark.parametrize(
    "transform",
    [
        "filter_jit",
        pytest.param(
            "filter_pmap",
            # Old jax.pmap compares a static leaf inside its own compile cache; a pmap
            # called back from that `__eq__` compiles as if nested (devices² devices).
            marks=pytest.mark.skipif(
                JAX_VERSION < (0, 8), reason="jax < 0.8: pmap re-entered from its own cache"
            ),
        ),
    ],
)
def test_static_leaf_calling_the_same_function_back_finishes(transform, in_hash):
    def body(x, static):
        return x + getattr(static, "value", static)

    f = getattr(fj, transform)(body)
    x = jnp.ones((jax.local_device_count(), 2))

    def call_back(n):
        # A new static value every time: a miss, compiled while the outer call is
        # looking its own signature up.
        f(x, n)

    def run():
        outs = [f(x, _CallsBack(v, call_back, in_hash)) for v in (1, 2, 1, 2)]
        return [float(out.sum()) for out in outs]

    size = x.size
    assert _finishes(run) == [2.0 * size, 3.0 * size, 2.0 * size, 3.0 * size]
    assert _CallsBack.calls > 0


def test_static_leaf_calling_other_transforms_back_finishes():
    other = fj.filter_jit(lambda x, n: x * n)
    vmapped = fj.filter_vmap(lambda x: x + 1)

    def call_back(n):
        other(jnp.ones(2), n)
        vmapped(jnp.ones((2, 2)))
        fj.partition({"a": jnp.ones(1), "n": n}, fj.is_array)
        fj.filter_grad(lambda x: (x**2).sum())(jnp.ones(2))

    f = fj.filter_jit(lambda x, static: x * static.value)

    def run():
        return [float(f(jnp.ones(()), _CallsBack(v, call_back)).sum()) for v in (2, 3, 2)]

    assert _finishes(run) == [2.0, 3.0, 2.0]
