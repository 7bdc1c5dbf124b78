"""filter_closure_convert: make a function's closed-over JAX arrays part of its PyTree."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from . import _backend
from ._compile_utils import is_array_or_struct, output_parts, split_output

__all__ = ["filter_closure_convert"]

_T = TypeVar("_T", bound=Callable)


def _struct_of(leaf: Any) -> jax.ShapeDtypeStruct:
    # Weak types are dropped: a function converted at a weakly-typed example accepts
    # strongly-typed arrays of the same dtype, and vice versa.
    return jax.ShapeDtypeStruct(jnp.shape(leaf), jnp.result_type(leaf))


class _Conversion:
    """Everything about a closure-converted function except its consts.

    Hashed by identity: each conversion is its own static part.
    """

    __slots__ = ("fn", "jaxpr", "in_key", "in_structs", "out_key", "out_structs")

    def __init__(self, fn, jaxpr, in_key, in_structs, out_key, out_structs):
        self.fn = fn
        self.jaxpr = jaxpr
        self.in_key = in_key
        self.in_structs = in_structs
        self.out_key = out_key
        self.out_structs = out_structs


class _ClosureConverted:
    """The callable returned by `filter_closure_convert`; its PyTree children are `consts`."""

    __slots__ = ("consts", "_conversion")

    def __init__(self, consts: list, conversion: _Conversion):
        self.consts = consts
        self._conversion = conversion

    @property
    def in_struct(self) -> tuple:
        """`(args, kwargs)` of the example, with `jax.ShapeDtypeStruct` for each array."""
        c = self._conversion
        return _backend.rebuild(c.in_key, c.in_structs)

    @property
    def out_struct(self) -> Any:
        """The output, with `jax.ShapeDtypeStruct` for each array."""
        c = self._conversion
        if c.out_key is None:
            args, kwargs = self.in_struct
            return jax.eval_shape(lambda *a: c.fn(*a, **kwargs), *args)
        return _backend.rebuild(c.out_key, c.out_structs)

    def _check_inputs(self, args: tuple, kwargs: dict) -> list:
        c = self._conversion
        leaves, key = _backend.flatten_split((args, kwargs), is_array_or_struct, hashed=False)
        same = key == c.in_key
        if same:
            for leaf, struct in zip(leaves, c.in_structs, strict=True):
                if jnp.shape(leaf) != struct.shape or jnp.result_type(leaf) != struct.dtype:
                    same = False
                    break
        if not same:
            expected = _backend.rebuild(c.in_key, c.in_structs)
            got = _backend.rebuild(key, [_struct_of(leaf) for leaf in leaves])
            raise ValueError(
                "A closure-converted function must be called with arguments like the "
                "example ones it was converted with: same PyTree structure, same "
                "non-array leaves, and arrays of the same shape and dtype.\n"
                f"Converted with: {expected}\nCalled with: {got}"
            )
        return leaves

    def __call__(self, *args, **kwargs):
        leaves = self._check_inputs(args, kwargs)
        c = self._conversion
        if c.jaxpr is None:
            return c.fn(*args, **kwargs)
        out_leaves = jax.core.eval_jaxpr(c.jaxpr, self.consts, *leaves)
        return _backend.rebuild(c.out_key, out_leaves)

    def __repr__(self) -> str:
        name = getattr(self._conversion.fn, "__name__", self._conversion.fn)
        return f"<filter_closure_convert({name!r}) with {len(self.consts)} consts>"


jtu.register_pytree_node(
    _ClosureConverted,
    lambda f: ((f.consts,), f._conversion),
    lambda conversion, children: _ClosureConverted(children[0], conversion),
)


def filter_closure_convert(fn: _T, *args, **kwargs) -> _T:
    """As `jax.closure_convert`, but for functions taking and returning arbitrary PyTrees.
    Every closed-over JAX array (of any dtype, not only floating-point) is hoisted into
    the returned function's PyTree.

    Use it to expose closed-over tracers explicitly before crossing an API boundary such
    as `jax.grad`, `jax.custom_vjp`, or the rule of a custom primitive.

    **Arguments:**

    - `fn`: the function, to be called as `fn(*args, **kwargs)`.
    - `*args`, `**kwargs`: example arguments. `fn` is traced at them with every JAX/NumPy
        array (or `jax.ShapeDtypeStruct`) replaced by a tracer; all other leaves,
        including Python `bool`/`int`/`float`/`complex`, are passed as they are.

    **Returns:**

    A function called like `fn` (with arguments like the examples: the same non-array
    leaves, arrays of the same shapes and dtypes). It is a PyTree whose leaves are the
    closed-over arrays of `fn`, available as its `.consts` attribute, so transforms see
    them and can differentiate with respect to them.

    ```python
    >>> import jax
    >>> @jax.grad
    ... def f(x, y):
    ...     z = x + y
    ...     g = lambda a: z + a  # closes over z
    ...     g2 = filter_closure_convert(g, 1)
    ...     assert [id(b) for b in g2.consts] == [id(z)]
    ...     return z
    >>> f(1.0, 1.0)
    Array(1., dtype=float32, weak_type=True)

    ```
    """
    in_leaves, in_key = _backend.flatten_split((args, kwargs), is_array_or_struct, hashed=False)
    in_structs = [_struct_of(leaf) for leaf in in_leaves]
    if isinstance(fn, types.FunctionType) and fn.__closure__ is None:
        # Nothing is closed over, so there can be no closed-over tracer: skip tracing.
        conversion = _Conversion(fn, None, in_key, in_structs, None, None)
        return _ClosureConverted([], conversion)  # type: ignore[return-value]

    def flat_fn(*dynamic):
        call_args, call_kwargs = _backend.rebuild(in_key, dynamic)
        return split_output(fn(*call_args, **call_kwargs))

    closed_jaxpr, out = jax.make_jaxpr(flat_fn, return_shape=True)(*in_structs)
    out_key, out_structs = output_parts(out)
    conversion = _Conversion(fn, closed_jaxpr.jaxpr, in_key, in_structs, out_key, out_structs)
    return _ClosureConverted(list(closed_jaxpr.consts), conversion)  # type: ignore[return-value]
