"""filter_pmap over 8 CPU devices, against jax.pmap on hand-split args and equinox."""

from __future__ import annotations

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import filterjax as fj

N = 8


def _close(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)


def test_eight_devices():
    assert jax.local_device_count() == N


def test_mixed_pytree_matches_hand_split_pmap_and_equinox():
    tree = {"a": jnp.arange(N * 3.0).reshape(N, 3), "b": np.ones((N, 2)), "name": "x", "k": 2}

    def f(t, scale):
        return {"out": t["a"].sum() * t["k"] + t["b"] * scale, "name": t["name"] * 2}

    ours = fj.filter_pmap(f, axis_name="i")(tree, 3.0)
    hand = jax.pmap(lambda a, b: a.sum() * 2 + b * 3.0)(tree["a"], tree["b"])
    assert ours["name"] == "xx"
    _close(ours["out"], hand)
    theirs = eqx.filter_pmap(f)(tree, 3.0)
    assert theirs["name"] == ours["name"]
    _close(ours["out"], theirs["out"])
    assert ours["out"].shape == (N, 2)


def test_compiles_once_per_static_key():
    traces = []

    @fj.filter_pmap
    def f(x, mode):
        traces.append(mode)
        return x * 2 if mode == "double" else x

    x = jnp.arange(N * 1.0)
    for _ in range(3):
        _close(f(x, "double"), x * 2)
    assert traces == ["double"]
    _close(f(x, "same"), x)
    _close(f(x + 1, "double"), (x + 1) * 2)
    assert traces == ["double", "same"]


def test_in_axes_out_axes_axis_name_and_size():
    x = jnp.arange(N * 2.0).reshape(2, N)
    f = fj.filter_pmap(
        lambda a, b: {"m": a + b, "s": jax.lax.psum(a, "i"), "t": "tag"},
        in_axes=(1, None),
        out_axes={"m": 1, "s": None, "t": None},
        axis_name="i",
    )
    out = f(x, jnp.ones(2))
    assert out["m"].shape == (2, N) and out["s"].shape == (2,) and out["t"] == "tag"
    _close(out["m"], x + 1)
    _close(out["s"], x.sum(1))
    # dict in_axes naming an argument
    g = fj.filter_pmap(lambda a, b: a * b, in_axes={"b": None})
    _close(g(jnp.arange(N * 1.0), jnp.float32(2)), jnp.arange(N * 1.0) * 2)
    # nothing mapped but axis_size
    h = fj.filter_pmap(lambda s: jnp.ones(2) * s, axis_size=N)
    assert h(2.0).shape == (N, 2)
    # out axis beyond the first groups: rank-5 output with the mapped axis last
    k = fj.filter_pmap(lambda a: {"v": jnp.ones((1, 1, 1, 1, 1)) * a}, out_axes={"v": 5})
    assert k(jnp.arange(N * 1.0))["v"].shape == (1, 1, 1, 1, 1, N)


def test_model_fun_with_arrays_and_method():
    model = eqx.nn.MLP(3, 2, 8, 1, key=jr.PRNGKey(0))
    xs = jr.normal(jr.PRNGKey(1), (N, 3))
    out = fj.filter_pmap(model)(xs)  # the model's arrays are broadcast
    _close(out, jax.vmap(model)(xs))

    class Net(eqx.Module):
        lin: eqx.nn.Linear

        @fj.filter_pmap
        def __call__(self, x):
            return self.lin(x)

    net = Net(eqx.nn.Linear(3, 2, key=jr.PRNGKey(2)))
    stacked = eqx.filter_vmap(lambda k: Net(eqx.nn.Linear(3, 2, key=k)))(jr.split(jr.PRNGKey(3), N))
    _close(stacked(xs), jax.vmap(lambda n, x: n.lin(x))(stacked, xs))
    assert fj.filter_pmap.__name__ == "filter_pmap" and net is not None


def test_donation():
    x = jnp.arange(N * 4.0).reshape(N, 4)
    x = jax.pmap(lambda a: a)(x)  # already laid out over the devices
    f = fj.filter_pmap(lambda a, tag: a + 1, donate="all")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = f(x, "t")
    assert x.is_deleted()
    _close(y, jnp.arange(N * 4.0).reshape(N, 4) + 1)
    g = fj.filter_pmap(lambda a: a + 1, donate="none")
    z = g(y)
    assert not y.is_deleted() and not z.is_deleted()
    with pytest.raises(ValueError, match="donate"):
        fj.filter_pmap(lambda a: a, donate="all-except-first")


def test_batch_size_mismatch_names_leaves():
    f = fj.filter_pmap(lambda a, b: a)
    with pytest.raises(ValueError, match=r"args\[0\].*args\[1\]\['w'\]"):
        f(jnp.ones(N), {"w": jnp.ones(N - 1)})
    with pytest.raises(RuntimeError, match="keyword"):
        f(jnp.ones(N), b=1)


def test_programs_kept_per_static_signature_are_bounded(monkeypatch):

    monkeypatch.setattr(fj._caches, "MAX_SIGNATURES", 3)
    f = fj.filter_pmap(lambda x, k: x * k)
    x = jnp.ones((jax.local_device_count(), 2))
    for k in range(6):
        np.testing.assert_allclose(f(x, k), k * np.ones((jax.local_device_count(), 2)))
    assert len(f._state[0].table.programs) == 3


# No mapped axis and no axis_size is a clear error, raised before JAX.
@pytest.mark.parametrize(
    ("kwargs", "args"),
    [
        ({}, (2.0, "label")),  # default if_array(0), no array arguments
        ({}, ()),  # no arguments at all
        ({"in_axes": 0}, (2.0,)),  # an int axis maps arrays only
        ({"in_axes": None}, (jnp.arange(float(N)),)),
        ({"in_axes": (None, None)}, (jnp.arange(float(N)), jnp.ones(2))),
        ({"in_axes": {"y": None}}, (1.0, jnp.arange(float(N)))),
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
        fj.filter_pmap(fun, **kwargs)(*args)
    message = str(info.value)
    assert "filter_pmap" in message and "axis_size=" in message and "in_axes" in message
    assert calls == []  # refused before tracing
    # Passing axis_size, as the message says, works.
    assert fj.filter_pmap(fun, **kwargs, axis_size=N)(*args).shape == (N, 2)


def test_fun_arrays_alone_do_not_count_as_mapped():
    # Arrays held by `fun` (a bound method of a Module) are broadcast, never mapped.
    class Scale(eqx.Module):
        w: jax.Array

        def __call__(self, s):
            return self.w * s

    with pytest.raises(ValueError, match="no argument has a mapped axis"):
        fj.filter_pmap(Scale(jnp.ones(2)))(3.0)
    assert fj.filter_pmap(Scale(jnp.ones(2)))(jnp.arange(float(N))).shape == (N, 2)


# Ahead-of-time compilation, as filter_jit and Equinox's filter_pmap have it.


def test_lower_compile_and_call_with_the_same_arguments():
    traces = []

    def f(x, k, mode):
        traces.append(mode)
        return x * k if mode == "mul" else x + k

    wrapper = fj.filter_pmap(f, in_axes=(0, None, None))
    x = jnp.arange(float(N))
    lowered = wrapper.lower(x, 3.0, "mul")
    assert "stablehlo" in lowered.as_text() or "func" in lowered.as_text()
    compiled = lowered.compile()
    np.testing.assert_allclose(compiled(x, 3.0, "mul"), 3 * np.arange(N))
    np.testing.assert_allclose(compiled(2 * x, 3.0, "mul"), 6 * np.arange(N))
    assert traces == ["mul"]
    with pytest.raises(TypeError, match="lowered for arguments"):
        compiled(x, 3.0, "add")  # another static value
    with pytest.raises(TypeError, match="lowered for arguments"):
        compiled([x], 3.0, "mul")  # another structure
    # The function itself still works, sharing the traced program.
    np.testing.assert_allclose(wrapper(x, 3.0, "mul"), 3 * np.arange(N))


def test_lower_with_non_uniform_out_axes_and_static_outputs():
    def f(x):
        return {"mapped": x * 2, "shared": jnp.sum(x) * 0 + 1.0, "name": "out"}

    wrapper = fj.filter_pmap(f, out_axes={"mapped": 0, "shared": None, "name": None})
    x = jnp.arange(float(N))
    out = wrapper.lower(x).compile()(x)
    np.testing.assert_allclose(out["mapped"], 2 * np.arange(N))
    assert out["name"] == "out"
    np.testing.assert_allclose(out["shared"], 1.0)


def _inexact_at_zero(leaf):
    return 0 if eqx.is_inexact_array(leaf) else None


@pytest.mark.parametrize("transform", [fj.filter_pmap, fj.filter_vmap])
@pytest.mark.parametrize(
    ("args", "in_axes", "where", "shape", "axis"),
    [
        # Equinox's test_pmap.py::test_default: a 0-d array mapped at axis 0.
        ((jnp.array(3.0), jnp.ones(N)), _inexact_at_zero, r"args\[0\]", r"\(\)", 0),
        ((jnp.ones(N), {"w": jnp.ones(N)}), (0, {"w": 1}), r"args\[1\]\['w'\]", r"\(8,\)", 1),
        (({"x": [jnp.ones(N), jnp.float32(1.0)]},), 0, r"args\[0\]\['x'\]\[1\]", r"\(\)", 0),
    ],
)
def test_leaf_without_the_mapped_axis_is_a_value_error(
    transform, args, in_axes, where, shape, axis
):
    f = transform(lambda *a: a, in_axes=in_axes)
    pattern = rf"{where} along axis {axis}.*out of range for its shape {shape}"
    with pytest.raises(ValueError, match=pattern):
        f(*args)
    if transform is fj.filter_pmap:
        with pytest.raises(ValueError, match=pattern):
            f.lower(*args)
    # The same function still works on arguments that have the axis.
    good = tuple(jax.tree.map(lambda x: jnp.ones((N, N)), a) for a in args)
    assert jax.tree.structure(f(*good)) == jax.tree.structure(good)


def test_output_layout_is_planned_before_the_pmap_is_built():
    """Out axes beyond any default are planned by one abstract pass, then the pmap is
    built once: a call with the same shapes traces nothing more, new shapes plan again."""
    traces = []

    def f(a, tag):
        traces.append(tag)
        return {"deep": jnp.ones((1,) * 6) * a.sum(), "rank": a * 2, "tag": tag}

    g = fj.filter_pmap(f, out_axes={"deep": 6, "rank": -1, "tag": None})
    x = jnp.ones((8, 3))
    out = g(x, "t")
    assert out["deep"].shape == (1,) * 6 + (8,)
    assert out["rank"].shape == (3, 8)
    assert out["tag"] == "t"
    first = len(traces)
    assert first == 2  # the abstract pass, then the pmap's trace
    g(x + 1, "t")
    assert len(traces) == first
    out = g(jnp.ones((8, 2, 5)), "t")  # other ranks: the layout is planned again
    assert out["rank"].shape == (2, 5, 8)
    assert len(traces) == first + 2
    assert len(g._state[0].table.programs) == 2
