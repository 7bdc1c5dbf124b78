"""filter_pure_callback under jit and vmap."""

from __future__ import annotations

import warnings

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


def _jax_accepts_vmap_method(method: str) -> bool:
    """Whether the running jax knows `method` (`sequential_unrolled` is newer than 0.4.38)."""

    def call(x):
        return jax.pure_callback(
            np.asarray, jax.ShapeDtypeStruct((), jnp.float32), x, vmap_method=method
        )

    try:
        jax.eval_shape(jax.vmap(call), jax.ShapeDtypeStruct((2,), jnp.float32))
    except ValueError:
        return False
    return True


_VMAP_METHODS = [
    m
    for m in ("sequential", "sequential_unrolled", "expand_dims", "broadcast_all")
    if _jax_accepts_vmap_method(m)
]


def test_vmap_methods_of_this_jax_are_all_tested():
    assert {"sequential", "expand_dims", "broadcast_all"} <= set(_VMAP_METHODS)


@pytest.mark.parametrize("method", _VMAP_METHODS)
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


def _outcome(thunk):
    try:
        return "returned", np.asarray(thunk())
    except Exception as err:  # the exception type is what is compared
        return "raised", type(err)


def test_vmap_without_method_does_what_jax_pure_callback_does():
    # jax >= 0.6 raises NotImplementedError; older releases fall back to a sequential loop
    # with a DeprecationWarning. filter_pure_callback passes no method of its own.
    struct = jax.ShapeDtypeStruct((), jnp.float32)

    def ours(x):
        return fj.filter_pure_callback(lambda x: x, x, result_shape_dtypes=struct)

    def theirs(x):
        return jax.pure_callback(lambda x: np.asarray(x, np.float32), struct, x)

    xs = jnp.arange(3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        mine = _outcome(lambda: jax.vmap(ours)(xs))
        reference = _outcome(lambda: jax.vmap(theirs)(xs))
    assert mine[0] == reference[0]
    if mine[0] == "raised":
        assert mine[1] is reference[1] is NotImplementedError
    else:
        np.testing.assert_array_equal(mine[1], reference[1])


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
