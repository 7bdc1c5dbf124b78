"""filter_make_jaxpr and filter_eval_shape."""

from __future__ import annotations

import functools
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import filterjax as fj


def test_make_jaxpr_splits_dynamic_and_static_outputs():
    def f(x, n, cfg, *, scale):
        return {"y": jnp.sin(x) * n * scale, "name": cfg["name"], "n": n}

    x = jnp.ones(3)
    scale = np.float32(2.0)
    jaxpr, shapes, statics = fj.filter_make_jaxpr(f)(x, 2, {"name": "a"}, scale=scale)
    expected = jax.make_jaxpr(lambda x, s: jnp.sin(x) * 2 * s)(x, scale)
    assert str(jaxpr) == str(expected)
    assert shapes == {"y": jax.ShapeDtypeStruct((3,), jnp.float32), "name": None, "n": None}
    assert statics == {"y": None, "name": "a", "n": 2}
    assert isinstance(jaxpr, jax.extend.core.ClosedJaxpr)


def _without_addresses(text: str) -> str:
    return re.sub(r"0x[0-9a-f]+", "0x…", text)


def test_make_jaxpr_traces_shape_dtype_structs_and_matches_equinox():
    model = eqx.nn.MLP(2, 2, 4, 1, key=jr.PRNGKey(0))
    struct = jax.ShapeDtypeStruct((2,), jnp.float32)
    ours = fj.filter_make_jaxpr(lambda m, x: (m(x), m.activation))(model, struct)
    theirs = eqx.filter_make_jaxpr(lambda m, x: (m(x), m.activation))(model, struct)
    # Printed jaxprs name custom_jvp rules by object address, which differs between traces.
    assert _without_addresses(str(ours[0])) == _without_addresses(str(theirs[0]))
    assert ours[1] == theirs[1]
    assert ours[2][1] is model.activation
    # Python builtins are static: no invars for them
    jaxpr, _, _ = fj.filter_make_jaxpr(lambda a, b: a * b)(3.0, struct)
    assert len(jaxpr.jaxpr.invars) == 1


def test_eval_shape_arbitrary_objects():
    model = eqx.nn.Linear(3, 2, key=jr.PRNGKey(0))

    def f(m, x, tag):
        return {"y": m(x), "tag": tag, "act": jax.nn.relu}

    out = fj.filter_eval_shape(f, model, jnp.ones(3), object)
    assert out["y"] == jax.ShapeDtypeStruct((2,), jnp.float32)
    assert out["tag"] is object and out["act"] is jax.nn.relu
    ref = eqx.filter_eval_shape(f, model, jnp.ones(3), object)
    assert out == ref
    # ShapeDtypeStruct inputs, kwargs, a partial holding arrays, and a model returned
    part = functools.partial(lambda w, x, *, k: (w @ x) * k, jnp.ones((4, 3)))
    assert fj.filter_eval_shape(part, jax.ShapeDtypeStruct((3,), jnp.float32), k=2) == (
        jax.ShapeDtypeStruct((4,), jnp.float32)
    )
    made = fj.filter_eval_shape(lambda k: eqx.nn.Linear(3, 2, key=k), jr.PRNGKey(1))
    assert made.weight == jax.ShapeDtypeStruct((2, 3), jnp.float32)
    assert made.in_features == 3


def test_eval_shape_computes_nothing():
    calls = []

    def f(x):
        calls.append(type(x))
        return x * 2

    fj.filter_eval_shape(f, jnp.ones(2))
    assert len(calls) == 1 and issubclass(calls[0], jax.core.Tracer)
