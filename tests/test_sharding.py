"""filter_shard and filter_jit with sharded inputs, over 8 CPU devices."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from jax_features import HAS_AXIS_TYPES, make_mesh, mesh_context

import filterjax as fj

P = jax.sharding.PartitionSpec


@pytest.fixture(scope="module")
def mesh():
    assert len(jax.devices()) == 8, "tests/conftest.py sets 8 CPU devices"
    return make_mesh((8,), ("data",), "auto")


def test_single_device_moves_arrays_only():
    dev = jax.devices()[3]
    tree = {"w": jnp.ones(3), "np": np.ones(2), "act": jax.nn.relu, "n": 3}
    out = fj.filter_shard(tree, dev)
    assert out["w"].devices() == {dev} and out["np"].devices() == {dev}
    assert out["act"] is jax.nn.relu and out["n"] == 3
    assert fj.filter_shard("only static", dev) == "only static"


def test_named_sharding_and_prefix_tree(mesh):
    data = jax.sharding.NamedSharding(mesh, P("data"))
    replicated = jax.sharding.NamedSharding(mesh, P())
    tree = ({"x": jnp.arange(16.0), "tag": "t"}, (jnp.ones(3), "u"))
    out = fj.filter_shard(tree, (data, replicated))
    assert out[0]["x"].sharding == data and out[1][0].sharding == replicated
    assert out[0]["tag"] == "t" and out[1][1] == "u"
    np.testing.assert_allclose(out[0]["x"], jnp.arange(16.0))
    # matches equinox
    theirs = eqx.filter_shard(tree, (data, replicated))
    assert jax.tree.map(lambda a: a.sharding, eqx.filter(out, eqx.is_array)) == jax.tree.map(
        lambda a: a.sharding, eqx.filter(theirs, eqx.is_array)
    )


@pytest.mark.parametrize("axis_type", ["explicit", "auto"] if HAS_AXIS_TYPES else ["auto"])
def test_inside_filter_jit_constrains(axis_type):
    mesh = make_mesh((8,), ("data",), axis_type)
    data = jax.sharding.NamedSharding(mesh, P("data"))

    @fj.filter_jit
    def f(x, tag):
        y = fj.filter_shard({"y": x * 2, "tag": tag}, data)
        return y

    with mesh_context(mesh):  # explicit axes need the mesh in context under jit
        out = f(jnp.arange(16.0), "t")
    assert out["tag"] == "t"
    assert out["y"].sharding.is_equivalent_to(data, 1)
    with mesh_context(mesh):
        text = jax.jit(lambda x: fj.filter_shard(x * 2, data)).lower(jnp.arange(16.0)).as_text()
    assert "sharding" in text


def test_explicit_mesh_outside_a_trace():
    mesh = jax.make_mesh((8,), ("data",))  # JAX's default: explicit axes
    data = jax.sharding.NamedSharding(mesh, P("data"))
    out = fj.filter_shard({"x": jnp.arange(8.0), "n": 1}, data)
    assert out["x"].sharding == data and out["n"] == 1


def test_filter_jit_keeps_input_shardings(mesh):
    data = jax.sharding.NamedSharding(mesh, P("data"))
    model = eqx.nn.MLP(4, 2, 8, 1, key=jr.PRNGKey(0))
    replicated = jax.sharding.NamedSharding(mesh, P())
    model = fj.filter_shard(model, replicated)
    x = fj.filter_shard(jnp.ones((16, 4)), data)

    @fj.filter_jit
    def f(m, x):
        return jax.vmap(m)(x), m

    y, m2 = f(model, x)
    assert y.sharding.is_equivalent_to(data, 2)
    assert m2.layers[0].weight.sharding.is_equivalent_to(replicated, 2)
    np.testing.assert_allclose(y, jax.vmap(model)(jnp.ones((16, 4))), rtol=1e-6)
