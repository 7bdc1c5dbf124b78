"""filter_pmap's per-call path: the core's Dispatcher for the common call shape, the
Python fallback for everything else, and waiting for a result only where an Equinox error
check needs it."""

from __future__ import annotations

import threading

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax_features import needs_pmap_error_recovery

import filterjax as fj
from filterjax import _vmap_pmap

N = jax.local_device_count()


@pytest.fixture
def fallbacks(monkeypatch):
    """How many calls reached the Python fallback (`_PmapWrapper._slow_call`)."""
    calls = []
    slow_call = _vmap_pmap._PmapWrapper._slow_call

    def counted(self, args, kwargs):
        calls.append(len(args))
        return slow_call(self, args, kwargs)

    monkeypatch.setattr(_vmap_pmap._PmapWrapper, "_slow_call", counted)
    return calls


@pytest.fixture
def waits(monkeypatch):
    """How many times filter_pmap waited for a result (`jax.block_until_ready`)."""
    calls = []
    block = jax.block_until_ready

    def counted(x):
        calls.append(1)
        return block(x)

    monkeypatch.setattr(jax, "block_until_ready", counted)
    return calls


def test_repeated_calls_skip_the_fallback_and_trace_once(fallbacks):
    traces = []

    @fj.filter_pmap
    def f(x, n):
        traces.append(n)
        return {"y": x * n, "n": n}

    x = jnp.arange(N * 2.0).reshape(N, 2)
    for _ in range(4):
        out = f(x, 3)
        assert out["n"] == 3  # the static output is rebuilt on the fast path too
        np.testing.assert_allclose(np.asarray(out["y"]), np.asarray(x) * 3)
    assert fallbacks == [2]
    assert traces == [3]
    f(x, 4)  # a new static signature: the fallback again, once
    f(x, 4)
    assert fallbacks == [2, 2]
    assert traces == [3, 4]
    with pytest.raises(RuntimeError, match="keyword"):
        f(x, n=3)  # another call shape is the fallback's to refuse


def test_wrappers_around_equal_functions_share_the_fast_path(fallbacks):
    class Scale(eqx.Module):
        w: jax.Array

        def __call__(self, x):
            return self.w * x

    w = jnp.ones(N)
    fj.filter_pmap(Scale(w))(jnp.ones(N))
    out = fj.filter_pmap(Scale(w + 1))(jnp.ones(N))  # its own array leaves, same program
    np.testing.assert_allclose(np.asarray(out), 2.0)
    assert fallbacks == [1]


@pytest.mark.parametrize(
    "options",
    [
        {"in_axes": (0, None)},
        {"in_axes": {"x": 0}},
        {"out_axes": (0, None)},
        {"axis_size": N},
        {"donate": "all"},
    ],
)
def test_other_call_shapes_stay_on_the_fallback(fallbacks, options):
    def f(x, y):
        return x + y, y

    g = fj.filter_pmap(f, **options)
    x = jnp.ones(N)
    for _ in range(3):
        a, b = g(jnp.ones(N), x)
        np.testing.assert_allclose(np.asarray(a), 2.0)
    assert fallbacks == [2, 2, 2]


def test_a_mismatched_call_on_the_fast_path_names_the_leaves(fallbacks):
    f = fj.filter_pmap(lambda a, b: a + b["w"].sum())
    f(jnp.ones(N), {"w": jnp.ones((N, 3))})
    # Same static signature, so the Dispatcher finds the program; JAX refuses the axes.
    with pytest.raises(ValueError, match=r"args\[0\].*args\[1\]\['w'\]"):
        f(jnp.ones(N), {"w": jnp.ones((N + 1, 3))})


def test_calls_without_an_error_check_never_wait(waits, fallbacks):
    assert "equinox" in __import__("sys").modules  # what made every call wait before
    f = fj.filter_pmap(lambda x: x + 1)
    for _ in range(3):
        f(jnp.ones(N))
    assert waits == []
    assert fallbacks == [1]


def test_a_call_returns_before_its_host_callback_has_run():
    release = threading.Event()
    ran = threading.Event()

    def slow(x):
        release.wait(30)
        ran.set()
        return x

    def f(x):
        return jax.pure_callback(slow, jax.ShapeDtypeStruct(x.shape, x.dtype), x)

    g = fj.filter_pmap(f)
    x = jnp.ones(N)
    release.set()
    jax.block_until_ready(g(x))  # compiled, and its callback run once
    release.clear()
    ran.clear()
    out = g(x)
    returned_first = not ran.is_set()
    release.set()
    np.testing.assert_allclose(np.asarray(out), 1.0)
    assert returned_first


@needs_pmap_error_recovery
def test_a_program_with_a_check_waits_and_raises_at_its_call(waits, fallbacks):
    def f(x):
        return eqx.error_if(x, x < 0, "negative input")

    g = fj.filter_pmap(f)
    for _ in range(2):
        np.testing.assert_allclose(np.asarray(g(jnp.ones(N))), 1.0)
    assert len(waits) == 2  # every call of it waits ...
    assert fallbacks == [1, 1]  # ... so none skips Python
    with pytest.raises(eqx.EquinoxRuntimeError, match="negative input"):
        g(-jnp.ones(N))


@needs_pmap_error_recovery
def test_a_check_nested_in_a_jit_and_a_cond_is_found(waits):
    @jax.jit
    def inner(x):
        return jax.lax.cond(x.sum() > 100, lambda y: y, lambda y: eqx.error_if(y, y < 0, "no"), x)

    g = fj.filter_pmap(inner)
    g(jnp.ones(N))
    g(jnp.ones(N))
    assert len(waits) == 2
    with pytest.raises(eqx.EquinoxRuntimeError, match="no"):
        g(-jnp.ones(N))
