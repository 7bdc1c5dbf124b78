"""Compiled programs belong to the function, not to the wrapper (Equinox's semantics).

Every pattern here makes a *fresh* wrapper on each call, as Equinox programs do, and
counts traces: each must trace exactly once however many wrappers there are.
"""

from __future__ import annotations

import functools
import gc

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from memory_common import rss_bytes, traced_growth

import filterjax as fj


class Counted(eqx.Module):
    weight: jax.Array
    bias: jax.Array
    activation: object = eqx.field(static=True)

    def __call__(self, x):
        TRACES.append("call")
        return self.activation(self.weight @ x + self.bias)

    def method(self, x, scale):
        TRACES.append("method")
        return (self.weight @ x) * scale


TRACES: list[str] = []


@pytest.fixture(autouse=True)
def _fresh():
    TRACES.clear()
    fj.clear_caches()
    yield


def make_model(seed=0):
    k1, k2 = jr.split(jr.PRNGKey(seed))
    return Counted(jr.normal(k1, (3, 3)), jr.normal(k2, (3,)), jax.nn.relu)


def test_fresh_filter_jit_of_the_same_module_traces_once():
    model = make_model()
    x = jnp.ones(3)
    outs = [fj.filter_jit(model)(x) for _ in range(5)]
    assert TRACES == ["call"]
    for out in outs:
        np.testing.assert_allclose(out, model(x))


def test_fresh_filter_jit_of_an_updated_module_traces_once_and_uses_new_arrays():
    model = make_model()
    x = jnp.ones(3)
    for _ in range(4):
        model = eqx.tree_at(lambda m: m.bias, model, model.bias + 1.0)
        np.testing.assert_allclose(fj.filter_jit(model)(x), model(x), rtol=1e-6)
    assert TRACES.count("call") == 1 + 4  # eager model(x) calls trace nothing; 1 jit trace


def test_fresh_filter_jit_of_filter_grad_traces_once():
    def loss(model, x):
        TRACES.append("loss")
        return jnp.sum(model(x) ** 2)

    model = make_model()
    x = jnp.ones(3)
    grads = [fj.filter_jit(fj.filter_grad(loss))(model, x) for _ in range(4)]
    assert TRACES.count("loss") == 1
    expected = eqx.filter_grad(loss)(model, x)
    for g in grads:
        np.testing.assert_allclose(g.weight, expected.weight, rtol=1e-6)


def test_donation_pattern_with_a_new_model_each_step_traces_once():
    def step(model, x):
        TRACES.append("step")
        return eqx.tree_at(lambda m: m.bias, model, model.bias + x.sum())

    model = make_model()
    for _ in range(4):
        model = fj.filter_jit(step, donate="all")(model, jnp.ones(3))
    assert TRACES == ["step"]
    np.testing.assert_allclose(model.bias, make_model().bias + 12.0, rtol=1e-6)


def test_donated_function_leaves_with_fresh_wrappers_trace_once():
    # The buffer-donation pattern: a new model each step, its arrays donated.
    for seed in range(3):
        fj.filter_jit(make_model(seed), donate="all")(jnp.ones(3))
    assert TRACES.count("call") == 1


def test_fresh_filter_jit_of_a_bound_method_traces_once():
    model = make_model()
    x = jnp.ones(3)
    for _ in range(3):
        fj.filter_jit(model.method)(x, 2.0)
    assert TRACES == ["method"]
    # Another model with the same structure shares the program; its arrays are traced.
    other = make_model(1)
    np.testing.assert_allclose(fj.filter_jit(other.method)(x, 2.0), other.method(x, 2.0), rtol=1e-6)
    assert TRACES.count("method") == 2  # the eager call above traces nothing


def test_fresh_filter_jit_of_a_partial_holding_arrays_traces_once():
    def f(w, x):
        TRACES.append("f")
        return w * x

    for w in (jnp.ones(2), 2 * jnp.ones(2), 3 * jnp.ones(2)):
        np.testing.assert_allclose(fj.filter_jit(functools.partial(f, w))(jnp.ones(2)), w)
    assert TRACES == ["f"]


def test_fresh_filter_pmap_of_the_same_module_traces_once():
    model = make_model()
    n = jax.local_device_count()
    xs = jnp.ones((n, 3))
    for _ in range(3):
        out = fj.filter_pmap(model)(xs)
    assert TRACES == ["call"]
    np.testing.assert_allclose(out, jax.vmap(model)(xs), rtol=1e-6)


def test_different_options_do_not_share_programs():
    def f(x):
        TRACES.append("f")
        return x + 1

    fj.filter_jit(f)(jnp.ones(2))
    fj.filter_jit(f, donate="warn")(jnp.ones(2))
    fj.filter_jit(f, inline=True)(jnp.ones(2))
    assert TRACES == ["f", "f", "f"]


def test_functions_equal_in_static_part_but_different_do_not_share():
    def f(x):
        TRACES.append("f")
        return x + 1

    def g(x):
        TRACES.append("g")
        return x + 2

    assert fj.filter_jit(f)(jnp.ones(1)).tolist() == [2.0]
    assert fj.filter_jit(g)(jnp.ones(1)).tolist() == [3.0]
    assert TRACES == ["f", "g"]


def test_modules_with_different_static_fields_do_not_share():
    x = jnp.ones(3)
    relu = make_model()
    tanh = Counted(relu.weight, relu.bias, jnp.tanh)
    np.testing.assert_allclose(fj.filter_jit(relu)(x), relu(x), rtol=1e-6)
    np.testing.assert_allclose(fj.filter_jit(tanh)(x), tanh(x), rtol=1e-6)
    assert TRACES.count("call") == 4  # two traces, two eager calls


def test_keyword_and_positional_calls_of_fresh_wrappers_share_one_program():
    def f(x, y, scale=1.0):
        TRACES.append("f")
        return (x + y) * scale

    x = jnp.ones(2)
    outs = [
        fj.filter_jit(f)(x, x, 2.0),
        fj.filter_jit(f)(x, y=x, scale=2.0),
        fj.filter_jit(f)(x=x, y=x, scale=2.0),
        fj.filter_jit(f)(x, x, scale=2.0),
    ]
    assert TRACES == ["f"]
    for out in outs:
        np.testing.assert_allclose(out, [4.0, 4.0])


@pytest.mark.parametrize(
    "transform",
    [
        lambda f: fj.filter_grad(f),
        lambda f: fj.filter_value_and_grad(f),
        lambda f: fj.filter_grad(f, has_aux=True),
        lambda f: fj.filter_vmap(f),
        lambda f: fj.filter_vmap(f, in_axes=(0, None)),
        lambda f: fj.filter_pmap(f),
        lambda f: fj.filter_checkpoint(f),
        lambda f: fj.filter_jacfwd(f),
        lambda f: fj.filter_jacrev(f),
        lambda f: fj.filter_hessian(f),
        lambda f: fj.filter_jit(f),
        lambda f: fj.filter_jit(f, donate="all"),
    ],
)
def test_wrappers_of_equal_functions_compare_and_hash_equal(transform):
    def f(x, y):
        return jnp.sum(x * y)

    def g(x, y):
        return jnp.sum(x + y)

    a, b = transform(f), transform(f)
    assert a is not b
    assert a == b and hash(a) == hash(b)
    assert a != transform(g)
    # Equal wrappers are equal static values: a jitted function taking one as an
    # argument traces once for both.
    count = []

    @fj.filter_jit
    def apply(w, x):
        count.append(1)
        return x

    apply(a, jnp.ones(2))
    apply(b, jnp.ones(2))
    assert len(count) == 1


def test_wrappers_of_equal_modules_compare_equal():
    model = make_model()
    assert fj.filter_jit(model) == fj.filter_jit(model)
    assert fj.filter_vmap(model) == fj.filter_vmap(model)
    assert fj.filter_jit(model) != fj.filter_jit(make_model(1))
    assert fj.filter_grad(model) == fj.filter_grad(model)


def test_memory_is_flat_over_thousands_of_fresh_wrappers():
    model = make_model()
    x = jnp.ones(3)

    def loop(n):
        for _ in range(n):
            fj.filter_jit(model)(x)

    loop(200)
    grown = traced_growth(lambda: loop(3000))
    assert grown < 200_000, grown  # flat: not ~1 KB per wrapper
    assert TRACES == ["call"]


@pytest.mark.slow
def test_no_memory_kept_per_wrapper_copy_or_unflattening():
    """Making, copying and unflattening wrappers keeps nothing once they are gone: not the
    wrapper's instance dict, nor anything it held."""
    import copy

    import jax.tree_util as jtu

    model = make_model()

    def body(x):
        return x

    def churn(n):
        for i in range(n):
            wrapper = fj.filter_jit(body)
            copy.copy(wrapper)
            leaves, treedef = jtu.tree_flatten(wrapper)
            jtu.tree_unflatten(treedef, leaves)
            if i % 10 == 0:
                # A Module holding a wrapper, mapped over (a new wrapper per call).
                jtu.tree_map(lambda leaf: leaf, (model, fj.filter_jit(model)))

    churn(2_000)
    gc.collect()
    rss_before = rss_bytes()
    grown = traced_growth(lambda: churn(100_000))
    rss_grown = rss_bytes() - rss_before
    # 320k objects: even 8 bytes kept per object would be 2.5 MB.
    assert grown < 100_000, grown
    assert rss_grown < 4 * 2**20, rss_grown


def test_cache_of_distinct_lambdas_is_bounded():
    from filterjax import _caches, _jit

    x = jnp.ones(2)
    for i in range(3 * _caches.MAX_FUNCTIONS):
        fj.filter_jit(lambda y, k=i: y + k)(x)
    gc.collect()
    # Only the most recently used stay (strongly); the others are freed with their code.
    assert len(_jit._PROGRAMS) <= _caches.MAX_FUNCTIONS
    fj.clear_caches()
    gc.collect()
    assert len(_jit._PROGRAMS) == 0


def test_a_live_wrapper_keeps_its_programs_after_eviction():
    def f(x):
        TRACES.append("f")
        return x * 2

    kept = fj.filter_jit(f)
    kept(jnp.ones(2))
    from filterjax import _caches

    for i in range(2 * _caches.MAX_FUNCTIONS):
        fj.filter_jit(lambda y, k=i: y + k)(jnp.ones(2))
    kept(jnp.ones(2))
    # And a fresh wrapper around f finds the live program (held weakly by the cache).
    fj.filter_jit(f)(jnp.ones(2))
    assert TRACES == ["f"]


def test_new_shapes_and_statics_still_recompile_exactly():
    def f(x, n):
        TRACES.append((x.shape, n))
        return x * n

    for _ in range(2):
        fj.filter_jit(f)(jnp.ones(2), 1)
        fj.filter_jit(f)(jnp.ones(3), 1)
        fj.filter_jit(f)(jnp.ones(2), 2)
    assert TRACES == [((2,), 1), ((3,), 1), ((2,), 2)]


def test_aot_lowering_through_a_fresh_wrapper_matches_the_call():
    model = make_model()
    x = jnp.ones(3)
    compiled = fj.filter_jit(model).lower(x).compile()
    np.testing.assert_allclose(compiled(x), model(x), rtol=1e-6)
