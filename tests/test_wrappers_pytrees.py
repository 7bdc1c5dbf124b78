"""Transformed functions are PyTrees, as in Equinox: gradients, tree_at, optimisers and
serialisation reach the arrays inside them; they copy, deep-copy and pickle."""

from __future__ import annotations

import copy
import pickle

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import optax
import pytest

import filterjax as fj


def linear(seed=0):
    return eqx.nn.Linear(2, 2, key=jr.PRNGKey(seed))


def mlp():
    return eqx.nn.MLP(2, 2, 4, 1, key=jr.PRNGKey(0))


def double(x):
    return 2 * x


NAMES = [
    "filter_jit",
    "filter_vmap",
    "filter_pmap",
    "filter_grad",
    "filter_value_and_grad",
    "filter_checkpoint",
    "filter_jacfwd",
    "filter_jacrev",
    "filter_hessian",
]


def _kinds(tree):
    return [type(leaf).__name__ for leaf in jtu.tree_leaves(tree)]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("make", [mlp, linear])
def test_leaf_count_and_order_match_equinox(name, make):
    module = make()
    ours = getattr(fj, name)(module)
    theirs = getattr(eqx, name)(module)
    assert _kinds(ours) == _kinds(theirs)
    for a, b in zip(jtu.tree_leaves(ours), jtu.tree_leaves(theirs), strict=True):
        if isinstance(a, jax.Array):
            assert a is b  # the module's own arrays, in Equinox's order


@pytest.mark.parametrize("name", NAMES)
def test_leaves_of_a_wrapped_plain_function_match_equinox(name):
    ours = jtu.tree_leaves(getattr(fj, name)(double))
    theirs = jtu.tree_leaves(getattr(eqx, name)(double))
    assert [type(x).__name__ for x in ours] == [type(x).__name__ for x in theirs]


class Model(eqx.Module):
    enc: object

    def __call__(self, x):
        return self.enc(x).sum()


@pytest.mark.parametrize("name", ["filter_jit", "filter_checkpoint"])
def test_gradient_reaches_a_module_stored_inside_a_wrapper(name):
    lin = linear()
    x = jnp.array([1.0, -2.0])
    stored = Model(getattr(fj, name)(lin))
    bare = Model(lin)
    got = fj.filter_grad(lambda m, x: m(x))(stored, x)
    want = eqx.filter_grad(lambda m, x: m(x))(bare, x)
    got_leaves = [g for g in jtu.tree_leaves(got) if isinstance(g, jax.Array)]
    want_leaves = jtu.tree_leaves(want)
    assert [g.shape for g in got_leaves] == [(2, 2), (2,)]
    for g, w in zip(got_leaves, want_leaves, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6)


def test_gradient_reaches_a_module_stored_inside_filter_vmap():
    lin = linear()
    xs = jnp.ones((3, 2))
    stored = Model(fj.filter_vmap(lin, in_axes=0))
    got = fj.filter_grad(lambda m, xs: m(xs))(stored, xs)
    want = eqx.filter_grad(lambda m, xs: jax.vmap(m)(xs).sum())(lin, xs)
    got_leaves = [g for g in jtu.tree_leaves(got) if isinstance(g, jax.Array)]
    for g, w in zip(got_leaves, jtu.tree_leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6)


def test_training_a_model_holding_a_jitted_submodule_trains_it_and_compiles_once():
    traces = []

    class Net(eqx.Module):
        enc: object

        def __call__(self, x):
            return self.enc(x)

    def loss(model, x, y):
        traces.append(1)
        return jnp.mean((model(x) - y) ** 2)

    net = Net(fj.filter_jit(eqx.nn.Linear(2, 1, key=jr.PRNGKey(1))))
    opt = optax.sgd(0.1)
    params = eqx.filter(net, eqx.is_array)
    state = opt.init(params)
    x, y = jnp.array([1.0, 2.0]), jnp.array([3.0])

    @fj.filter_jit
    def step(net, state):
        grads = fj.filter_grad(loss)(net, x, y)
        updates, state = opt.update(grads, state)
        return eqx.apply_updates(net, updates), state

    first = loss(net, x, y)
    for _ in range(20):
        net, state = step(net, state)
    assert float(loss(net, x, y)) < 0.1 * float(first)
    assert len(traces) == 1 + 1 + 1  # eager, the one trace of step, eager


def test_unflatten_keeps_the_compiled_programs():
    traces = []

    def f(w, x):
        traces.append(1)
        return w * x

    import functools

    wrapper = fj.filter_jit(functools.partial(f, jnp.ones(2)))
    wrapper(jnp.ones(2))
    leaves, treedef = jtu.tree_flatten(wrapper)
    assert [type(x) for x in leaves] == [str, type(jnp.ones(2))]
    rebuilt = jtu.tree_unflatten(treedef, [leaves[0], 3 * jnp.ones(2)])
    np.testing.assert_allclose(rebuilt(jnp.ones(2)), [3.0, 3.0])
    assert len(traces) == 1
    assert rebuilt.__wrapped__.args[0].tolist() == [3.0, 3.0]


def test_tree_at_into_a_jitted_module():
    lin = linear()
    wrapper = fj.filter_jit(lin)
    new = eqx.tree_at(lambda w: w.__wrapped__.bias, wrapper, jnp.array([5.0, 6.0]))
    np.testing.assert_allclose(new.__wrapped__.bias, [5.0, 6.0])
    np.testing.assert_allclose(new(jnp.zeros(2)), [5.0, 6.0])
    np.testing.assert_allclose(wrapper(jnp.zeros(2)), lin.bias)


def test_serialisation_round_trip_through_a_wrapper(tmp_path):
    path = tmp_path / "model.eqx"
    saved = Model(fj.filter_jit(linear(0)))
    eqx.tree_serialise_leaves(path, saved)
    loaded = eqx.tree_deserialise_leaves(path, Model(fj.filter_jit(linear(1))))
    np.testing.assert_allclose(loaded.enc.__wrapped__.weight, linear(0).weight)


@pytest.mark.parametrize("name", NAMES)
def test_copy_deepcopy_and_pickle(name):
    transform = getattr(fj, name)
    wrapper = transform(double)
    for copied in (copy.copy(wrapper), copy.deepcopy(wrapper), pickle.loads(pickle.dumps(wrapper))):
        assert type(copied) is type(wrapper)
        assert copied == wrapper


def test_deepcopy_of_a_jitted_module_is_a_working_wrapper():
    lin = linear()
    wrapper = fj.filter_jit(lin)
    copied = copy.deepcopy(wrapper)
    assert copied == wrapper
    np.testing.assert_allclose(copied(jnp.ones(2)), lin(jnp.ones(2)), rtol=1e-6)
    pickled = pickle.loads(pickle.dumps(fj.filter_jit(double)))
    np.testing.assert_allclose(pickled(jnp.ones(2)), [2.0, 2.0])


def test_wrappers_keep_the_metadata_of_the_function():
    for name in NAMES:
        wrapper = getattr(fj, name)(double)
        assert wrapper.__name__ == "double"
        assert wrapper.__wrapped__ is double or name == "filter_hessian"
        assert "double" in repr(wrapper)


def test_a_wrapper_under_jax_transforms_is_traced_through():
    lin = linear()
    wrapper = fj.filter_jit(lin)
    # Its name is a (static) leaf, as in Equinox: filtered transforms handle it.
    out = fj.filter_jit(lambda w, x: w(x))(wrapper, jnp.ones(2))
    np.testing.assert_allclose(out, lin(jnp.ones(2)), rtol=1e-6)
    scaled = jtu.tree_map(lambda a: a * 2 if eqx.is_array(a) else a, wrapper)
    np.testing.assert_allclose(scaled.__wrapped__.weight, 2 * lin.weight)


def test_gradient_and_updates_through_a_jitted_module_method_compile_once():
    # The everyday Equinox pattern: `@filter_jit` on a Module's `__call__`, the Module
    # trained with gradients and updated every step.
    traces = []

    class Scaled(eqx.Module):
        w: jax.Array

        @fj.filter_jit
        def __call__(self, x):
            traces.append(1)
            return self.w * x

    model = Scaled(jnp.array([1.0, 2.0]))
    x = jnp.array([3.0, 4.0])
    for _ in range(3):
        grads = eqx.filter_grad(lambda m: m(x).sum())(model)
        np.testing.assert_allclose(grads.w, x)
        model = eqx.apply_updates(model, jtu.tree_map(lambda g: -0.1 * g, grads))
    np.testing.assert_allclose(model(x), (jnp.array([1.0, 2.0]) - 0.3 * x) * x, rtol=1e-6)
    # One trace in all, as with `equinox.filter_jit` (JAX differentiates the compiled
    # program; the plain call reuses it).
    assert len(traces) == 1
