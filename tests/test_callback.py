"""filter_pure_callback under jit and vmap."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import filterjax as fj


def _host(x, cfg, *, power):
    assert isinstance(x, (np.ndarray, jax.Array)) and cfg == {"name": "sq"}
    return {"y": np.asarray(x**power, np.float32), "name": cfg["name"]}


def _struct(shape=(3,)):
    return {"y": jax.ShapeDtypeStruct(shape, jnp.float32), "name": "sq"}


def test_arbitrary_objects_in_and_out_eager_and_jit():
    x = jnp.arange(3.0)
    out = fj.filter_pure_callback(_host, x, {"name": "sq"}, power=2, result_shape_dtypes=_struct())
    assert out["name"] == "sq"
    np.testing.assert_allclose(out["y"], x**2)

    @jax.jit
    def f(x):
        return fj.filter_pure_callback(
            _host, x, {"name": "sq"}, power=3, result_shape_dtypes=_struct()
        )["y"]

    np.testing.assert_allclose(f(x), x**3)


@pytest.mark.parametrize(
    "method", ["sequential", "sequential_unrolled", "expand_dims", "broadcast_all"]
)
def test_under_vmap_each_method(method):
    seen = []

    def host(x, k):
        seen.append(x.shape)
        return (x * k).astype(np.float32), "ok"

    def f(x):
        return fj.filter_pure_callback(
            host,
            x,
            2,
            result_shape_dtypes=(jax.ShapeDtypeStruct(x.shape, jnp.float32), "ok"),
            vmap_method=method,
        )

    xs = jnp.arange(6.0).reshape(3, 2)
    out, tag = fj.filter_vmap(f)(xs)
    assert tag == "ok"
    np.testing.assert_allclose(out, xs * 2)
    if method.startswith("sequential"):
        assert (2,) in seen
    else:
        assert (3, 2) in seen
    out2 = jax.jit(jax.vmap(lambda x: f(x)[0]))(xs)
    np.testing.assert_allclose(out2, xs * 2)


def test_vmap_without_method_raises():
    def f(x):
        return fj.filter_pure_callback(
            lambda x: x, x, result_shape_dtypes=jax.ShapeDtypeStruct((), jnp.float32)
        )

    with pytest.raises(NotImplementedError):
        jax.vmap(f)(jnp.arange(3.0))


def test_vectorized_is_mapped_to_vmap_method():
    def host(x):
        return np.asarray(x * 2, np.float32)

    def f(x):
        return fj.filter_pure_callback(
            host, x, result_shape_dtypes=jax.ShapeDtypeStruct((), jnp.float32), vectorized=True
        )

    with pytest.warns(DeprecationWarning, match="legacy_vectorized"):
        np.testing.assert_allclose(jax.vmap(f)(jnp.arange(3.0)), jnp.arange(3.0) * 2)
    with pytest.raises(ValueError, match="only one"):
        fj.filter_pure_callback(
            host,
            jnp.ones(()),
            result_shape_dtypes=jax.ShapeDtypeStruct((), jnp.float32),
            vectorized=False,
            vmap_method="sequential",
        )


def test_static_mismatch_is_reported():
    with pytest.raises(Exception, match="matching static"):
        fj.filter_pure_callback(
            lambda x: (x, "other"),
            jnp.ones(2),
            result_shape_dtypes=(jax.ShapeDtypeStruct((2,), jnp.float32), "expected"),
        ).__getitem__(0).block_until_ready()


@pytest.mark.single_backend
def test_sharding_argument_is_passed():
    dev = jax.devices()[0]

    @jax.jit
    def f(x):
        return fj.filter_pure_callback(
            lambda x: np.asarray(x + 1),
            x,
            result_shape_dtypes=jax.ShapeDtypeStruct((2,), jnp.float32),
            sharding=jax.sharding.SingleDeviceSharding(dev),
        )

    np.testing.assert_allclose(f(jnp.ones(2)), 2.0)
