"""filter_pure_callback: `jax.pure_callback` with arbitrary Python objects in and out."""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.tree_util as jtu

from . import _backend
from ._compile_utils import has_shape_and_dtype

__all__ = ["filter_pure_callback"]


def _always(_: Any) -> bool:
    return True


def _vmap_method_for(vmap_method: str | None, vectorized: bool | None) -> str | None:
    """Translate the `vectorized` flag JAX has since removed into a `vmap_method`."""
    if vectorized is None:
        return vmap_method
    if vmap_method is not None:
        raise ValueError(
            "filter_pure_callback: pass only one of `vmap_method` and `vectorized` "
            "(`vectorized` is deprecated)."
        )
    replacement = "legacy_vectorized" if vectorized else "sequential"
    warnings.warn(
        "filter_pure_callback(..., vectorized=...) is deprecated (JAX removed it from "
        f"jax.pure_callback); using vmap_method={replacement!r} instead.",
        DeprecationWarning,
        stacklevel=3,
    )
    return replacement


def _static_mismatch(expected: Any, returned: Any) -> bool:
    if expected is returned:
        return False
    try:
        return not bool(expected == returned)
    except Exception:  # e.g. an ambiguous truth value: not a plain static value
        return True


def filter_pure_callback(
    callback,
    *args,
    result_shape_dtypes,
    sharding=None,
    vmap_method=None,
    vectorized=None,
    **kwargs,
):
    """Calls a Python function inside a JIT region. As `jax.pure_callback` but accepts
    arbitrary Python objects as inputs and outputs. (Not just JAXable types.)

    Note that unlike `jax.pure_callback`, the `result_shape_dtypes` argument must be
    passed as a keyword argument.

    **Arguments:**

    - `callback`: The Python function to call.
    - `*args`, `**kwargs`: The function will be called as `callback(*args, **kwargs)`.
        These may be arbitrary Python objects: arrays are passed through JAX (as host
        CPU arrays), everything else is handed to `callback` as it is.
    - `result_shape_dtypes`: A PyTree specifying the output of `callback`. It should have
        a `jax.ShapeDtypeStruct` in place of any JAX arrays; its other leaves must equal
        the non-array leaves `callback` returns. Keyword-only.
    - `sharding`: optional sharding that specifies the device from which the callback
        should be invoked.
    - `vmap_method`: how the callback transforms under `vmap()`, as described in the
        documentation for `jax.pure_callback` (`"sequential"`, `"sequential_unrolled"`,
        `"expand_dims"`, `"broadcast_all"`, `"legacy_vectorized"`).
    - `vectorized`: deprecated (JAX no longer accepts it): `True` means
        `vmap_method="legacy_vectorized"` and `False` means `vmap_method="sequential"`.

    **Returns:**

    The result of `callback(*args, **kwargs)`, valid for use under JIT.

    !!! example

        ```python
        >>> import jax, jax.numpy as jnp, numpy as np
        >>> def host_norm(x, how):
        ...     return {"norm": np.linalg.norm(x, ord=how).astype(np.float32), "how": how}
        >>> @jax.jit
        ... def f(x):
        ...     struct = {"norm": jax.ShapeDtypeStruct((), jnp.float32), "how": 1}
        ...     return filter_pure_callback(host_norm, x, 1, result_shape_dtypes=struct)["norm"]
        >>> f(jnp.array([3.0, -4.0]))
        Array(7., dtype=float32)

        ```
    """
    vmap_method = _vmap_method_for(vmap_method, vectorized)
    dynamic, key = _backend.flatten_split((args, kwargs), hashed=False)
    expected, expected_key = _backend.flatten_split(result_shape_dtypes, _always, hashed=False)
    struct_index = [i for i, leaf in enumerate(expected) if has_shape_and_dtype(leaf)]
    structs = [expected[i] for i in struct_index]
    struct_set = set(struct_index)

    def host_side(*leaves):
        call_args, call_kwargs = _backend.rebuild(key, list(leaves))
        out = callback(*call_args, **call_kwargs)
        returned, returned_key = _backend.flatten_split(out, _always, hashed=False)
        if returned_key != expected_key:
            raise ValueError(
                "filter_pure_callback: the callback returned a PyTree of structure "
                f"{jtu.tree_structure(out)}, but result_shape_dtypes has structure "
                f"{jtu.tree_structure(result_shape_dtypes)}."
            )
        for i, (want, got) in enumerate(zip(expected, returned, strict=True)):
            if i not in struct_set and _static_mismatch(want, got):
                where = jtu.keystr(jtu.tree_flatten_with_path(out)[0][i][0])
                raise ValueError(
                    f"filter_pure_callback: the callback returned {got!r:.80} at "
                    f"out{where}, but result_shape_dtypes has the static (non-array) "
                    f"value {want!r:.80} there. Callback did not return matching static "
                    "elements."
                )
        return [returned[i] for i in struct_index]

    options: dict[str, Any] = {}
    if sharding is not None:
        options["sharding"] = sharding
    if vmap_method is not None:
        options["vmap_method"] = vmap_method
    out_dynamic = jax.pure_callback(host_side, structs, *dynamic, **options)
    out = list(expected)
    for i, value in zip(struct_index, out_dynamic, strict=True):
        out[i] = value
    return _backend.rebuild(expected_key, out)
