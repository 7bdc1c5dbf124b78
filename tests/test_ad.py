"""The autodiff family, compared against plain JAX on hand-partitioned arguments and
against Equinox."""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import pytest

import filterjax as fj


def assert_tree_allclose(a, b, rtol=1e-5, atol=1e-6):
    la, ta = jtu.tree_flatten(a, is_leaf=lambda x: x is None)
    lb, tb = jtu.tree_flatten(b, is_leaf=lambda x: x is None)
    assert ta == tb, f"{ta} != {tb}"
    for x, y in zip(la, lb, strict=True):
        if x is None or y is None:
            assert x is None and y is None
        elif hasattr(x, "shape") or hasattr(y, "shape"):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)
        else:
            assert x == y


def mixed_tree():
    """A PyTree with every kind of leaf filter_grad must cope with."""
    return {
        "w": jnp.array([1.0, -2.0, 3.0]),
        "b": np.array([0.5, 0.25], dtype=np.float32),
        "i": jnp.array([1, 2, 3]),
        "scale": 2.0,
        "count": 3,
        "act": jnp.tanh,
        "name": "layer",
        "nothing": None,
    }


def mixed_loss(tree, y):
    h = tree["act"](tree["w"] * tree["scale"] + tree["i"]) * tree["count"]
    return jnp.sum(h**2) * jnp.sum(tree["b"]) + jnp.sum(tree["w"] * y)


def hand_grad(tree, y):
    """The same gradient with jax.grad on the hand-picked float arrays."""

    def f(w, b):
        return mixed_loss({**tree, "w": w, "b": b}, y)

    gw, gb = jax.grad(f, argnums=(0, 1))(tree["w"], tree["b"])
    expected = {k: None for k in tree}
    expected["w"], expected["b"] = gw, gb
    return expected


def mlp(seed=0, in_size=4, out_size=2, width=8, depth=2):
    return eqx.nn.MLP(in_size, out_size, width, depth, key=jr.PRNGKey(seed))


def mlp_loss(model, x, y):
    pred = jax.vmap(model)(x)
    return jnp.mean((pred - y) ** 2)


@pytest.fixture
def data():
    kx, ky = jr.split(jr.PRNGKey(1))
    return jr.normal(kx, (5, 4)), jr.normal(ky, (5, 2))


# ---------------------------------------------------------------------------------------
# filter_grad / filter_value_and_grad


def test_grad_mixed_tree_matches_hand_partitioned_jax_grad():
    tree, y = mixed_tree(), jnp.array([1.0, 2.0, 3.0])
    grads = fj.filter_grad(mixed_loss)(tree, y)
    assert_tree_allclose(grads, hand_grad(tree, y))
    for k in ("i", "scale", "count", "act", "name", "nothing"):
        assert grads[k] is None


def test_grad_matches_equinox_on_mixed_tree():
    tree, y = mixed_tree(), jnp.array([1.0, 2.0, 3.0])
    assert_tree_allclose(fj.filter_grad(mixed_loss)(tree, y), eqx.filter_grad(mixed_loss)(tree, y))


def test_value_and_grad_matches_jax():
    tree, y = mixed_tree(), jnp.array([0.5, 0.5, 0.5])
    value, grads = fj.filter_value_and_grad(mixed_loss)(tree, y)
    np.testing.assert_allclose(value, mixed_loss(tree, y), rtol=1e-6)
    assert_tree_allclose(grads, hand_grad(tree, y))


def test_has_aux_for_grad_and_value_and_grad():
    def loss(x, k):
        return jnp.sum(x["w"] ** 2), {"k": k, "w": x["w"]}

    x = {"w": jnp.array([1.0, 2.0]), "tag": "t"}
    grads, aux = fj.filter_grad(loss, has_aux=True)(x, 7)
    assert_tree_allclose(grads, {"w": 2 * x["w"], "tag": None})
    assert aux["k"] == 7
    (value, aux2), grads2 = fj.filter_value_and_grad(loss, has_aux=True)(x, 7)
    np.testing.assert_allclose(value, 5.0)
    assert aux2["k"] == 7
    assert_tree_allclose(grads2, grads)
    eqx_out = eqx.filter_value_and_grad(loss, has_aux=True)(x, 7)
    assert_tree_allclose(eqx_out, ((value, aux2), grads2))


def test_decorator_forms_and_metadata():
    @fj.filter_grad
    def plain(x):
        """plain docstring"""
        return jnp.sum(x**2)

    @fj.filter_grad(has_aux=True)
    def with_aux(x):
        """aux docstring"""
        return jnp.sum(x**2), "aux"

    @fj.filter_value_and_grad()
    def vg(x):
        return jnp.sum(x)

    x = jnp.array([1.0, 3.0])
    assert_tree_allclose(plain(x), 2 * x)
    g, aux = with_aux(x)
    assert aux == "aux" and np.allclose(g, 2 * x)
    assert vg(x)[0] == 4.0
    assert plain.__name__ == "plain" and plain.__doc__ == "plain docstring"
    assert with_aux.__name__ == "with_aux" and with_aux.__doc__ == "aux docstring"
    assert plain.__wrapped__.__name__ == "plain"
    assert vg.__name__ == "vg"


def test_tuple_first_argument_differentiates_several_objects():
    def func(x, y):
        return jnp.sum(x * y)

    @fj.filter_grad
    def grad_func(x__y):
        x, y = x__y
        return func(x, y)

    x, y = jnp.array([1.0, 2.0]), jnp.array([3.0, 4.0])
    gx, gy = grad_func((x, y))
    ex, ey = jax.grad(func, argnums=(0, 1))(x, y)
    assert_tree_allclose((gx, gy), (ex, ey))


def test_only_first_argument_and_no_kwargs_are_differentiated():
    def f(x, y, *, z):
        return jnp.sum(x * y * z)

    x, y, z = jnp.array([1.0, 2.0]), jnp.array([3.0, 4.0]), jnp.array([5.0, 6.0])
    g = fj.filter_grad(f)(x, y, z=z)
    assert_tree_allclose(g, y * z)


def test_errors_without_positional_argument_and_with_argnums():
    g = fj.filter_grad(lambda x: jnp.sum(x))
    with pytest.raises(TypeError, match="first argument by position"):
        g(x=jnp.ones(2))
    with pytest.raises(TypeError, match="at least one positional"):
        g()
    with pytest.raises(ValueError, match="argnums"):
        fj.filter_grad(lambda x: x, argnums=1)


def test_non_scalar_output_raises():
    with pytest.raises(TypeError, match="scalar"):
        fj.filter_grad(lambda x: x * 2)(jnp.ones(3))


def test_no_differentiable_leaves_gives_all_none():
    grads = fj.filter_grad(lambda t: jnp.asarray(1.0) * t[0])((1, "a", jnp.array(2)))
    assert grads == (None, None, None)


def test_grad_mlp_matches_hand_split_and_equinox(data):
    x, y = data
    model = mlp()
    grads = fj.filter_grad(mlp_loss)(model, x, y)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    expected = jax.grad(lambda p: mlp_loss(eqx.combine(p, static), x, y))(params)
    assert_tree_allclose(grads, expected)
    assert_tree_allclose(grads, eqx.filter_grad(mlp_loss)(model, x, y))
    assert grads.activation is None


def test_grad_of_grad_matches_jax():
    def f(tree):
        return jnp.sum(jnp.sin(tree[0]) ** 3) * tree[1]

    def outer(tree):
        return jnp.sum(fj.filter_grad(f)(tree)[0] ** 2)

    tree = (jnp.array([0.3, 0.7]), 2)
    got = fj.filter_grad(outer)(tree)

    def jf(w):
        return jnp.sum(jax.grad(lambda v: jnp.sum(jnp.sin(v) ** 3) * 2)(w) ** 2)

    assert_tree_allclose(got, (jax.grad(jf)(tree[0]), None))
    hess = jax.hessian(lambda v: jnp.sum(jnp.sin(v) ** 3) * 2)(tree[0])
    via_jacfwd = fj.filter_jacfwd(lambda t: fj.filter_grad(f)(t)[0])(tree)[0]
    assert_tree_allclose(via_jacfwd, hess)


def test_grad_inside_jax_jit(data):
    x, y = data
    model = mlp()
    params, static = eqx.partition(model, eqx.is_array)

    @jax.jit
    def step(p, x, y):
        return fj.filter_value_and_grad(mlp_loss)(eqx.combine(p, static), x, y)

    value, grads = step(params, x, y)
    ev, eg = eqx.filter_value_and_grad(mlp_loss)(model, x, y)
    np.testing.assert_allclose(value, ev, rtol=1e-6)
    assert_tree_allclose(grads, eg)


def test_grad_inside_filter_jit(data):
    x, y = data
    model = mlp()
    step = fj.filter_jit(fj.filter_value_and_grad(mlp_loss))
    value, grads = step(model, x, y)
    ev, eg = eqx.filter_value_and_grad(mlp_loss)(model, x, y)
    np.testing.assert_allclose(value, ev, rtol=1e-6)
    assert_tree_allclose(grads, eg)
    # A second call hits the cache and gives the same answer.
    value2, _ = step(model, x, y)
    np.testing.assert_allclose(value2, value)


def test_filter_vmap_of_filter_grad():
    ws = jnp.arange(6.0).reshape(3, 2)

    def f(tree):
        return jnp.sum(tree["w"] ** 3) * tree["k"]

    per_example = fj.filter_vmap(fj.filter_grad(f))({"w": ws, "k": 2})
    expected = jax.vmap(jax.grad(lambda w: jnp.sum(w**3) * 2))(ws)
    assert per_example["k"] is None
    np.testing.assert_allclose(per_example["w"], expected)


def test_jax_vmap_of_filter_grad():
    ws = jnp.arange(6.0).reshape(3, 2)
    got = jax.vmap(fj.filter_grad(lambda w, n: jnp.sum(w**3) * n), in_axes=(0, None))(ws, 2.0)
    np.testing.assert_allclose(got, 6 * ws**2)


def test_grad_wrapper_is_a_pytree_holding_fun():
    model = mlp()
    wrapped = fj.filter_grad(lambda m, x: jnp.sum(m(x)))
    # Laid out as Equinox's: the function, then has_aux twice (grad and value_and_grad).
    assert jtu.tree_leaves(wrapped) == [wrapped.__wrapped__, False, False]
    bound = fj.filter_grad(model.__call__.__func__).__get__(model, type(model))
    assert len(jtu.tree_leaves(bound)) > 1  # the instance's arrays are visible
    rebuilt = jtu.tree_map(lambda x: x, wrapped)
    assert_tree_allclose(rebuilt(model, jnp.ones(4)), wrapped(model, jnp.ones(4)))


class _Linear(eqx.Module):
    w: jax.Array
    act: object = eqx.field(static=True)

    @fj.filter_grad
    def grad_self(self, x):
        return jnp.sum(self.act(self.w * x))

    @eqx.filter_grad
    def eqx_grad_self(self, x):
        return jnp.sum(self.act(self.w * x))


class _Plain:
    def __init__(self):
        self.w = jnp.array([1.0, 2.0])

    @fj.filter_value_and_grad
    def value_and_grad_self(self, x):
        return jnp.sum(self.w * x)


def test_method_descriptor_on_module_and_class():
    layer = _Linear(jnp.array([0.5, 1.5]), jnp.sin)
    x = jnp.array([2.0, 3.0])
    assert_tree_allclose(layer.grad_self(x), layer.eqx_grad_self(x))
    assert _Linear.grad_self.__name__ == "grad_self"
    # A plain object is a single non-array leaf: its gradient is None, as in Equinox.
    value, grads = _Plain().value_and_grad_self(x)
    assert value == 8.0 and grads is None


def test_numpy_float64_leaf_and_complex_leaf():
    tree = {"a": np.array([1.0, 2.0]), "c": jnp.array([1.0 + 1.0j])}
    grads = fj.filter_grad(lambda t: jnp.sum(t["a"] ** 2) + jnp.sum(jnp.abs(t["c"]) ** 2))(tree)
    eq = eqx.filter_grad(lambda t: jnp.sum(t["a"] ** 2) + jnp.sum(jnp.abs(t["c"]) ** 2))(tree)
    assert_tree_allclose(grads, eq)


# ---------------------------------------------------------------------------------------
# filter_jvp


def jvp_fn(x, model_like, n, *, offset):
    out = model_like["act"](x * model_like["w"]) + offset
    return {
        "out": out,
        "w_only": model_like["w"] * 2,
        "const": jnp.asarray(3.0),
        "int": jnp.arange(n),
        "name": model_like["name"],
        "n": n,
    }


def test_jvp_matches_jax_jvp_and_marks_symbolic_zeros():
    x = jnp.array([0.1, 0.2])
    m = {"w": jnp.array([1.0, 2.0]), "act": jnp.tanh, "name": "m", "i": jnp.array(3)}
    tx = jnp.array([1.0, 0.5])
    primals = (x, m, 2)
    tangents = (tx, {"w": None, "act": None, "name": None, "i": None}, None)
    out, t_out = fj.filter_jvp(jvp_fn, primals, tangents, offset=1.0)

    def hand(x_):
        return jvp_fn(x_, m, 2, offset=1.0)["out"]

    e_out, e_t = jax.jvp(hand, (x,), (tx,))
    np.testing.assert_allclose(out["out"], e_out, rtol=1e-6)
    np.testing.assert_allclose(t_out["out"], e_t, rtol=1e-6)
    # no dependence on x, not differentiable, or not arrays: symbolic zero
    for k in ("w_only", "const", "int", "name", "n"):
        assert t_out[k] is None, k
    assert out["name"] == "m" and out["n"] == 2
    np.testing.assert_array_equal(out["int"], jnp.arange(2))


def test_jvp_several_tangents_matches_jax():
    def f(a, b, c):
        return jnp.sin(a) * b + c

    a, b, c = jnp.array([1.0, 2.0]), jnp.array([3.0, 4.0]), 0.5
    ta, tb, tc = jnp.array([1.0, 0.0]), jnp.array([0.5, 0.5]), 2.0
    out, t = fj.filter_jvp(f, (a, b, c), (ta, tb, tc))
    eo, et = jax.jvp(f, (a, b, c), (ta, tb, tc))
    np.testing.assert_allclose(out, eo)
    np.testing.assert_allclose(t, et)
    eqx_out = eqx.filter_jvp(f, (a, b, c), (ta, tb, tc))
    assert_tree_allclose((out, t), eqx_out)


def test_jvp_none_tangent_for_whole_subtree():
    m = mlp()
    x = jnp.ones(4)
    tx = jnp.arange(4.0)
    out, t = fj.filter_jvp(lambda model, v: model(v), (m, x), (None, tx))
    eo, et = jax.jvp(lambda v: m(v), (x,), (tx,))
    np.testing.assert_allclose(out, eo, rtol=1e-6)
    np.testing.assert_allclose(t, et, rtol=1e-5)


def test_jvp_tangents_on_model_leaves_match_hand_split():
    m = mlp()
    x = jnp.ones(4)
    params, static = eqx.partition(m, eqx.is_inexact_array)
    t_params = jtu.tree_map(jnp.ones_like, params)
    out, t = fj.filter_jvp(lambda model: model(x), (m,), (t_params,))
    eo, et = jax.jvp(lambda p: eqx.combine(p, static)(x), (params,), (t_params,))
    np.testing.assert_allclose(t, et, rtol=1e-5)


def test_jvp_requires_none_tangent_for_non_inexact_primal():
    with pytest.raises(TypeError, match=r"primals\[1\].*must be `None`"):
        fj.filter_jvp(lambda a, b: a * b, (jnp.array(1.0), jnp.array(2)), (1.0, jnp.array(1)))
    with pytest.raises(TypeError, match="must be `None`"):
        fj.filter_jvp(lambda a, s: a, (jnp.array(1.0), "s"), (1.0, 1.0))
    with pytest.raises(TypeError, match="tangent at"):
        fj.filter_jvp(lambda a: a, (jnp.array(1.0),), ("nope",))
    with pytest.raises(ValueError, match="same PyTree structure"):
        fj.filter_jvp(lambda a, b: a, (jnp.array(1.0), jnp.array(2.0)), (1.0,))


def test_jvp_integer_outputs_of_perturbed_values_get_none():
    def f(x):
        return (x * 2).astype(jnp.int32), jnp.argmax(x), x

    out, t = fj.filter_jvp(f, (jnp.array([1.0, 2.0]),), (jnp.ones(2),))
    assert t[0] is None and t[1] is None
    np.testing.assert_array_equal(out[0], jnp.array([2, 4]))
    np.testing.assert_allclose(t[2], jnp.ones(2))
    _, t_jit = jax.jit(lambda v: fj.filter_jvp(f, (v,), (jnp.ones(2),)))(jnp.ones(2))
    assert t_jit[0] is None and t_jit[1] is None


def test_jvp_all_none_tangents_and_no_arrays():
    out, t = fj.filter_jvp(lambda a, s: (a * 2, s), (jnp.array(1.0), "s"), (None, None))
    assert t == (None, None) and out[1] == "s"


def test_jvp_nested_and_under_jit():
    def f(x):
        return jnp.sin(x) ** 2

    x = jnp.array(0.3)

    def first(x_):
        return fj.filter_jvp(f, (x_,), (jnp.array(1.0),))[1]

    _, second = fj.filter_jvp(first, (x,), (jnp.array(1.0),))
    expected = jax.grad(jax.grad(f))(x)
    np.testing.assert_allclose(second, expected, rtol=1e-5)
    jitted = jax.jit(lambda x_: fj.filter_jvp(f, (x_,), (jnp.array(2.0),)))
    _, t = jitted(x)
    np.testing.assert_allclose(t, 2 * jax.grad(f)(x), rtol=1e-5)


def test_jvp_output_closed_over_outer_tracer_is_zero():
    # An output that depends only on an outer transform's tracer has a zero tangent here.
    def outer(y):
        out, t = fj.filter_jvp(lambda x: (x * y, y * 2), (jnp.array(1.0),), (jnp.array(1.0),))
        assert t[1] is None
        return out[0] + out[1] + t[0]

    np.testing.assert_allclose(jax.grad(outer)(jnp.array(2.0)), 4.0)


# ---------------------------------------------------------------------------------------
# filter_vjp


def test_vjp_matches_jax_vjp_with_none_cotangents():
    def f(tree, k):
        return {"y": tree["w"] * k * tree["s"], "i": tree["i"] + 1, "name": tree["name"]}

    tree = {"w": jnp.array([1.0, 2.0]), "i": jnp.array([1, 2]), "s": 3.0, "name": "n"}
    out, vjpfun = fj.filter_vjp(f, tree, jnp.array(2.0))
    assert out["name"] == "n"
    np.testing.assert_array_equal(out["i"], jnp.array([2, 3]))
    ct = {"y": jnp.array([1.0, 1.0]), "i": None, "name": None}
    g_tree, g_k = vjpfun(ct)
    assert g_tree["i"] is None and g_tree["s"] is None and g_tree["name"] is None
    eo, e_vjp = jax.vjp(lambda w, k: w * k * 3.0, tree["w"], jnp.array(2.0))
    ew, ek = e_vjp(jnp.array([1.0, 1.0]))
    np.testing.assert_allclose(g_tree["w"], ew)
    np.testing.assert_allclose(g_k, ek)
    eqx_out, eqx_vjp = eqx.filter_vjp(f, tree, jnp.array(2.0))
    assert_tree_allclose((g_tree, g_k), eqx_vjp(ct))


def test_vjp_has_aux_and_mlp():
    m = mlp()
    x = jnp.ones(4)
    out, vjpfun, aux = fj.filter_vjp(lambda model: (model(x), "aux"), m, has_aux=True)
    assert aux == "aux"
    (g,) = vjpfun(jnp.ones(2))
    params, static = eqx.partition(m, eqx.is_inexact_array)
    _, e_vjp = jax.vjp(lambda p: eqx.combine(p, static)(x), params)
    assert_tree_allclose(g, e_vjp(jnp.ones(2))[0], rtol=1e-5)


def test_vjp_accepts_full_cotangent_and_rejects_wrong_structure():
    out, vjpfun = fj.filter_vjp(lambda x: (x * 2, jnp.arange(2)), jnp.array([1.0, 2.0]))
    (g,) = vjpfun((jnp.ones(2), jnp.zeros(2, jnp.int32)))
    np.testing.assert_allclose(g, 2 * jnp.ones(2))
    with pytest.raises(ValueError, match="structure of the primal output"):
        vjpfun([jnp.ones(2)])


@pytest.mark.parametrize(
    ("fun", "cotangent", "where"),
    [
        (lambda x: 0.0, jnp.float32(1.0), "out:"),
        (lambda x: (x * 2, "name"), (jnp.ones(2), 1.0), r"out\[1\]"),
        (lambda x: {"n": 3, "y": x}, {"n": jnp.ones(()), "y": jnp.ones(2)}, r"out\['n'\]"),
    ],
)
def test_vjp_cotangent_on_a_non_array_output_is_an_error(fun, cotangent, where):
    # Equinox raises (JAX's structure check); dropping it would return zeros silently.
    _, vjpfun = fj.filter_vjp(fun, jnp.array([1.0, 2.0]))
    with pytest.raises(ValueError, match=rf"output at {where}.* cotangent must be `None`"):
        vjpfun(cotangent)
    _, eqx_vjpfun = eqx.filter_vjp(fun, jnp.array([1.0, 2.0]))
    with pytest.raises(ValueError):
        eqx_vjpfun(cotangent)


def test_vjp_pullback_passes_through_jit():
    out, vjpfun = fj.filter_vjp(lambda x, s: jnp.sin(x) * s, jnp.array([0.1, 0.2]), 2.0)
    (g, g_s) = jax.jit(lambda f, ct: f(ct))(vjpfun, jnp.ones(2))
    np.testing.assert_allclose(g, 2 * jnp.cos(jnp.array([0.1, 0.2])), rtol=1e-6)
    assert g_s is None


# ---------------------------------------------------------------------------------------
# filter_jacfwd / filter_jacrev / filter_hessian


def jac_fn(tree, c):
    return {"a": jnp.sin(tree["w"]) * tree["n"] * c, "b": jnp.sum(tree["w"] * tree["v"])}


@pytest.mark.parametrize("which", ["fwd", "rev"])
def test_jacobians_match_jax_on_hand_partitioned_input(which):
    tree = {"w": jnp.array([0.1, 0.2, 0.3]), "v": jnp.array([1.0, 2.0, 3.0]), "n": 2, "f": jnp.sin}
    fj_jac = {"fwd": fj.filter_jacfwd, "rev": fj.filter_jacrev}[which]
    jax_jac = {"fwd": jax.jacfwd, "rev": jax.jacrev}[which]
    eqx_jac = {"fwd": eqx.filter_jacfwd, "rev": eqx.filter_jacrev}[which]
    got = fj_jac(jac_fn)(tree, 1.5)
    diff = {"w": tree["w"], "v": tree["v"], "n": None, "f": None}
    expected = jax_jac(lambda d: jac_fn({**tree, "w": d["w"], "v": d["v"]}, 1.5))(diff)
    assert_tree_allclose(got, expected)
    assert got["a"]["n"] is None and got["b"]["f"] is None
    assert_tree_allclose(got, eqx_jac(jac_fn)(tree, 1.5))


@pytest.mark.parametrize("jac", [fj.filter_jacfwd, fj.filter_jacrev])
def test_jacobians_has_aux(jac):
    def f(x, label):
        return x**2, {"label": label, "x": x}

    j, aux = jac(f, has_aux=True)(jnp.array([1.0, 2.0]), "lbl")
    np.testing.assert_allclose(j, jnp.diag(jnp.array([2.0, 4.0])))
    assert aux["label"] == "lbl"


def test_hessian_matches_jax_and_equinox():
    def f(tree):
        return jnp.sum(tree[0] ** 3 * tree[1]) + tree[2]

    tree = (jnp.array([1.0, 2.0]), jnp.array([0.5, 0.25]), 7)
    got = fj.filter_hessian(f)(tree)
    expected = jax.hessian(lambda d: f((d[0], d[1], 7)))((tree[0], tree[1], None))
    assert_tree_allclose(got, expected)
    assert_tree_allclose(got, eqx.filter_hessian(f)(tree))
    h, aux = fj.filter_hessian(lambda t: (f(t), "a"), has_aux=True)(tree)
    assert aux == "a"
    assert_tree_allclose(h, expected)


def test_jacrev_of_mlp_matches_hand_split():
    m = mlp()
    x = jnp.ones(4)
    got = fj.filter_jacrev(lambda model: model(x))(m)
    params, static = eqx.partition(m, eqx.is_inexact_array)
    expected = jax.jacrev(lambda p: eqx.combine(p, static)(x))(params)
    assert_tree_allclose(got, expected, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# filter_custom_jvp


def make_custom_jvp_call(record):
    @fj.filter_custom_jvp
    def call(x, y, *, fn):
        return fn(x, y)

    @call.def_jvp
    def call_jvp(primals, tangents, *, fn):
        x, y = primals
        tx, ty = tangents
        record.append((tx is None, ty is None))
        primal_out = call(x, y, fn=fn)
        tangent_out = 2 * tx if tx is not None else None
        if ty is not None:
            tangent_out = 3 * ty if tangent_out is None else tangent_out + 3 * ty
        return primal_out, tangent_out

    return call


def test_custom_jvp_seed_example():
    record = []
    call = make_custom_jvp_call(record)
    x, y = jnp.array(2.0), jnp.array(2.0)
    fn = lambda a, b: a + b  # noqa: E731
    g = fj.filter_grad(call)(x, y, fn=fn)
    np.testing.assert_allclose(g, 2.0)
    assert record[-1] == (False, True)
    np.testing.assert_allclose(call(x, y, fn=fn), 4.0)


def test_custom_jvp_matches_jax_custom_jvp():
    record = []
    call = make_custom_jvp_call(record)
    fn = lambda a, b: a * b  # noqa: E731

    @functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
    def ref(x, y, fn):
        return fn(x, y)

    @ref.defjvp
    def ref_jvp(fn, primals, tangents):
        x, y = primals
        tx, ty = tangents
        return ref(x, y, fn), 2 * tx + 3 * ty

    x, y = jnp.array([1.0, 2.0]), jnp.array([3.0, 4.0])
    tx, ty = jnp.array([1.0, 1.0]), jnp.array([0.5, 2.0])
    got = jax.jvp(lambda a, b: call(a, b, fn=fn), (x, y), (tx, ty))
    assert_tree_allclose(got, jax.jvp(lambda a, b: ref(a, b, fn), (x, y), (tx, ty)))
    assert record[-1] == (False, False)
    grads = fj.filter_grad(lambda xy: jnp.sum(call(xy[0], xy[1], fn=fn)))((x, y))
    assert_tree_allclose(grads, jax.grad(lambda xy: jnp.sum(ref(xy[0], xy[1], fn)))((x, y)))


def test_custom_jvp_non_float_args_get_none_tangents():
    seen = []

    @fj.filter_custom_jvp
    def f(x, n, label):
        return x * n

    @f.def_jvp
    def f_jvp(primals, tangents):
        x, n, label = primals
        seen.append(tangents)
        return f(x, n, label), tangents[0] * n * 10

    g = fj.filter_grad(lambda x: f(x, jnp.array(2), "lbl"))(jnp.array(1.0))
    np.testing.assert_allclose(g, 20.0)
    assert seen[-1][1] is None and seen[-1][2] is None


def test_custom_jvp_under_jit_vmap_and_grad_of_grad():
    @fj.filter_custom_jvp
    def cube(x, meta):
        return x**3

    @cube.def_jvp
    def cube_jvp(primals, tangents):
        x, meta = primals
        tx, _ = tangents
        return cube(x, meta), 3 * x**2 * tx

    xs = jnp.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(jax.jit(lambda v: cube(v, "m"))(xs), xs**3)
    np.testing.assert_allclose(
        jax.vmap(fj.filter_grad(lambda v: cube(v, "m")))(xs), 3 * xs**2, rtol=1e-6
    )
    second = jax.vmap(fj.filter_grad(fj.filter_grad(lambda v: cube(v, "m"))))(xs)
    np.testing.assert_allclose(second, 6 * xs, rtol=1e-6)
    jitted_grad = jax.jit(fj.filter_grad(lambda v: jnp.sum(cube(v, {"a": 1}))))
    np.testing.assert_allclose(jitted_grad(xs), 3 * xs**2, rtol=1e-6)


def test_custom_jvp_keyword_tangent_is_an_error():
    @fj.filter_custom_jvp
    def f(x, *, y):
        return x * y

    @f.def_jvp
    def f_jvp(primals, tangents, *, y):
        return f(*primals, y=y), tangents[0] * y

    with pytest.raises(ValueError, match="keyword argument"):
        jax.grad(lambda y: f(jnp.array(1.0), y=y))(jnp.array(2.0))
    # Differentiating only positionals is fine even with an array keyword argument.
    np.testing.assert_allclose(jax.grad(lambda x: f(x, y=jnp.array(2.0)))(1.0), 2.0)


def test_custom_jvp_wrong_rule_output_is_a_clear_error():
    @fj.filter_custom_jvp
    def f(x):
        return (x, x)

    @f.def_jvp
    def f_jvp(primals, tangents):
        return f(*primals), (tangents[0],)

    with pytest.raises(ValueError, match="structure of the output"):
        jax.jvp(lambda x: f(x), (1.0,), (1.0,))

    @fj.filter_custom_jvp
    def g(x):
        return x

    @g.def_jvp
    def g_jvp(primals, tangents):
        return g(*primals)

    with pytest.raises(ValueError, match="must return a pair"):
        jax.jvp(g, (1.0,), (1.0,))


def test_custom_jvp_none_output_tangent_is_zero():
    @fj.filter_custom_jvp
    def f(x):
        return x * 2, x * 3

    @f.def_jvp
    def f_jvp(primals, tangents):
        (x,), (tx,) = primals, tangents
        return f(x), (tx * 2, None)

    _, (t1, t2) = jax.jvp(f, (jnp.array(1.0),), (jnp.array(1.0),))
    assert t1 == 2.0 and t2 == 0.0


# ---------------------------------------------------------------------------------------
# filter_custom_vjp


def make_custom_vjp(log):
    @fj.filter_custom_vjp
    def f(vjp_arg, scale, name, *, power):
        return {"out": vjp_arg["w"] ** power * scale, "i": vjp_arg["i"], "name": name}

    @f.def_fwd
    def f_fwd(perturbed, vjp_arg, scale, name, *, power):
        log.append(("fwd", perturbed))
        out = f(vjp_arg, scale, name, power=power)
        return out, {"w": vjp_arg["w"], "power": power}

    @f.def_bwd
    def f_bwd(residuals, grad_obj, perturbed, vjp_arg, scale, name, *, power):
        log.append(("bwd", grad_obj, perturbed, name, scale))
        w = residuals["w"]
        assert residuals["power"] == power
        g = grad_obj["out"] * residuals["power"] * w ** (power - 1) * scale
        return {"w": g, "v": None, "i": None, "label": None}

    return f


def reference_custom_vjp():
    @jax.custom_vjp
    def f(w, scale):
        return w**3 * scale

    def fwd(w, scale):
        return f(w, scale), (w, scale)

    def bwd(res, g):
        w, scale = res
        return 3 * w**2 * scale * g, None

    f.defvjp(fwd, bwd)
    return f


def test_custom_vjp_matches_jax_custom_vjp_and_reports_perturbed():
    log = []
    f = make_custom_vjp(log)
    ref = reference_custom_vjp()
    vjp_arg = {
        "w": jnp.array([1.0, 2.0]),
        "v": jnp.array(5.0),
        "i": jnp.array([1, 2]),
        "label": "x",
    }
    scale = jnp.array(2.0)

    def loss(arg):
        return jnp.sum(f(arg, scale, "nm", power=3)["out"])

    grads = fj.filter_grad(loss)(vjp_arg)
    expected = jax.grad(lambda w: jnp.sum(ref(w, scale)))(vjp_arg["w"])
    np.testing.assert_allclose(grads["w"], expected)
    assert grads["i"] is None and grads["label"] is None
    # `v` is a float array the function does not use; its gradient is a zero
    np.testing.assert_allclose(grads["v"], 0.0)
    kind, perturbed = log[-2]
    assert kind == "fwd"
    assert perturbed == {"w": True, "v": True, "i": False, "label": False}
    kind, grad_obj, perturbed_bwd, name, scale_bwd = log[-1]
    assert kind == "bwd" and name == "nm" and perturbed_bwd == perturbed
    assert grad_obj["i"] is None and grad_obj["name"] is None
    np.testing.assert_allclose(scale_bwd, scale)


def test_custom_vjp_unperturbed_leaves_report_false():
    log = []
    f = make_custom_vjp(log)
    w, v = jnp.array([1.0, 2.0]), jnp.array(5.0)

    def loss(w_):
        return jnp.sum(
            f({"w": w_, "v": v, "i": jnp.array(1), "label": 1}, 1.0, "n", power=2)["out"]
        )

    np.testing.assert_allclose(jax.grad(loss)(w), 2 * w)
    assert log[-2][1] == {"w": True, "v": False, "i": False, "label": False}


def test_custom_vjp_primal_call_outputs_non_arrays():
    f = make_custom_vjp([])
    out = f({"w": jnp.array([2.0]), "v": 1.0, "i": jnp.array(3), "label": None}, 1.0, "n", power=2)
    assert out["name"] == "n"
    np.testing.assert_allclose(out["out"], 4.0)


def test_custom_vjp_under_jit_vmap_and_grad_of_grad():
    f = make_custom_vjp([])
    ws = jnp.array([[1.0, 2.0], [3.0, 4.0]])

    def loss(w):
        arg = {"w": w, "v": jnp.array(0.0), "i": jnp.array(0), "label": "l"}
        return jnp.sum(f(arg, 1.0, "n", power=3)["out"])

    per_row = jax.jit(jax.vmap(fj.filter_grad(loss)))(ws)
    np.testing.assert_allclose(per_row, 3 * ws**2, rtol=1e-6)
    second = fj.filter_grad(lambda w: jnp.sum(fj.filter_grad(loss)(w)))(ws[0])
    np.testing.assert_allclose(second, 6 * ws[0], rtol=1e-6)


def test_custom_vjp_args_are_not_differentiable():
    f = make_custom_vjp([])
    arg = {"w": jnp.array([1.0]), "v": 0.0, "i": 0, "label": 0}
    with pytest.raises(RuntimeError, match="Only the first argument"):
        jax.grad(lambda s: jnp.sum(f(arg, s, "n", power=2)["out"]))(jnp.array(2.0))


def test_custom_vjp_wrong_structures_are_clear_errors():
    @fj.filter_custom_vjp
    def f(x, y):
        return x["a"] * y

    @f.def_fwd
    def f_fwd(perturbed, x, y):
        return f(x, y), None

    @f.def_bwd
    def f_bwd(residuals, g, perturbed, x, y):
        return [g]  # wrong: should be {"a": ..., "n": None}

    with pytest.raises(ValueError, match="structure of `vjp_arg`"):
        jax.grad(lambda a: f({"a": a, "n": 1}, 2.0))(1.0)

    @f.def_bwd
    def f_bwd2(residuals, g, perturbed, x, y):
        return {"a": g, "n": g}  # gradient for an int leaf

    with pytest.raises(ValueError, match="must be `None`"):
        jax.grad(lambda a: f({"a": a, "n": 1}, 2.0))(1.0)

    @f.def_bwd
    def f_bwd3(residuals, g, perturbed, x, y):
        return None  # a None for the whole of vjp_arg: zero gradient

    np.testing.assert_allclose(jax.grad(lambda a: f({"a": a, "n": 1}, 2.0))(1.0), 0.0)

    @fj.filter_custom_vjp
    def h(x):
        return x

    @h.def_fwd
    def h_fwd(perturbed, x):
        return x

    @h.def_bwd
    def h_bwd(residuals, g, perturbed, x):
        return g

    with pytest.raises(ValueError, match="must return a pair"):
        jax.grad(h)(1.0)


def test_custom_vjp_requires_both_rules():
    @fj.filter_custom_vjp
    def f(x):
        return x

    with pytest.raises(RuntimeError, match="def_fwd"):
        f(1.0)


def test_custom_vjp_matches_equinox():
    def build(lib):
        @lib.filter_custom_vjp
        def f(arg, k):
            return jnp.sin(arg[0]) * arg[1] * k

        @f.def_fwd
        def f_fwd(perturbed, arg, k):
            return f(arg, k), (jnp.cos(arg[0]),)

        @f.def_bwd
        def f_bwd(res, g, perturbed, arg, k):
            (c,) = res
            return (g * c * arg[1] * k, g * jnp.sin(arg[0]) * k, None)

        return f

    arg = (jnp.array([0.1, 0.2]), jnp.array([1.0, 2.0]), "x")
    f_fj, f_eqx = build(fj), build(eqx)
    got = fj.filter_grad(lambda a: jnp.sum(f_fj(a, 2.0)))(arg)
    ref = eqx.filter_grad(lambda a: jnp.sum(f_eqx(a, 2.0)))(arg)
    assert_tree_allclose(got, ref)


def test_older_defjvp_and_defvjp_forms_materialise_zeros():
    @fj.filter_custom_jvp
    def f(x, y):
        return x * y

    def f_jvp(primals, tangents):
        (x, y), (tx, ty) = primals, tangents
        assert tx is not None and ty is not None  # zeros, not None
        return f(x, y), tx * y + x * ty

    f.defjvp(f_jvp)
    np.testing.assert_allclose(jax.grad(lambda x: f(x, jnp.array(3.0)))(2.0), 3.0)

    @fj.filter_custom_vjp
    def g(arg, k):
        return arg[0] * k, arg[1]

    def g_fwd(arg, k):
        return g(arg, k), None

    def g_bwd(residuals, grad_obj, arg, k):
        g0, g1 = grad_obj
        assert g1 is not None  # materialised
        return (g0 * k, g1)

    g.defvjp(g_fwd, g_bwd)
    grads = jax.grad(lambda a: g((a, jnp.array(1.0)), 4.0)[0])(2.0)
    np.testing.assert_allclose(grads, 4.0)


# ---------------------------------------------------------------------------------------
# filter_checkpoint


def _primitive_names(jaxpr) -> list[str]:
    names = []
    for eqn in jaxpr.eqns:
        names.append(eqn.primitive.name)
        for sub in jax.core.subjaxprs(eqn) if hasattr(jax.core, "subjaxprs") else []:
            names.extend(_primitive_names(sub))
    return names


def _checkpoint_eqns(jaxpr):
    return [e for e in jaxpr.eqns if e.primitive.name in ("checkpoint", "remat", "remat2")]


def test_checkpoint_same_values_and_grads_as_without():
    def f(tree, x):
        return jnp.sum(tree["act"](tree["w"] * x) ** 2) * tree["n"], tree["name"]

    ck = fj.filter_checkpoint(f)
    tree = {"w": jnp.array([0.1, 0.2]), "act": jnp.sin, "n": 3, "name": "nm"}
    x = jnp.array([1.0, 2.0])
    assert_tree_allclose(ck(tree, x), f(tree, x))
    g = fj.filter_grad(lambda t: ck(t, x)[0])(tree)
    e = fj.filter_grad(lambda t: f(t, x)[0])(tree)
    assert_tree_allclose(g, e)
    assert_tree_allclose(g, eqx.filter_grad(lambda t: eqx.filter_checkpoint(f)(t, x)[0])(tree))


def test_checkpoint_appears_in_jaxpr_with_policy():
    policy = jax.checkpoint_policies.nothing_saveable

    @fj.filter_checkpoint(policy=policy, prevent_cse=False)
    def f(x, act):
        return jnp.sum(act(act(x)))

    jaxpr = jax.make_jaxpr(lambda x: f(x, jnp.sin))(jnp.ones(3))
    (eqn,) = _checkpoint_eqns(jaxpr.jaxpr)
    assert eqn.params["policy"] is policy
    assert eqn.params["prevent_cse"] is False


def _saved_residual_count(fun, x) -> int:
    jaxpr = jax.make_jaxpr(lambda v: jax.linearize(fun, v)[1](v))(x)
    del jaxpr
    from jax._src.ad_checkpoint import saved_residuals

    return len(saved_residuals(fun, x))


def test_checkpoint_policy_changes_what_is_saved():
    def body(x, act):
        return jnp.sum(act(act(act(x))))

    x = jnp.ones(4)
    save_all = fj.filter_checkpoint(body, policy=jax.checkpoint_policies.everything_saveable)
    save_none = fj.filter_checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
    n_all = _saved_residual_count(lambda v: save_all(v, jnp.sin), x)
    n_none = _saved_residual_count(lambda v: save_none(v, jnp.sin), x)
    assert n_none < n_all
    # The gradient is the same either way.
    g1 = jax.grad(lambda v: save_all(v, jnp.sin))(x)
    g2 = jax.grad(lambda v: save_none(v, jnp.sin))(x)
    np.testing.assert_allclose(g1, g2, rtol=1e-6)


def test_checkpoint_decorator_forms_method_and_mlp(data):
    x, y = data

    @fj.filter_checkpoint
    def loss(model, x, y):
        """doc"""
        return mlp_loss(model, x, y)

    assert loss.__name__ == "loss" and loss.__doc__ == "doc"
    m = mlp()
    assert_tree_allclose(fj.filter_grad(loss)(m, x, y), eqx.filter_grad(mlp_loss)(m, x, y))

    class Holder:
        def __init__(self):
            self.k = 3.0

        @fj.filter_checkpoint
        def times(self, v):
            return v * self.k

    np.testing.assert_allclose(Holder().times(jnp.array(2.0)), 6.0)


def test_checkpoint_unhashable_static_is_a_clear_error():
    class Unhashable:
        __hash__ = None

    ck = fj.filter_checkpoint(lambda x, u: x)
    with pytest.raises(fj.UnhashableStaticError):
        ck(jnp.array(1.0), Unhashable())


# Non-array primals reach the rule as given, and the primal output keeps
# their type (as in Equinox).
def _custom_add(record):
    @fj.filter_custom_jvp
    def add(x, y=1.0, *, k=3):
        return x + k

    @add.def_jvp
    def add_jvp(primals, tangents, *, k=3):
        record.append((primals, tangents, k))
        return add(*primals, k=k), tangents[0]

    return add


def test_custom_jvp_python_float_primal_goes_through_untouched():
    record = []
    add = _custom_add(record)
    out, t_out = jax.jvp(lambda x: add(x), (2.0,), (3.0,))
    assert type(out) is float and out == 5.0
    assert t_out == 3.0
    ((primals, tangents, k),) = record
    assert type(primals[0]) is float and primals[0] == 2.0
    assert tangents[0] == 3.0 and k == 3


def test_custom_jvp_python_primals_with_keyword_arguments():
    record = []
    add = _custom_add(record)
    out, t_out = jax.jvp(lambda x: add(x, 2, k=4.0), (2.0,), (3.0,))
    assert type(out) is float and out == 6.0 and t_out == 3.0
    ((primals, tangents, k),) = record
    assert type(primals[0]) is float and type(primals[1]) is int and primals[1] == 2
    assert tangents[1] is None  # not an inexact value: symbolic zero
    assert type(k) is float and k == 4.0


def test_custom_jvp_two_python_float_primals_both_get_tangents():
    record = []
    add = _custom_add(record)
    out, t_out = jax.jvp(lambda x, y: add(x, y), (2.0, 1.0), (3.0, 1.0))
    assert type(out) is float and out == 5.0
    ((primals, tangents, _),) = record
    assert [type(p) for p in primals] == [float, float]
    assert tangents == (3.0, 1.0)


def test_custom_jvp_arrays_stay_arrays_and_match_equinox():
    record = []
    add = _custom_add(record)
    out, t_out = jax.jvp(lambda x: add(x), (jnp.array(2.0),), (jnp.array(3.0),))
    assert isinstance(out, jax.Array) and float(out) == 5.0
    assert isinstance(record[-1][0][0], jax.Array)

    @eqx.filter_custom_jvp
    def theirs(x, y=1.0, *, k=3):
        return x + k

    @theirs.def_jvp
    def theirs_jvp(primals, tangents, *, k=3):
        return theirs(*primals, k=k), tangents[0]

    for fun, primals, tangents in [
        (lambda x: (add(x), theirs(x)), (2.0,), (3.0,)),
        (lambda x: (add(x, 2, k=4.0), theirs(x, 2, k=4.0)), (2.0,), (3.0,)),
        (lambda x: (add(x), theirs(x)), (jnp.array(2.0),), (jnp.array(1.0),)),
    ]:
        (ours_out, theirs_out), (ours_t, theirs_t) = jax.jvp(fun, primals, tangents)
        assert type(ours_out) is type(theirs_out) and ours_out == theirs_out
        assert type(ours_t) is type(theirs_t) and ours_t == theirs_t


def test_custom_jvp_defjvps_is_not_implemented_as_in_equinox():
    f = fj.filter_custom_jvp(lambda x: x)
    with pytest.raises(NotImplementedError, match="def_jvp"):
        f.defjvps(lambda t, ans, x: t)
