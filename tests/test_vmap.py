"""filter_vmap against jax.vmap on hand-partitioned arguments and against equinox."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import filterjax as fj


def _close(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)


def test_default_maps_arrays_broadcasts_rest():
    f = fj.filter_vmap(lambda x, y, s: (x * y, s))
    x = jnp.arange(3.0)
    out, s = f(x, 2.0, "tag")
    assert s == "tag"
    _close(out, jax.vmap(lambda x: x * 2.0)(x))
    # mixed PyTree arguments: the NumPy array is mapped too, the int broadcast
    tree = {"a": np.arange(6.0).reshape(3, 2), "n": 4}
    g = fj.filter_vmap(lambda t: t["a"].sum() * t["n"])
    _close(g(tree), jnp.arange(6.0).reshape(3, 2).sum(1) * 4)


def test_in_axes_prefix_and_dict_and_callables():
    x = jnp.arange(6.0).reshape(2, 3)
    y = jnp.ones(2)
    f = fj.filter_vmap(lambda a, b: a + b, in_axes=(1, None))
    _close(f(x, y), jax.vmap(lambda a, b: a + b, in_axes=(1, None))(x, y))
    g = fj.filter_vmap(lambda a, b: a + b, in_axes={"b": None})
    _close(g(x, jnp.ones(3)), x + 1)
    h = fj.filter_vmap(lambda t: t["p"] * t["q"], in_axes=({"p": fj.if_array(1), "q": None},))
    _close(h({"p": x, "q": jnp.arange(2.0)}), jax.vmap(lambda p: p * jnp.arange(2.0), 1)(x))
    with pytest.raises(ValueError, match="did not correspond"):
        fj.filter_vmap(lambda a: a, in_axes={"nope": 0})(x)


def test_out_axes_and_static_outputs():
    x = jnp.arange(12.0).reshape(3, 4)
    f = fj.filter_vmap(
        lambda a: {"m": a * 2, "s": a.sum(), "u": jnp.ones(2), "name": "n"},
        out_axes={"m": 1, "s": 0, "u": None, "name": None},
    )
    out = f(x)
    assert out["m"].shape == (4, 3) and out["s"].shape == (3,) and out["u"].shape == (2,)
    assert out["name"] == "n"
    _close(out["m"], (x * 2).T)
    # negative out axis
    g = fj.filter_vmap(lambda a: a[:, None] * jnp.ones(2), out_axes=-1)
    assert g(x).shape == (4, 2, 3)
    # a None out axis for something that depends on the batch is an error naming it
    bad = fj.filter_vmap(lambda a: {"k": a}, out_axes={"k": None})
    with pytest.raises(ValueError, match=r"out\['k'\]"):
        bad(x)
    # out of range out axis names the leaf
    with pytest.raises(ValueError, match=r"out\['k'\]"):
        fj.filter_vmap(lambda a: {"k": a}, out_axes={"k": 5})(x)


def test_non_array_outputs_same_object_for_batch():
    marker = object()
    out = fj.filter_vmap(lambda a: (a, marker))(jnp.arange(3))
    assert out[1] is marker


def test_ensemble_example_matches_equinox():
    key = jr.PRNGKey(0)
    keys = jr.split(key, 8)

    def make(k):
        return eqx.nn.MLP(2, 2, 2, 2, key=k)

    ours = fj.filter_vmap(make)(keys)
    theirs = eqx.filter_vmap(make)(keys)
    assert ours.layers[0].weight.shape == (8, 2, 2)
    assert ours.activation is theirs.activation
    _close(eqx.filter(ours, eqx.is_array), eqx.filter(theirs, eqx.is_array))

    evaluate = fj.filter_vmap(lambda m, x: m(x), in_axes=(fj.if_array(0), None))
    x = jr.normal(key, (2,))
    _close(
        evaluate(ours, x),
        eqx.filter_vmap(lambda m, x: m(x), in_axes=(eqx.if_array(0), None))(theirs, x),
    )
    assert evaluate(ours, x).shape == (8, 2)
    per = fj.filter_vmap(lambda m, x: m(x))
    xs = jr.normal(key, (8, 2))
    assert per(ours, xs).shape == (8, 2)
    _close(per(ours, xs), eqx.filter_vmap(lambda m, x: m(x))(theirs, xs))


def test_axis_name_and_axis_size():
    f = fj.filter_vmap(lambda x: x - jax.lax.psum(x, "i"), axis_name="i")
    x = jnp.arange(4.0)
    _close(f(x), x - x.sum())
    g = fj.filter_vmap(lambda s: jnp.ones(2) * s, axis_size=3)
    assert g(2.0).shape == (3, 2)
    with pytest.raises(ValueError, match="axis_size"):
        fj.filter_vmap(lambda s: jnp.ones(2) * s)(2.0)
    # nothing mapped and no axis_size: refused even when nothing is mapped out
    with pytest.raises(ValueError, match="axis_size"):
        fj.filter_vmap(lambda s: s + 1)(2)


def test_errors_name_the_leaves():
    f = fj.filter_vmap(lambda x, y: x)
    with pytest.raises(ValueError, match=r"args\[0\].*args\[1\]\['b'\]"):
        f(jnp.ones(3), {"b": jnp.ones(4)})
    with pytest.raises(ValueError, match=r"args\[0\].*out of range"):
        fj.filter_vmap(lambda x: x, in_axes=(2,))(jnp.ones(3))
    with pytest.raises(RuntimeError, match="keyword"):
        f(jnp.ones(3), y=jnp.ones(3))
    with pytest.raises(ValueError, match="prefix"):
        fj.filter_vmap(lambda x: x, in_axes=({"a": 0},))([jnp.ones(3)])


class _Scaler(eqx.Module):
    w: jax.Array

    @fj.filter_vmap
    def __call__(self, x):
        return self.w * x


def test_method_descriptor_and_wraps():
    def documented(x):
        """Docs."""
        return x

    f = fj.filter_vmap(documented)
    assert f.__name__ == "documented" and f.__doc__ == "Docs." and f.__wrapped__ is documented
    s = _Scaler(jnp.arange(3.0))
    _close(s(jnp.ones(3)), jnp.arange(3.0))


def test_nested_and_under_jit():
    inner = fj.filter_vmap(lambda a, b: a * b, in_axes=(0, None))
    outer = fj.filter_vmap(lambda a, b: inner(a, b), in_axes=(None, 0))
    a, b = jnp.arange(3.0), jnp.arange(4.0)
    _close(outer(a, b), b[:, None] * a[None, :])
    jitted = jax.jit(lambda a: fj.filter_vmap(lambda v: (v * 2, "s"))(a)[0])
    _close(jitted(a), a * 2)


def test_non_array_leaf_with_int_axis_is_a_clear_error():
    with pytest.raises(ValueError, match=r"args\[1\].*not an array"):
        fj.filter_vmap(lambda x, s: x, in_axes=(0, 0))(jnp.ones(3), "s")


# No mapped axis and no axis_size is a clear error, raised before JAX.
@pytest.mark.parametrize(
    ("kwargs", "args"),
    [
        ({}, (2.0, "label")),  # default if_array(0), no array arguments
        ({}, ()),  # no arguments at all
        ({"in_axes": None}, (jnp.arange(3.0),)),
        ({"in_axes": (None, None)}, (jnp.arange(3.0), jnp.ones(2))),
        ({"in_axes": {"y": None}}, (1.0, jnp.arange(3.0))),
        ({"in_axes": fj.if_array(0)}, ({"a": 1, "b": None},)),
    ],
)
def test_nothing_mapped_without_axis_size_is_a_value_error(kwargs, args):
    calls = []

    def f(*xs):
        calls.append(xs)
        return jnp.zeros(2)

    def g(x=None, y=None):
        calls.append((x, y))
        return jnp.zeros(2)

    fun = g if isinstance(kwargs.get("in_axes"), dict) else f
    with pytest.raises(ValueError, match=r"no argument has a mapped axis") as info:
        fj.filter_vmap(fun, **kwargs)(*args)
    message = str(info.value)
    assert "filter_vmap" in message and "axis_size=" in message and "in_axes" in message
    assert calls == []  # refused before tracing
    # The fixes the message names both work.
    out = fj.filter_vmap(fun, **kwargs, axis_size=4)(*args)
    assert out.shape == (4, 2)


def test_one_mapped_leaf_is_enough():
    f = fj.filter_vmap(lambda x, s: x * s, in_axes=(0, None))
    np.testing.assert_allclose(f(jnp.arange(3.0), 2.0), [0.0, 2.0, 4.0])
