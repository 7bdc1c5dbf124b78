"""filter_jit: tracing rules, recompilation, outputs, donation, async dispatch, AOT, caches."""

from __future__ import annotations

import functools
import gc
import threading
import time
import warnings
import weakref

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import filterjax as fj


def counting(fun):
    """Wrap `fun` so that the number of times it runs (i.e. is traced) is recorded."""
    calls = []

    @functools.wraps(fun)
    def wrapper(*args, **kwargs):
        calls.append(1)
        return fun(*args, **kwargs)

    wrapper.count = lambda: len(calls)
    return wrapper


# --- the seed page's examples -----------------------------------------------------------


def test_seed_example_traces_arrays_and_holds_the_rest_static():
    seen = []

    @fj.filter_jit
    def f(x, y):
        seen.append((isinstance(x, jax.core.Tracer), isinstance(y, jax.core.Tracer)))
        return x + y, x - y

    assert [int(v) for v in f(jnp.array(1), jnp.array(2))] == [3, -1]
    assert [int(v) for v in f(jnp.array(1), 2)] == [3, -1]
    assert f(1, 2) == (3, -1)
    assert seen == [(True, True), (True, False), (False, False)]


def test_one_argument_may_hold_both_dynamic_and_static_leaves():
    @fj.filter_jit
    def f(tree):
        assert isinstance(tree["w"], jax.core.Tracer)
        assert tree["act"] == "double" and not isinstance(tree["n"], jax.core.Tracer)
        return tree["w"] * 2 * tree["n"]

    out = f({"w": jnp.arange(3.0), "act": "double", "n": 3})
    np.testing.assert_allclose(out, [0.0, 6.0, 12.0])


def test_numpy_arrays_and_scalars_are_traced():
    kinds = []

    @fj.filter_jit
    def f(a, b):
        kinds.append((type(a), type(b)))
        return a + b

    f(np.ones(2), np.float32(1.0))
    assert all(issubclass(k, jax.core.Tracer) for k in kinds[0])


# --- binding and recompilation ---------------------------------------------------------


def test_positional_and_keyword_spellings_share_one_program():
    body = counting(lambda x, y, *, z=1: x * y + z)
    f = fj.filter_jit(body)
    x = jnp.ones(3)
    f(x, 2.0, z=1)
    f(x, y=2.0, z=1)
    f(y=2.0, x=x, z=1)
    assert body.count() == 1


def test_recompiles_exactly_when_it_must():
    body = counting(lambda x, s: x * len(s))
    f = fj.filter_jit(body)
    f(jnp.ones(3), "ab")
    f(jnp.zeros(3), "ab")  # new values, same avals
    f(jnp.zeros(3), "".join(["a", "b"]))  # equal static, distinct object
    assert body.count() == 1
    f(jnp.ones(3), "abc")  # new static value
    assert body.count() == 2
    f(jnp.ones(4), "abc")  # new shape
    assert body.count() == 3
    f(jnp.ones(4, jnp.int32), "abc")  # new dtype
    assert body.count() == 4
    f(jnp.ones(4, jnp.int32), "abc")
    assert body.count() == 4


def test_recompiles_on_new_tree_structure_and_weak_type():
    body = counting(lambda t: jax.tree_util.tree_reduce(lambda a, b: a + b, t))
    f = fj.filter_jit(body)
    f([jnp.ones(2), jnp.ones(2)])
    f((jnp.ones(2), jnp.ones(2)))
    assert body.count() == 2
    f({"a": jnp.ones(2)})
    f({"b": jnp.ones(2)})
    assert body.count() == 4
    f(jnp.asarray(1.0))  # weakly typed?
    f(jnp.array(1.0, dtype=jnp.float32))
    strong_weak = jnp.asarray(1.0).weak_type != jnp.array(1.0, dtype=jnp.float32).weak_type
    assert body.count() == (6 if strong_weak else 5)


def test_static_values_of_different_type_do_not_share_a_program():
    body = counting(lambda x, s: (x * s, type(s).__name__))
    f = fj.filter_jit(body)
    assert f(jnp.ones(()), 1)[1] == "int"
    assert f(jnp.ones(()), True)[1] == "bool"
    assert f(jnp.ones(()), 1.0)[1] == "float"
    assert body.count() == 3


def test_args_and_kwargs_functions():
    @fj.filter_jit
    def f(*args, **kwargs):
        return sum(args) + sum(kwargs.values())

    assert int(f(jnp.array(1), 2, a=jnp.array(3), b=4)) == 10
    assert f(1, 2, a=3) == 6


def test_signature_errors_are_the_plain_functions_type_error():
    @fj.filter_jit
    def f(x, y):
        return x + y

    with pytest.raises(TypeError, match="missing a required argument: 'y'"):
        f(jnp.ones(2))
    with pytest.raises(TypeError, match="too many positional arguments"):
        f(1, 2, 3)
    with pytest.raises(TypeError, match="unexpected keyword argument 'z'"):
        f(1, 2, z=3)
    assert f(1, 2) == 3  # a failed bind leaves nothing behind


# --- what can be jitted ------------------------------------------------------------------


def test_wraps_metadata():
    def documented(x):
        """Docstring."""
        return x

    f = fj.filter_jit(documented)
    assert f.__name__ == "documented"
    assert f.__doc__ == "Docstring."
    assert f.__wrapped__ is documented


def test_decorator_with_arguments():
    @fj.filter_jit(donate="none")
    def f(x):
        return x + 1

    assert int(f(jnp.array(1))) == 2


def test_method_of_a_class_binds_through_the_descriptor_protocol():
    class Scaler:
        def __init__(self, factor):
            self.factor = factor

        @fj.filter_jit
        def __call__(self, x):
            return x * self.factor

    s = Scaler(3)
    np.testing.assert_allclose(s(jnp.ones(2)), [3.0, 3.0])
    assert Scaler.__call__.__name__ == "__call__"


def test_method_of_a_module_traces_the_modules_arrays():
    class Linear(eqx.Module):
        w: jax.Array
        name: str = eqx.field(static=True)

        @fj.filter_jit
        def apply(self, x):
            assert isinstance(self.w, jax.core.Tracer)
            return self.w * x

    counted = counting(lambda: None)
    layer = Linear(jnp.arange(3.0), "lin")
    np.testing.assert_allclose(layer.apply(2.0), [0.0, 2.0, 4.0])
    other = Linear(jnp.ones(3), "lin")
    np.testing.assert_allclose(other.apply(2.0), [2.0, 2.0, 2.0])
    del counted


def test_module_as_function_traces_its_arrays():
    model = eqx.nn.MLP(2, 2, 4, 1, key=jax.random.key(0))
    jitted = fj.filter_jit(model)
    x = jnp.ones(2)
    np.testing.assert_allclose(jitted(x), model(x), rtol=1e-6)
    np.testing.assert_allclose(fj.filter_jit(model.__call__)(x), model(x), rtol=1e-6)


def test_partial_holding_arrays_traces_them():
    seen = []

    def f(a, x):
        seen.append(isinstance(a, jax.core.Tracer))
        return a * x

    jitted = fj.filter_jit(functools.partial(f, jnp.arange(3.0)))
    np.testing.assert_allclose(jitted(2.0), [0.0, 2.0, 4.0])
    assert seen == [True]


def test_callable_object():
    class Adder:
        def __init__(self, k):
            self.k = k

        def __call__(self, x):
            return x + self.k

    np.testing.assert_allclose(fj.filter_jit(Adder(2))(jnp.ones(2)), [3.0, 3.0])


@pytest.mark.parametrize("outer", ["jit", "vmap", "grad"])
def test_inside_another_transform(outer):
    inner = fj.filter_jit(lambda x, p: jnp.sum(x**p))
    f = lambda x: inner(x, 2)  # noqa: E731
    x = jnp.arange(3.0)
    if outer == "jit":
        assert float(jax.jit(f)(x)) == pytest.approx(5.0)
    elif outer == "vmap":
        np.testing.assert_allclose(jax.vmap(f)(x), x**2)
    else:
        np.testing.assert_allclose(jax.grad(f)(x), 2 * x)


# --- outputs -----------------------------------------------------------------------------


def test_outputs_mix_arrays_and_non_arrays_depending_on_shapes():
    @fj.filter_jit
    def f(x):
        return {"double": 2 * x, "n": x.shape[0], "tag": ("len", x.shape[0]), "none": None}

    for n in (2, 5, 2, 7):
        out = f(jnp.ones(n))
        assert out["n"] == n and out["tag"] == ("len", n) and out["none"] is None
        assert out["double"].shape == (n,)


def test_unhashable_static_outputs_are_fine():
    class Unhashable:
        __hash__ = None

    @fj.filter_jit
    def f(x):
        return x, Unhashable()

    for _ in range(2):
        out = f(jnp.ones(2))
        assert isinstance(out[1], Unhashable)


def test_output_may_be_a_module():
    @fj.filter_jit
    def make(key):
        return eqx.nn.Linear(2, 3, key=key)

    layer = make(jax.random.key(1))
    assert isinstance(layer, eqx.nn.Linear) and layer.weight.shape == (3, 2)


# --- donation ----------------------------------------------------------------------------


def _deleted(x) -> bool:
    return x.is_deleted()


@pytest.mark.parametrize("mode", ["all", "warn"])
def test_donate_all_donates_every_argument(mode):
    f = fj.filter_jit(lambda a, b: (a + 1, b + 1), donate=mode)
    a, b = jnp.ones(4), jnp.ones(4)
    f(a, b)
    assert _deleted(a) and _deleted(b)


@pytest.mark.parametrize("mode", ["all-except-first", "warn-except-first"])
def test_donate_except_first_keeps_the_first_argument(mode):
    f = fj.filter_jit(lambda a, b: (a + 1, b + 1), donate=mode)
    a, b = jnp.ones(4), jnp.ones(4)
    f(a, b)
    assert not _deleted(a) and _deleted(b)


def test_donate_none_donates_nothing():
    f = fj.filter_jit(lambda a: a + 1)
    a = jnp.ones(4)
    f(a)
    assert not _deleted(a)


def _unused_donation_warnings(mode):
    f = fj.filter_jit(lambda a, b: a.sum() + b.sum(), donate=mode)  # b cannot be reused
    # JAX caches lowerings across jit objects: a shape of its own per mode and backend
    # makes sure this call lowers (and so warns) afresh.
    width = 7 + sorted(_DONATE_MODES).index(mode) + 10 * (fj.backend() == "python")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        f(jnp.ones(3), jnp.ones((5, width)))
    return [w for w in caught if "donated buffers were not usable" in str(w.message)]


_DONATE_MODES = ["all", "all-except-first", "warn", "warn-except-first"]


@pytest.mark.parametrize("mode", ["all", "all-except-first"])
def test_donate_all_modes_silence_unused_donation_warnings(mode):
    assert _unused_donation_warnings(mode) == []


@pytest.mark.parametrize("mode", ["warn", "warn-except-first"])
def test_donate_warn_modes_let_the_warning_through(mode):
    assert len(_unused_donation_warnings(mode)) >= 1


def test_donate_rejects_unknown_mode():
    with pytest.raises(ValueError, match="donate"):
        fj.filter_jit(lambda x: x, donate="some")


def test_reserved_jit_kwargs_rejected():
    with pytest.raises(ValueError, match="static_argnums"):
        fj.filter_jit(lambda x: x, static_argnums=0)


# --- asynchronous dispatch ---------------------------------------------------------------


def test_call_returns_before_the_computation_finishes():
    a = jnp.ones((1024, 1024))
    f = fj.filter_jit(lambda a, n: jax.lax.fori_loop(0, n, lambda i, b: b @ a / 1024.0, a))
    f(a, 40).block_until_ready()  # compile
    start = time.perf_counter()
    out = f(a, 40)
    dispatched = time.perf_counter() - start
    out.block_until_ready()
    finished = time.perf_counter() - start
    # 40 matmuls of 1024x1024 take tens of milliseconds at least; dispatch is ~0.1 ms.
    assert finished > 5 * dispatched, (dispatched, finished)


# --- AOT ---------------------------------------------------------------------------------


def test_lower_compile_and_call_with_statics():
    @fj.filter_jit
    def f(x, n, *, mode):
        return x * n if mode == "mul" else x + n

    lowered = f.lower(jnp.ones(3), 2, mode="mul")
    assert "stablehlo" in lowered.as_text() or "mhlo" in lowered.as_text()
    compiled = lowered.compile()
    np.testing.assert_allclose(compiled(jnp.arange(3.0), 2, mode="mul"), [0.0, 2.0, 4.0])
    with pytest.raises(TypeError, match="static"):
        compiled(jnp.arange(3.0), 3, mode="mul")
    with pytest.raises(TypeError, match="structure"):
        compiled([jnp.arange(3.0)], 2, mode="mul")
    with pytest.raises(TypeError):
        compiled(jnp.arange(4.0), 2, mode="mul")  # another shape


# --- caches ------------------------------------------------------------------------------


def test_programs_of_a_function_out_of_scope_are_freed_by_clear_caches_or_eviction():
    # Programs belong to the function and stay cached (bounded) after its wrappers die,
    # so that fresh wrappers around it compile nothing; clear_caches() or LRU eviction
    # frees them.
    def make():
        big = jnp.ones(1000)

        def f(x):
            return x + big.sum()

        jitted = fj.filter_jit(f)
        jitted(jnp.ones(3))
        return weakref.ref(jitted), weakref.ref(f)

    jitted_ref, fun_ref = make()
    gc.collect()
    assert jitted_ref() is None
    fj.clear_caches()
    gc.collect()
    assert fun_ref() is None

    jitted_ref, fun_ref = make()
    for _ in range(fj._caches.MAX_FUNCTIONS + 1):
        fj.filter_jit(lambda x: x)
    gc.collect()
    assert jitted_ref() is None and fun_ref() is None


def test_clear_caches_forces_a_retrace():
    body = counting(lambda x: x + 1)
    f = fj.filter_jit(body)
    f(jnp.ones(2))
    f(jnp.ones(2))
    assert body.count() == 1
    fj.clear_caches()
    f(jnp.ones(2))
    assert body.count() == 2


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        import os

        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
def test_memory_stays_flat_over_many_calls_statics_and_closures():
    shared = fj.filter_jit(lambda x, s: x * s)
    x = jnp.ones(8)

    def round_of_calls(calls):
        for i in range(calls):
            shared(x, i % 50)
            if i % 100 == 0:
                throwaway = fj.filter_jit(lambda y, k=i: y + k)
                throwaway(x)
                del throwaway

    # Warm-up: compiles the 50 statics and fills the cache of recently used functions.
    round_of_calls(100 * (fj._caches.MAX_FUNCTIONS + 10))
    gc.collect()
    before = _rss_bytes()
    round_of_calls(20_000)
    gc.collect()
    grown = _rss_bytes() - before
    # 200 more throw-away closures each compile a program (~1.5 MB of executable): only
    # the most recent MAX_FUNCTIONS may stay, so memory must not grow with their number.
    # Allow a little allocator noise.
    assert grown < 16 * 2**20, grown


# --- threads -----------------------------------------------------------------------------


def test_threads_get_right_answers_and_trace_each_signature_once():
    trace_lock = threading.Lock()
    traced = []

    def body(x, k):
        with trace_lock:
            traced.append((x.shape, k))
        return x * k

    f = fj.filter_jit(body)
    errors = []
    deadline = time.monotonic() + 2.0

    def worker(seed):
        rng = np.random.default_rng(seed)
        while time.monotonic() < deadline:
            n = int(rng.integers(1, 4))
            k = int(rng.integers(0, 3))
            out = f(jnp.ones(n), k)
            if out.shape != (n,) or not bool(jnp.all(out == k)):
                errors.append((n, k, out))

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(traced) == len(set(traced)) <= 9


# --- errors ------------------------------------------------------------------------------


def test_unhashable_static_leaf_names_path_and_type():
    f = fj.filter_jit(lambda x, opts: x)
    with pytest.raises(TypeError) as info:
        f(jnp.ones(2), {"cfg": {1, 2}})
    message = str(info.value)
    assert "args[1]['cfg']" in message and "set" in message
    assert "jnp.asarray" in message and "hashable" in message
    assert isinstance(info.value, fj.UnhashableStaticError)


def test_unhashable_static_keyword_leaf_names_path():
    f = fj.filter_jit(lambda x, **kw: x)
    with pytest.raises(TypeError, match=r"kwargs\['opts'\]\[0\]"):
        f(jnp.ones(2), opts=[[1]] and [{3}])


def test_not_callable_rejected():
    with pytest.raises(TypeError, match="callable"):
        fj.filter_jit(3)


def test_signature_and_repr_follow_the_wrapped_function():
    import inspect

    def add(x, y=1, *, scale):
        return (x + y) * scale

    f = fj.filter_jit(add)
    assert str(inspect.signature(f)) == "(x, y=1, *, scale)"
    assert "add" in repr(f)


def test_function_made_under_one_backend_still_works_after_a_switch(backend):
    from conftest import BACKENDS

    body = counting(lambda x, s: x * len(s))
    f = fj.filter_jit(body)
    np.testing.assert_allclose(f(jnp.ones(2), "ab"), [2.0, 2.0])
    for other in BACKENDS:
        fj._backend.set_backend(other)
        np.testing.assert_allclose(f(jnp.ones(2), "abc"), [3.0, 3.0])
        np.testing.assert_allclose(f(jnp.ones(2), s="abcd"), [4.0, 4.0])
    fj._backend.set_backend(backend)
    np.testing.assert_allclose(f(jnp.ones(2), "ab"), [2.0, 2.0])


def test_keyword_calls_take_the_same_program_as_positional_ones_repeatedly():
    body = counting(lambda x, y: x + y)
    f = fj.filter_jit(body)
    for _ in range(3):
        f(jnp.ones(2), y=jnp.ones(2))
        f(x=jnp.ones(2), y=jnp.ones(2))
        f(jnp.ones(2), jnp.ones(2))
    assert body.count() == 1


def test_call_shape_table_is_bounded(monkeypatch):
    # Every distinct set of keyword names (or positional count) is a call shape with a
    # plan; the table of plans is bounded like the programs, and a shape forgotten is
    # planned again, with the right result.
    monkeypatch.setattr(fj._caches, "MAX_SIGNATURES", 4)
    body = counting(lambda x, **scales: x * sum(scales.values()))
    f = fj.filter_jit(body)
    names = [f"s{i}" for i in range(12)]
    for i, name in enumerate(names):
        np.testing.assert_allclose(f(jnp.ones(2), **{name: jnp.float32(i)}), [i, i])
        assert len(f._program.plans) <= 4
    assert body.count() == 12
    np.testing.assert_allclose(f(jnp.ones(2), s0=jnp.float32(5.0)), [5.0, 5.0])
    np.testing.assert_allclose(f(jnp.ones(2), s11=jnp.float32(7.0)), [7.0, 7.0])
    assert len(f._program.plans) <= 4
    g = fj.filter_jit(lambda *xs: sum(xs))
    for count in range(1, 10):  # positional counts are shapes too
        assert float(g(*[jnp.float32(1.0)] * count)) == count
    assert len(g._program.plans) <= 4
