"""filter_closure_convert: closed-over arrays become the returned callable's PyTree."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest

import filterjax as fj


def test_seed_example_consts_are_the_closed_over_tracer():
    seen = []

    @jax.grad
    def f(x, y):
        z = x + y
        g = lambda a: z + a  # noqa: E731
        g2 = fj.filter_closure_convert(g, 1)
        assert [id(b) for b in g2.consts] == [id(z)]
        seen.append(g2(1))
        return z

    np.testing.assert_allclose(f(1.0, 1.0), 1.0)
    assert len(seen) == 1


def test_all_closed_over_arrays_are_hoisted_including_integers():
    w = jnp.array([1.0, 2.0])
    idx = jnp.array([1, 0])

    def fn(x, *, label):
        return {"out": x[idx] * w, "label": label, "idx": idx}

    g = fj.filter_closure_convert(fn, jnp.zeros(2), label="a")
    const_ids = {id(c) for c in g.consts}
    assert id(w) in const_ids and id(idx) in const_ids
    assert jtu.tree_leaves(g) == g.consts
    out = g(jnp.array([3.0, 4.0]), label="a")
    expected = fn(jnp.array([3.0, 4.0]), label="a")
    np.testing.assert_allclose(out["out"], expected["out"])
    np.testing.assert_array_equal(out["idx"], expected["idx"])
    assert out["label"] == "a"


def test_differentiable_with_respect_to_consts():
    def outer(w):
        g = fj.filter_closure_convert(lambda x: jnp.sum(jnp.sin(w) * x), jnp.zeros(3))
        grads = fj.filter_grad(lambda g_, x: g_(x))(g, jnp.array([1.0, 2.0, 3.0]))
        return grads

    w = jnp.array([0.1, 0.2, 0.3])
    grads = outer(w)
    (gw,) = [c for c in grads.consts if c is not None and c.shape == (3,)]
    np.testing.assert_allclose(gw, jnp.cos(w) * jnp.array([1.0, 2.0, 3.0]), rtol=1e-6)


def test_gradient_flows_through_consts_across_custom_vjp_boundary():
    # The typical use: make a closed-over tracer explicit before handing a function to
    # jax.custom_vjp, then differentiate the outer function with respect to it.
    @jax.custom_vjp
    def apply(g, x):
        return g(x)

    def fwd(g, x):
        return g(x), (g, x)

    def bwd(res, ct):
        g, x = res
        _, vjp = jax.vjp(lambda g_, x_: g_(x_), g, x)
        return vjp(ct)

    apply.defvjp(fwd, bwd)

    def loss(w):
        g = fj.filter_closure_convert(lambda x: w * x**2, jnp.array(0.0))
        return apply(g, jnp.array(3.0))

    np.testing.assert_allclose(jax.grad(loss)(jnp.array(2.0)), 9.0)


def test_matches_equinox_and_outputs_structs():
    y = jnp.array([1.0, 2.0])

    def fn(tree, n):
        return tree["a"] * y * n, [tree["b"], "s"]

    args = ({"a": jnp.array([0.5, 0.5]), "b": jnp.array(3)}, 2)
    ours = fj.filter_closure_convert(fn, *args)
    theirs = eqx.filter_closure_convert(fn, *args)
    out, ref = ours(*args), theirs(*args)
    np.testing.assert_allclose(out[0], ref[0])
    assert out[1][1] == "s"
    assert ours.out_struct[0].shape == (2,)
    assert ours.in_struct[0][0]["a"].dtype == jnp.float32


def test_function_without_closure_has_no_consts():
    def fn(x):
        return x * 2

    g = fj.filter_closure_convert(fn, jnp.array(1.0))
    assert g.consts == []
    np.testing.assert_allclose(g(jnp.array(3.0)), 6.0)


def test_called_with_different_arguments_is_an_error():
    w = jnp.array(1.0)
    g = fj.filter_closure_convert(lambda x, n: x * w * n, jnp.zeros(2), 3)
    with pytest.raises(ValueError, match="like the example"):
        g(jnp.zeros(3), 3)
    with pytest.raises(ValueError, match="like the example"):
        g(jnp.zeros(2), 4)
    np.testing.assert_allclose(g(jnp.ones(2), 3), jnp.full(2, 3.0))


def test_shape_dtype_struct_examples_and_jit():
    w = jnp.array([2.0, 3.0])
    g = fj.filter_closure_convert(lambda x: x * w, jax.ShapeDtypeStruct((2,), jnp.float32))
    out = jax.jit(lambda g_, x: g_(x))(g, jnp.array([1.0, 1.0]))
    np.testing.assert_allclose(out, w)
