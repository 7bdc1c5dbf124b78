"""Automatic differentiation on arbitrary PyTrees.

Every transform here splits its differentiated argument once per call with the core's
`partition`: floating-point (and complex) array leaves go to JAX as a flat list, every
other leaf stays in the `StaticKey` and is put back around the traced values by `rebuild`.
Gradients come back as `rebuild(key, grads, [None] * key.num_static)`, which is the
original PyTree with `None` at every leaf that could not be differentiated.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal, ParamSpec, TypeVar, overload

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax.custom_derivatives import SymbolicZero
from jax.interpreters.ad import JVPTracer

from . import _backend
from ._compat import typeof
from ._compile_utils import OutputSpec, join_output, output_parts, split_output
from ._wrapper import NO_FUNCTION, Wrapper, copy_metadata

__all__ = [
    "filter_grad",
    "filter_value_and_grad",
    "filter_jvp",
    "filter_vjp",
    "filter_jacfwd",
    "filter_jacrev",
    "filter_hessian",
    "filter_custom_jvp",
    "filter_custom_vjp",
    "filter_checkpoint",
]


def _is_none(x: Any) -> bool:
    return x is None


_inexact_by_dtype: dict = {}


def _is_inexact_leaf(leaf: Any) -> bool:
    """`is_inexact_array`, with the dtype test remembered per dtype (it is the slow part)."""
    if not _backend.is_array_fast(leaf):
        return False
    dtype = leaf.dtype
    known = _inexact_by_dtype.get(dtype)
    if known is None:
        known = _inexact_by_dtype[dtype] = bool(jnp.issubdtype(dtype, jnp.inexact))
    return known


def _as_array(x: Any) -> Any:
    # Inside custom rules JAX may hand back a concrete Python scalar (a `float` subclass)
    # where an array was passed in; make it an array again so it stays a dynamic leaf.
    return x if _backend.is_array_fast(x) else jnp.asarray(x)


def _is_inexact_arraylike(x: Any) -> bool:
    """What JAX can differentiate: an inexact array, or a Python float/complex."""
    if _is_inexact_leaf(x) or isinstance(x, float | complex):
        return True
    to_array = getattr(x, "__jax_array__", None)
    return callable(to_array) and _is_inexact_leaf(to_array())


def _copy_metadata(wrapper: Any, fun: Callable) -> None:
    copy_metadata(wrapper, fun)
    wrapper.__wrapped__ = fun


# ---------------------------------------------------------------------------------------
# filter_grad, filter_value_and_grad


_NO_POSITIONAL = (
    "Functions wrapped with `filterjax.filter_grad` / `filter_value_and_grad` need at "
    "least one positional argument: the first positional argument is the one "
    "differentiated."
)
_FIRST_BY_KEYWORD = (
    "Functions wrapped with `filterjax.filter_grad` / `filter_value_and_grad` must be "
    "given their first argument by position, not by keyword: it is the one differentiated."
)


def _differentiate_leaves(diff_leaves: list, key, fun: Callable, rest: tuple, kwargs: dict):
    return fun(_backend.rebuild(key, diff_leaves), *rest, **kwargs)


class _ValueAndGradWrapper(Wrapper):
    """The callable returned by `filter_value_and_grad`. A PyTree laid out as Equinox's:
    children `fun`, `has_aux` and the keyword arguments of `jax.value_and_grad`."""

    __slots__ = ("_fun", "_has_aux", "_gradkwargs", "__dict__", "__weakref__")
    _transform = "filter_value_and_grad"
    _child_names = ("_fun", "_has_aux", "_gradkwargs")
    _fun: Callable
    _has_aux: bool
    _gradkwargs: dict
    _value_and_grad: Callable | None = None  # made on first call

    def __call__(self, /, *args, **kwargs):
        if not args:
            raise TypeError(_FIRST_BY_KEYWORD if kwargs else _NO_POSITIONAL)
        value_and_grad = self._value_and_grad
        if value_and_grad is None:
            value_and_grad = self._value_and_grad = jax.value_and_grad(
                _differentiate_leaves, argnums=0, has_aux=self._has_aux, **self._gradkwargs
            )
        diff_leaves, key = _backend.flatten_split(args[0], _is_inexact_leaf, hashed=False)
        value, grads = value_and_grad(diff_leaves, key, self._fun, args[1:], kwargs)
        return value, _backend.rebuild(key, grads, [None] * key.num_static)


class _GradWrapper(Wrapper):
    """The callable returned by `filter_grad`. A PyTree laid out as Equinox's: children
    the `filter_value_and_grad` wrapper it calls, and `has_aux`."""

    __slots__ = ("_fun_value_and_grad", "_has_aux", "__dict__", "__weakref__")
    _transform = "filter_grad"
    _child_names = ("_fun_value_and_grad", "_has_aux")
    _fun_value_and_grad: _ValueAndGradWrapper
    _has_aux: bool

    def __call__(self, /, *args, **kwargs):
        value, grads = self._fun_value_and_grad(*args, **kwargs)
        if self._has_aux:
            return grads, value[1]
        return grads

    def _wrapped(self) -> Any:
        return self._fun_value_and_grad._fun


def _check_gradkwargs(gradkwargs: dict) -> None:
    if "argnums" in gradkwargs:
        raise ValueError(
            "`argnums` is not accepted: filter_grad differentiates the first argument. To "
            "differentiate several objects, pass them together as a tuple in the first "
            "argument."
        )


_P = ParamSpec("_P")
_T = TypeVar("_T")
_A = TypeVar("_A")


@overload
def filter_value_and_grad(
    *, has_aux: Literal[False] = False, **gradkwargs: Any
) -> Callable[[Callable[_P, _T]], Callable[_P, tuple[_T, Any]]]: ...


@overload
def filter_value_and_grad(
    *, has_aux: Literal[True], **gradkwargs: Any
) -> Callable[[Callable[_P, tuple[_T, _A]]], Callable[_P, tuple[tuple[_T, _A], Any]]]: ...


@overload
def filter_value_and_grad(
    fun: Callable[_P, _T], *, has_aux: Literal[False] = False, **gradkwargs: Any
) -> Callable[_P, tuple[_T, Any]]: ...


@overload
def filter_value_and_grad(
    fun: Callable[_P, tuple[_T, _A]], *, has_aux: Literal[True], **gradkwargs: Any
) -> Callable[_P, tuple[tuple[_T, _A], Any]]: ...


def filter_value_and_grad(fun=NO_FUNCTION, *, has_aux: bool = False, **gradkwargs: Any) -> Any:
    """Creates a function that evaluates both `fun` and the gradient of `fun`.

    The gradient is taken with respect to every floating-point (or complex) JAX/NumPy
    array in the first argument, which may be any PyTree. Every other leaf of it (integer
    arrays, Python numbers, functions, strings, ...) gets `None` as its gradient. The
    other arguments are not differentiated.

    **Arguments:**

    - `fun`: a pure function to differentiate. Its first output (or its only output) must
        be a real scalar.
    - `has_aux`: if `True` then `fun` should return a pair; the first element is
        differentiated and the second is auxiliary data, returned alongside.

    **Returns:**

    A function with the same arguments as `fun`. It returns `(value, gradient)`, or
    `((value, aux), gradient)` if `has_aux=True`. The gradient has the structure of the
    first argument, with `None` on every leaf that is not differentiable.

    Usable as `@filter_value_and_grad` or `@filter_value_and_grad(has_aux=True)`.

    ```python
    >>> import jax.numpy as jnp
    >>> @filter_value_and_grad
    ... def loss(params, scale):
    ...     w, steps, act = params
    ...     return scale * act(w).sum()
    >>> value, grads = loss((jnp.array([1.0, 2.0]), 3, jnp.square), 2.0)
    >>> value, grads[0], grads[1:]
    (Array(10., dtype=float32), Array([4., 8.], dtype=float32), (None, None))

    ```
    """
    if fun is NO_FUNCTION:
        return functools.partial(filter_value_and_grad, has_aux=has_aux, **gradkwargs)
    _check_gradkwargs(gradkwargs)
    return _ValueAndGradWrapper(fun, has_aux, gradkwargs)


@overload
def filter_grad(
    *, has_aux: Literal[False] = False, **gradkwargs: Any
) -> Callable[[Callable[_P, Any]], Callable[_P, Any]]: ...


@overload
def filter_grad(
    *, has_aux: Literal[True], **gradkwargs: Any
) -> Callable[[Callable[_P, tuple[Any, _A]]], Callable[_P, tuple[Any, _A]]]: ...


@overload
def filter_grad(
    fun: Callable[_P, Any], *, has_aux: Literal[False] = False, **gradkwargs: Any
) -> Callable[_P, Any]: ...


@overload
def filter_grad(
    fun: Callable[_P, tuple[Any, _A]], *, has_aux: Literal[True], **gradkwargs: Any
) -> Callable[_P, tuple[Any, _A]]: ...


def filter_grad(fun=NO_FUNCTION, *, has_aux: bool = False, **gradkwargs: Any) -> Any:
    """Creates a function that computes the gradient of `fun`.

    The gradient is taken with respect to every floating-point (or complex) JAX/NumPy
    array in the first argument, which may be any PyTree. Every other leaf of it gets
    `None` as its gradient. The other arguments are not differentiated.

    **Arguments:**

    - `fun`: a pure function to differentiate. Its first output (or its only output) must
        be a real scalar.
    - `has_aux`: if `True` then `fun` should return a pair; the first element is
        differentiated and the second is auxiliary data, returned alongside.

    **Returns:**

    A function with the same arguments as `fun`, returning the gradient with respect to
    its first argument (`None` on every non-differentiable leaf), or the pair
    `(gradient, aux)` if `has_aux=True`.

    To differentiate with respect to several objects, pass them together as a tuple in
    the first argument. `filterjax.apply_updates` adds such a gradient (skipping the
    `None`s) to a model.

    ```python
    >>> import jax.numpy as jnp
    >>> @filter_grad
    ... def f(x__y):
    ...     x, y = x__y
    ...     return (x * y["w"]).sum()
    >>> f((jnp.array([1.0, 2.0]), {"w": jnp.array([3.0, 4.0]), "n": jnp.array(1)}))
    (Array([3., 4.], dtype=float32), {'n': None, 'w': Array([1., 2.], dtype=float32)})

    ```
    """
    if fun is NO_FUNCTION:
        return functools.partial(filter_grad, has_aux=has_aux, **gradkwargs)
    _check_gradkwargs(gradkwargs)
    return _GradWrapper(_ValueAndGradWrapper(fun, has_aux, gradkwargs), has_aux)


# ---------------------------------------------------------------------------------------
# filter_jvp


def _path_of(tree: Any, index: int, is_leaf=None) -> str:
    paths = jtu.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    return jtu.keystr(paths[index][0])


def _describe(x: Any) -> str:
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"{type(x).__name__} of dtype {x.dtype} and shape {tuple(x.shape)}"
    return f"{type(x).__name__} {x!r:.60}"


def filter_jvp(fn: Callable, primals: Sequence, tangents: Sequence, **kwargs) -> tuple:
    """Like `jax.jvp`, but the primals and the output may be arbitrary PyTrees.

    An "inexact arraylike" below is a floating-point or complex JAX/NumPy array, or a
    Python `float` or `complex`: the types JAX can differentiate.

    **Arguments:**

    - `fn`: the function to differentiate, called as `fn(*primals, **kwargs)`. Its
        arguments and its output may be any Python objects.
    - `primals`: a sequence, the positional arguments at which `fn` is evaluated.
    - `tangents`: a PyTree with the structure of `primals`. Each leaf is an inexact
        arraylike, or `None` for a symbolic zero tangent. `None` is required for every
        primal that is not an inexact arraylike; a `None` may also stand for a whole
        subtree of `primals`.
    - `**kwargs`: keyword arguments for `fn`. They are not differentiated.

    **Returns:**

    A pair `(primals_out, tangents_out)`: `primals_out = fn(*primals, **kwargs)` and
    `tangents_out`, of the same structure, holds the Jacobian-vector product, with `None`
    on every leaf whose tangent is symbolically zero (not differentiable, or independent
    of every input with a non-`None` tangent).

    No `has_aux` is needed: the output may hold anything, and non-differentiable parts of
    it simply get `None` tangents.

    ```python
    >>> import jax.numpy as jnp
    >>> def f(x, y, name):
    ...     return {"out": x * y, "const": y, "name": name}
    >>> out, t_out = filter_jvp(f, (jnp.array(2.0), jnp.array(3.0), "f"),
    ...                         (jnp.array(1.0), None, None))
    >>> t_out
    {'const': None, 'name': None, 'out': Array(3., dtype=float32, weak_type=True)}

    ```
    """
    primals = tuple(primals)
    tangent_def: Any  # jaxlib ships no stub for PyTreeDef
    tangent_leaves, tangent_def = jtu.tree_flatten(tuple(tangents), is_leaf=_is_none)
    try:
        primal_parts = tangent_def.flatten_up_to(primals)
    except (ValueError, TypeError) as err:
        raise ValueError(
            "filter_jvp: `tangents` must have the same PyTree structure as `primals` (a "
            f"`None` tangent may stand for a whole subtree). Got primals with structure "
            f"{jtu.tree_structure(primals)} and tangents with structure {tangent_def}."
        ) from err
    perturbed = [i for i, t in enumerate(tangent_leaves) if t is not None]
    for i in perturbed:
        if not _is_inexact_arraylike(primal_parts[i]):
            path = _path_of(tuple(tangents), i, _is_none)
            raise TypeError(
                f"filter_jvp: the primal at primals{path} is a {_describe(primal_parts[i])}, "
                "which is not differentiable (not a floating-point/complex array or "
                "Python float/complex), so its tangent must be `None`; got "
                f"{_describe(tangent_leaves[i])}."
            )
        if not _is_inexact_arraylike(tangent_leaves[i]):
            path = _path_of(tuple(tangents), i, _is_none)
            raise TypeError(
                f"filter_jvp: the tangent at tangents{path} must be a floating-point/complex "
                f"array or Python float/complex, or `None`; got {_describe(tangent_leaves[i])}."
            )
    if not perturbed:
        out = fn(*primals, **kwargs)
        return out, jtu.tree_map(lambda _: None, out)

    def perturbed_fn(*values):
        parts = list(primal_parts)
        for i, value in zip(perturbed, values, strict=True):
            parts[i] = value
        out = fn(*tangent_def.unflatten(parts), **kwargs)
        trace = values[0]._trace
        out_leaves, out_def = jtu.tree_flatten(out)
        # Only outputs carried by this JVP trace have a (possibly) non-zero tangent;
        # everything else goes around `jax.jvp` untouched, in its output treedef.
        dependent = [type(x) is JVPTracer and x._trace is trace for x in out_leaves]
        around = [None if d else x for x, d in zip(out_leaves, dependent, strict=True)]
        spec = OutputSpec((out_def, around, dependent))
        return {spec: [x for x, d in zip(out_leaves, dependent, strict=True) if d]}

    out, tangents = jax.jvp(
        perturbed_fn,
        [primal_parts[i] for i in perturbed],
        [tangent_leaves[i] for i in perturbed],
    )
    (out_def, around, dependent), dependent_out = output_parts(out)
    _, dependent_tangents = output_parts(tangents)
    out_leaves = list(around)
    tangents_out = [None] * len(out_leaves)
    values = iter(zip(dependent_out, dependent_tangents, strict=True))
    for i, d in enumerate(dependent):
        if d:
            value, tangent = next(values)
            out_leaves[i] = value
            if _is_inexact_leaf(value):
                tangents_out[i] = tangent
    return out_def.unflatten(out_leaves), out_def.unflatten(tangents_out)


# ---------------------------------------------------------------------------------------
# filter_vjp


class _VjpSpec:
    """What a filter_vjp pullback needs besides JAX's: input/output keys. Identity-hashed."""

    __slots__ = ("in_key", "out_key", "out_def", "diff_out_def")

    def __init__(self, in_key, out_key, out_def, diff_out_def):
        self.in_key = in_key
        self.out_key = out_key
        self.out_def = out_def
        self.diff_out_def = diff_out_def


class _FilterVjpFn:
    """The pullback returned by `filter_vjp`. A PyTree holding JAX's pullback."""

    __slots__ = ("_jax_vjp", "_spec")

    def __init__(self, jax_vjp: Callable, spec: _VjpSpec):
        self._jax_vjp = jax_vjp
        self._spec = spec

    def __call__(self, cotangent: Any) -> tuple:
        spec = self._spec
        ct_leaves, ct_def = jtu.tree_flatten(cotangent)
        if ct_def != spec.diff_out_def:
            ct_leaves = self._leaves_from_full_cotangent(cotangent, ct_def)
        (grads,) = self._jax_vjp(ct_leaves)
        return _backend.rebuild(spec.in_key, grads, [None] * spec.in_key.num_static)

    def _leaves_from_full_cotangent(self, cotangent: Any, ct_def) -> list:
        # Also accept a cotangent for every output leaf where every leaf is an array (e.g.
        # zeros for integer outputs): keep the ones at floating-point positions. A
        # cotangent on a non-array output (a Python number, a string) is an error, as
        # in Equinox: it would be dropped silently.
        spec = self._spec
        if ct_def == spec.out_def:
            leaves = jtu.tree_leaves(cotangent)
            statics = iter(spec.out_key.statics)
            for index, differentiable in enumerate(spec.out_key.mask):
                if not differentiable and not _backend.is_array_fast(next(statics)):
                    raise ValueError(
                        f"filter_vjp: the primal output at out{_path_of(cotangent, index)}: it is "
                        "not an array, so it is not differentiated and its cotangent must be "
                        f"`None`; got {_describe(leaves[index])}."
                    )
            return [leaf for leaf, m in zip(leaves, spec.out_key.mask, strict=True) if m]
        raise ValueError(
            "filter_vjp: the cotangent must have the structure of the primal output with "
            "`None` on every leaf that is not a floating-point array.\n"
            f"Expected structure: {spec.diff_out_def}\nGot: {ct_def}"
        )


jtu.register_pytree_node(
    _FilterVjpFn, lambda f: ((f._jax_vjp,), f._spec), lambda spec, c: _FilterVjpFn(c[0], spec)
)


def filter_vjp(fun: Callable, *primals, has_aux: bool = False):
    """Like `jax.vjp`, but the primals and the output may be arbitrary PyTrees.

    **Arguments:**

    - `fun`: the function to differentiate, called as `fun(*primals)`. May return any
        PyTree.
    - `*primals`: the arguments at which `fun` is evaluated and differentiated; any
        PyTrees. Their floating-point array leaves are differentiated.
    - `has_aux`: if `True`, `fun` returns a pair `(output, aux)` and only `output` is
        differentiated.

    **Returns:**

    `(primals_out, vjpfun)`, or `(primals_out, vjpfun, aux)` if `has_aux=True`.
    `vjpfun(cotangent)` takes a cotangent with the structure of `primals_out`, holding
    arrays at its floating-point array leaves and `None` on every other leaf, and
    returns a tuple with one cotangent per primal: arrays on floating-point array
    leaves, `None` on every other leaf.

    ```python
    >>> import jax.numpy as jnp
    >>> out, vjpfun = filter_vjp(lambda x, n: (x * n, n), jnp.array([1.0, 2.0]), 3)
    >>> vjpfun((jnp.array([1.0, 1.0]), None))
    (Array([3., 3.], dtype=float32), None)

    ```
    """
    diff_leaves, in_key = _backend.flatten_split(primals, _is_inexact_leaf, hashed=False)

    def diff_fun(leaves):
        out = fun(*_backend.rebuild(in_key, leaves))
        if has_aux:
            out, aux = out
        else:
            aux = None
        # JAX differentiates the floating-point arrays. The output's structure goes
        # around it in the treedef of the auxiliary output, and its other leaves (arrays
        # of other dtypes among them) as auxiliary values.
        ((spec, out_leaves),) = split_output(out, predicate=_is_inexact_leaf).items()
        return out_leaves, ({spec: ()}, spec.key.statics, aux)

    diff_out, jax_vjp, (carried, out_statics, aux) = jax.vjp(diff_fun, diff_leaves, has_aux=True)
    out_key, _ = output_parts(carried)
    out = _backend.rebuild(out_key, diff_out, out_statics)
    diff_tree = _backend.rebuild(out_key, diff_out, [None] * out_key.num_static)
    spec = _VjpSpec(in_key, out_key, jtu.tree_structure(out), jtu.tree_structure(diff_tree))
    vjpfun = _FilterVjpFn(jax_vjp, spec)
    if has_aux:
        return out, vjpfun, aux
    return out, vjpfun


# ---------------------------------------------------------------------------------------
# filter_jacfwd, filter_jacrev, filter_hessian


class _Jacobian(Wrapper):
    """The callable returned by `filter_jacfwd` / `filter_jacrev`. A PyTree laid out as
    Equinox's: children `fun`, `has_aux` and whether it is reverse mode."""

    __slots__ = ("fun", "has_aux", "rev", "__dict__", "__weakref__")
    _child_names = ("fun", "has_aux", "rev")
    fun: Callable
    has_aux: bool
    rev: bool

    @property
    def _transform(self) -> str:  # type: ignore[override]
        return "filter_jacrev" if self.rev else "filter_jacfwd"

    def __call__(self, x, /, *args, **kwargs):
        diff_leaves, key = _backend.flatten_split(x, _is_inexact_leaf, hashed=False)
        diff_x = _backend.rebuild(key, diff_leaves, [None] * key.num_static)
        fun, has_aux = self.fun, self.has_aux

        def diff_fun(_diff_x):
            out = fun(_backend.rebuild(key, jtu.tree_leaves(_diff_x)), *args, **kwargs)
            if not has_aux:
                return out, None
            out, aux = out
            # JAX's jacobians only carry arrays as aux; the rest goes around them.
            return out, split_output(aux)

        jacobian = jax.jacrev if self.rev else jax.jacfwd
        jac, aux = jacobian(diff_fun, has_aux=True)(diff_x)
        if has_aux:
            return jac, join_output(aux)
        return jac


def filter_jacfwd(fun: Callable, has_aux: bool = False) -> Callable:
    """Computes the Jacobian of `fun` with forward-mode AD. Inputs and outputs may be
    arbitrary PyTrees.

    **Arguments:**

    - `fun`: the function to differentiate, with respect to the floating-point array
        leaves of its first argument.
    - `has_aux`: if `True`, `fun` returns a pair `(output, aux)` and only `output` is
        differentiated.

    **Returns:**

    A function with the same arguments as `fun`, returning the Jacobian (or the pair
    `(jacobian, aux)` if `has_aux=True`). The Jacobian has, for each leaf of the output,
    the structure of the first argument with `None` on its non-differentiable leaves.

    The filtering applies to the input only: the outputs of `fun` must be JAX arrays.

    ```python
    >>> import jax.numpy as jnp
    >>> jac = filter_jacfwd(lambda x: x["w"] * x["n"])({"w": jnp.array([1.0, 2.0]), "n": 3})
    >>> jac["w"], jac["n"]
    (Array([[3., 0.],
           [0., 3.]], dtype=float32), None)

    ```
    """
    return _Jacobian(fun, has_aux, False)


def filter_jacrev(fun: Callable, has_aux: bool = False) -> Callable:
    """Computes the Jacobian of `fun` with reverse-mode AD. Inputs and outputs may be
    arbitrary PyTrees.

    **Arguments:**

    - `fun`: the function to differentiate, with respect to the floating-point array
        leaves of its first argument.
    - `has_aux`: if `True`, `fun` returns a pair `(output, aux)` and only `output` is
        differentiated.

    **Returns:**

    A function with the same arguments as `fun`, returning the Jacobian (or the pair
    `(jacobian, aux)` if `has_aux=True`). The Jacobian has, for each leaf of the output,
    the structure of the first argument with `None` on its non-differentiable leaves.

    The filtering applies to the input only: the outputs of `fun` must be JAX arrays.

    ```python
    >>> import jax.numpy as jnp
    >>> jac = filter_jacrev(lambda x: x[0] ** 2)((jnp.array([1.0, 2.0]), "label"))
    >>> jac
    (Array([[2., 0.],
           [0., 4.]], dtype=float32), None)

    ```
    """
    return _Jacobian(fun, has_aux, True)


def filter_hessian(fun: Callable, has_aux: bool = False) -> Callable:
    """Computes the Hessian of `fun` (forward-over-reverse). Inputs and outputs may be
    arbitrary PyTrees.

    **Arguments:**

    - `fun`: the function to differentiate twice, with respect to the floating-point
        array leaves of its first argument.
    - `has_aux`: if `True`, `fun` returns a pair `(output, aux)` and only `output` is
        differentiated.

    **Returns:**

    A function with the same arguments as `fun`, returning the Hessian (or the pair
    `(hessian, aux)` if `has_aux=True`).

    The filtering applies to the input only: the outputs of `fun` must be JAX arrays.

    ```python
    >>> import jax.numpy as jnp
    >>> filter_hessian(lambda x, p: (x ** p).sum())(jnp.array([1.0, 2.0]), 3)
    Array([[ 6.,  0.],
           [ 0., 12.]], dtype=float32)

    ```
    """
    return filter_jacfwd(filter_jacrev(fun, has_aux=has_aux), has_aux=has_aux)


# ---------------------------------------------------------------------------------------
# filter_custom_jvp


def _tangent_aval(x: Any):
    aval = typeof(x)
    return aval.to_tangent_aval() if hasattr(aval, "to_tangent_aval") else aval


def _materialise_zero(primal: Any, tangent: Any) -> Any:
    if tangent is None and _is_inexact_leaf(primal):
        return jnp.zeros_like(primal)
    return tangent


def _none_to_symbolic_zero(tangent: Any, primal: Any) -> Any:
    if tangent is None:
        return SymbolicZero(_tangent_aval(primal))
    return tangent


def _as_output_tangents(t_out: Any, out: Any, where: str) -> Any:
    """Replace `None` in a rule's output tangents by symbolic zeros, checking structure."""
    try:
        return jtu.tree_map(_none_to_symbolic_zero, t_out, out, is_leaf=_is_none)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"{where}: the tangent/cotangent returned must have the structure of the output "
            f"(with `None` allowed for zeros).\nOutput structure: {jtu.tree_structure(out)}"
            f"\nReturned structure: {jtu.tree_structure(t_out, is_leaf=_is_none)}"
        ) from err


class filter_custom_jvp:
    """Filtered version of `jax.custom_jvp`.

    Works like `jax.custom_jvp`, but there is no `nondiff_argnums`: the arguments (any
    PyTrees) are split automatically. Every JAX/NumPy array leaf may carry a tangent;
    everything else is held static. In the JVP rule, every tangent that is a symbolic
    zero (non-floating-point leaves, Python objects, and arrays that happen not to be
    differentiated) arrives as `None`.

    Keyword arguments are supported and are never differentiated: a keyword argument
    with a non-zero tangent is an error. The outputs must be JAX arrays; the rule may
    return `None` for an output tangent to mean zero.

    **Arguments:**

    - `fn`: the function, called as `fn(*args, **kwargs)`.

    **Returns:**

    A callable like `fn`. Register its rule with `.def_jvp(fn_jvp)`, where
    `fn_jvp(primals, tangents, **kwargs)` receives the positional arguments and their
    tangents as tuples and returns `(out, tangent_out)`.

    ```python
    >>> import jax.numpy as jnp
    >>> @filter_custom_jvp
    ... def call(x, y, *, fn):
    ...     return fn(x, y)
    >>> @call.def_jvp
    ... def call_jvp(primals, tangents, *, fn):
    ...     x, y = primals
    ...     tx, ty = tangents
    ...     assert ty is None  # y is not differentiated below
    ...     return call(x, y, fn=fn), 2 * tx
    >>> filter_grad(call)(jnp.array(2.0), jnp.array(2.0), fn=lambda a, b: a + b)
    Array(2., dtype=float32, weak_type=True)

    ```
    """

    __slots__ = ("fn", "_fn_jvp", "_custom", "__dict__", "__weakref__")

    def __init__(self, fn: Callable):
        self.fn = fn
        _copy_metadata(self, fn)
        self._fn_jvp: Callable | None = None

        def call_primal(key, dynamic):
            args, kwargs = _backend.rebuild(key, dynamic)
            return fn(*args, **kwargs)

        self._custom = jax.custom_jvp(call_primal, nondiff_argnums=(0,))

    def def_jvp(self, fn_jvp: Callable) -> Callable:
        """Registers the JVP rule `fn_jvp(primals, tangents, **kwargs) -> (out, t_out)`."""
        self._fn_jvp = fn_jvp
        name = getattr(self.fn, "__name__", "fn")

        def rule(key, primals, tangents):
            (dynamic,), (t_dynamic,) = primals, tangents
            t_leaves = [
                None if type(t) is SymbolicZero or not _is_inexact_arraylike(p) else t
                for p, t in zip(dynamic, t_dynamic, strict=True)
            ]
            t_args, t_kwargs = _backend.rebuild(key, t_leaves, [None] * key.num_static)
            if jtu.tree_leaves(t_kwargs):
                raise ValueError(
                    f"filter_custom_jvp({name}): a keyword argument received a non-zero "
                    "tangent. Keyword arguments are never differentiated; pass anything "
                    "that should be differentiated positionally."
                )
            # The primals as JAX gives them: a Python float stays a float (as in Equinox).
            args, kwargs = _backend.rebuild(key, list(dynamic))
            result = fn_jvp(args, t_args, **kwargs)
            if not (isinstance(result, tuple | list) and len(result) == 2):
                raise ValueError(
                    f"filter_custom_jvp({name}): the JVP rule must return a pair "
                    f"(out, tangent_out); got {type(result).__name__}."
                )
            out, t_out = result
            return out, _as_output_tangents(t_out, out, f"filter_custom_jvp({name})")

        self._custom.defjvp(rule, symbolic_zeros=True)
        return fn_jvp

    def defjvp(self, fn_jvp: Callable) -> Callable:
        """Older form of `def_jvp` (kept for Equinox compatibility): floating-point arrays
        always receive an array tangent (zeros rather than `None`)."""

        def with_zeros(primals, tangents, **kwargs):
            tangents = jtu.tree_map(_materialise_zero, primals, tangents)
            return fn_jvp(primals, tangents, **kwargs)

        self.def_jvp(with_zeros)
        return fn_jvp

    def defjvps(self, *args: Any, **kwargs: Any) -> None:
        """Not supported (as in Equinox): register one rule with `def_jvp`."""
        raise NotImplementedError(
            "`filter_custom_jvp.defjvps` is not implemented; register the rule for all "
            "arguments at once with `def_jvp`."
        )

    def __call__(self, /, *args, **kwargs):
        dynamic, key = _backend.flatten_split((args, kwargs), hashed=False)
        return self._custom(key, dynamic)


# ---------------------------------------------------------------------------------------
# filter_custom_vjp


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _not_differentiable(message: str, x: Any) -> Any:
    return x


@_not_differentiable.defjvp
def _not_differentiable_jvp(message, primals, tangents):
    raise RuntimeError(message)


class _VjpResiduals:
    """Residuals of a filter_custom_vjp forward pass (a PyTree: arrays are children)."""

    __slots__ = ("res_leaves", "res_key", "vjp_values", "arg_values", "perturbed")

    def __init__(self, res_leaves, res_key, vjp_values, arg_values, perturbed):
        self.res_leaves = res_leaves
        self.res_key = res_key
        self.vjp_values = vjp_values
        self.arg_values = arg_values
        self.perturbed = perturbed


jtu.register_pytree_node(
    _VjpResiduals,
    lambda r: ((r.res_leaves, r.vjp_values, r.arg_values), (r.res_key, r.perturbed)),
    lambda aux, c: _VjpResiduals(c[0], aux[0], c[1], c[2], aux[1]),
)


def _split_by_mask(leaves: list, mask: tuple) -> tuple[list, list]:
    yes = [leaf for leaf, m in zip(leaves, mask, strict=True) if m]
    no = [leaf for leaf, m in zip(leaves, mask, strict=True) if not m]
    return yes, no


def _merge_by_mask(yes: Sequence, no: Sequence, mask: tuple) -> list:
    yes_iter, no_iter = iter(yes), iter(no)
    return [next(yes_iter) if m else next(no_iter) for m in mask]


class filter_custom_vjp:
    """As `jax.custom_vjp`, but on arbitrary PyTrees and with a simpler interface.

    ```
    @filter_custom_vjp
    def fn(vjp_arg, *args, **kwargs): ...       # any Python objects in and out

    @fn.def_fwd
    def fn_fwd(perturbed, vjp_arg, *args, **kwargs):
        ...
        return out, residuals                   # residuals: any PyTree

    @fn.def_bwd
    def fn_bwd(residuals, grad_obj, perturbed, vjp_arg, *args, **kwargs):
        ...
        return grad_vjp_arg
    ```

    - Only the first argument, `vjp_arg`, is differentiated. Arrays in `args`/`kwargs`
        must not be: differentiating with respect to them raises an error. (Pack
        everything that needs a gradient into `vjp_arg`, e.g. as a tuple.)
    - `perturbed` has the structure of `vjp_arg`, with `True` on each leaf being
        differentiated and `False` elsewhere (always `False` on leaves that are not
        floating-point arrays).
    - `grad_obj` has the structure of `out`, with `None` on leaves that have no
        cotangent (non-floating-point leaves, or leaves not differentiated).
    - `grad_vjp_arg` must have the structure of `vjp_arg`, with an array or `None` (zero)
        on floating-point array leaves and `None` on every other leaf.
    - All forward inputs are available again on the backward pass.

    **Arguments:**

    - `fn`: the function, called as `fn(vjp_arg, *args, **kwargs)`.

    **Returns:**

    A callable like `fn`, whose forward and backward passes are registered with
    `.def_fwd` and `.def_bwd`.

    ```python
    >>> import jax.numpy as jnp
    >>> @filter_custom_vjp
    ... def scale(x, factor):
    ...     return x * factor
    >>> @scale.def_fwd
    ... def scale_fwd(perturbed, x, factor):
    ...     return scale(x, factor), None
    >>> @scale.def_bwd
    ... def scale_bwd(residuals, grad_out, perturbed, x, factor):
    ...     return 10 * grad_out  # deliberately not the true derivative
    >>> filter_grad(lambda x: scale(x, 2.0).sum())(jnp.array([1.0, 2.0]))
    Array([10., 10.], dtype=float32)

    ```
    """

    __slots__ = (
        "fn",
        "fn_fwd",
        "fn_bwd",
        "_custom",
        "_name",
        "_args_message",
        "__dict__",
        "__weakref__",
    )

    def __init__(self, fn: Callable):
        self.fn = fn
        _copy_metadata(self, fn)
        self.fn_fwd: Any = None  # set by def_fwd
        self.fn_bwd: Any = None  # set by def_bwd
        self._custom: Any = None
        name = getattr(fn, "__name__", "fn")
        self._name = name
        self._args_message = (
            f"filter_custom_vjp({name}): an array in `*args`/`**kwargs` was differentiated. "
            "Only the first argument (`vjp_arg`) of a filter_custom_vjp function can be "
            "differentiated; pack everything that needs a gradient into it (e.g. as a tuple)."
        )

    def def_fwd(self, fn_fwd: Callable) -> Callable:
        """Registers `fn_fwd(perturbed, vjp_arg, *args, **kwargs) -> (out, residuals)`."""
        self.fn_fwd = fn_fwd
        if self.fn_bwd is not None:
            self._define()
        return fn_fwd

    def def_bwd(self, fn_bwd: Callable) -> Callable:
        """Registers `fn_bwd(residuals, grad_obj, perturbed, vjp_arg, *args, **kwargs)`."""
        self.fn_bwd = fn_bwd
        if self.fn_fwd is not None:
            self._define()
        return fn_bwd

    def defvjp(self, fn_fwd: Callable, fn_bwd: Callable) -> None:
        """Older form of `def_fwd` + `def_bwd` (kept for Equinox compatibility):
        `fn_fwd(vjp_arg, *args, **kwargs)` and
        `fn_bwd(residuals, grad_obj, vjp_arg, *args, **kwargs)`, without `perturbed`, and
        with zeros rather than `None` in `grad_obj` for floating-point outputs."""

        def fwd(perturbed, vjp_arg, *args, **kwargs):
            out, residuals = fn_fwd(vjp_arg, *args, **kwargs)
            return out, (out, residuals)

        def bwd(residuals, grad_obj, perturbed, vjp_arg, *args, **kwargs):
            out, residuals = residuals
            grad_obj = jtu.tree_map(_materialise_zero, out, grad_obj)
            return fn_bwd(residuals, grad_obj, vjp_arg, *args, **kwargs)

        self.def_fwd(fwd)
        self.def_bwd(bwd)

    def _define(self) -> None:
        fn, name = self.fn, self._name

        def primal(vjp_key, diff_mask, args_key, diff, nondiff, arg_arrays):
            vjp_arg = _backend.rebuild(vjp_key, _merge_by_mask(diff, nondiff, diff_mask))
            args, kwargs = _backend.rebuild(args_key, arg_arrays)
            return split_output(fn(vjp_arg, *args, **kwargs))

        def forward(vjp_key, diff_mask, args_key, diff, nondiff, arg_arrays):
            diff_values = [_as_array(p.value) for p in diff]
            nondiff_values = [_as_array(p.value) for p in nondiff]
            arg_values = [_as_array(p.value) for p in arg_arrays]
            vjp_leaves = _merge_by_mask(diff_values, nondiff_values, diff_mask)
            vjp_arg = _backend.rebuild(vjp_key, vjp_leaves)
            perturbed_leaves = _merge_by_mask(
                [p.perturbed for p in diff], [False] * len(nondiff), diff_mask
            )
            perturbed = _backend.rebuild(vjp_key, perturbed_leaves, [False] * vjp_key.num_static)
            args, kwargs = _backend.rebuild(args_key, arg_values)
            result = self.fn_fwd(perturbed, vjp_arg, *args, **kwargs)
            if not (isinstance(result, tuple | list) and len(result) == 2):
                raise ValueError(
                    f"filter_custom_vjp({name}): the forward rule must return a pair "
                    f"(out, residuals); got {type(result).__name__}."
                )
            out, residuals = result
            res_leaves, res_key = _backend.flatten_split(residuals, hashed=False)
            saved = _VjpResiduals(
                res_leaves, OutputSpec(res_key), vjp_leaves, arg_values, OutputSpec(perturbed)
            )
            return split_output(out), saved

        def backward(vjp_key, diff_mask, args_key, saved, grad_out):
            out_key, out_cts = output_parts(grad_out)
            ct_leaves = [
                None if type(ct) is SymbolicZero or not _is_inexact_leaf(ct) else ct
                for ct in out_cts
            ]
            grad_obj = _backend.rebuild(out_key, ct_leaves, [None] * out_key.num_static)
            residuals = _backend.rebuild(saved.res_key.key, saved.res_leaves)
            vjp_arg = _backend.rebuild(vjp_key, saved.vjp_values)
            args, kwargs = _backend.rebuild(args_key, saved.arg_values)
            perturbed = saved.perturbed.key
            grads = self.fn_bwd(residuals, grad_obj, perturbed, vjp_arg, *args, **kwargs)
            return _gradients_for_vjp_arg(grads, vjp_key, diff_mask, name), None, None

        custom = jax.custom_vjp(primal, nondiff_argnums=(0, 1, 2))
        custom.defvjp(forward, backward, symbolic_zeros=True)
        self._custom = custom

    def __call__(self, vjp_arg, /, *args, **kwargs):
        if self._custom is None:
            raise RuntimeError(
                f"filter_custom_vjp({self._name}): define both `def_fwd` and `def_bwd` "
                "before calling it."
            )
        vjp_arrays, vjp_key = _backend.flatten_split(vjp_arg, hashed=False)
        diff_mask = tuple(map(_is_inexact_leaf, vjp_arrays))
        diff, nondiff = _split_by_mask(vjp_arrays, diff_mask)
        arg_arrays, args_key = _backend.flatten_split((args, kwargs), hashed=False)
        if arg_arrays:
            arg_arrays = _not_differentiable(self._args_message, arg_arrays)
        return join_output(self._custom(vjp_key, diff_mask, args_key, diff, nondiff, arg_arrays))


class _NotAnArray:
    """Marks the leaves of `vjp_arg` that are not arrays (a plain object: a PyTree leaf)."""

    __slots__ = ()


_NOT_AN_ARRAY = _NotAnArray()


def _gradients_for_vjp_arg(grads: Any, vjp_key, diff_mask: tuple, name: str) -> list:
    """The backward rule's gradients at the differentiable leaves of `vjp_arg`.

    `grads` must have the structure of `vjp_arg`, with `None` (a zero) allowed in place of
    any subtree, and `None` on every leaf that is not a floating-point array.
    """
    slots = _backend.rebuild(
        vjp_key, list(range(vjp_key.num_dynamic)), [_NOT_AN_ARRAY] * vjp_key.num_static
    )
    diff_grads = [None] * sum(diff_mask)
    diff_position: dict[int, int] = {}
    for slot, is_diff in enumerate(diff_mask):
        if is_diff:
            diff_position[slot] = len(diff_position)

    def collect(grad, subtree):
        if grad is None:
            return None
        if type(subtree) is not int:
            if subtree is _NOT_AN_ARRAY:
                raise _BadGradient(
                    "it returned a gradient for a leaf of `vjp_arg` that is not an array "
                    f"(got {_describe(grad)}); it must be `None`."
                )
            raise _BadGradient(
                f"it returned a single {_describe(grad)} where `vjp_arg` has a subtree "
                f"{jtu.tree_structure(subtree)}."
            )
        position = diff_position.get(subtree)
        if position is None:
            raise _BadGradient(
                "it returned a gradient for a leaf of `vjp_arg` that is not a "
                f"floating-point array (got {_describe(grad)}); it must be `None`."
            )
        diff_grads[position] = grad
        return None

    try:
        jtu.tree_map(collect, grads, slots, is_leaf=_is_none)
    except _BadGradient as err:
        raise ValueError(
            f"filter_custom_vjp({name}): invalid backward rule output: {err}"
        ) from None
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"filter_custom_vjp({name}): the backward rule must return gradients with the "
            "structure of `vjp_arg` (the first argument), with `None` on leaves that are not "
            "floating-point arrays and `None` allowed for any zero subtree.\n"
            f"Expected structure: {jtu.tree_structure(slots)}\n"
            f"Got: {jtu.tree_structure(grads, is_leaf=_is_none)}"
        ) from err
    return diff_grads


class _BadGradient(Exception):
    pass


# ---------------------------------------------------------------------------------------
# filter_checkpoint


class _CheckpointWrapper(Wrapper):
    """The callable returned by `filter_checkpoint`. A PyTree laid out as Equinox's:
    children `fun`, `prevent_cse` and `policy`."""

    __slots__ = ("_fun", "_prevent_cse", "_policy", "__dict__", "__weakref__")
    _transform = "filter_checkpoint"
    _child_names = ("_fun", "_prevent_cse", "_policy")
    _fun: Callable
    _prevent_cse: bool
    _policy: Callable | None
    _checkpointed: Callable | None = None  # made on first call

    def __call__(self, /, *args, **kwargs):
        checkpointed = self._checkpointed
        if checkpointed is None:
            fun = self._fun

            def run(key, dynamic):
                args, kwargs = _backend.rebuild(key, dynamic)
                return split_output(fun(*args, **kwargs))

            checkpointed = self._checkpointed = jax.checkpoint(
                run, prevent_cse=self._prevent_cse, policy=self._policy, static_argnums=(0,)
            )
        dynamic, key = _backend.flatten_split((args, kwargs))
        return join_output(checkpointed(key, dynamic))


@overload
def filter_checkpoint(
    *, prevent_cse: bool = True, policy: Callable[..., bool] | None = None
) -> Callable[[Callable[_P, _T]], Callable[_P, _T]]: ...


@overload
def filter_checkpoint(
    fun: Callable[_P, _T],
    *,
    prevent_cse: bool = True,
    policy: Callable[..., bool] | None = None,
) -> Callable[_P, _T]: ...


def filter_checkpoint(
    fun: Any = NO_FUNCTION,
    *,
    prevent_cse: bool = True,
    policy: Callable[..., bool] | None = None,
) -> Any:
    """Filtered version of `jax.checkpoint` (gradient checkpointing, a.k.a. remat).

    Intermediate values of `fun` are recomputed on the backward pass instead of being
    stored, trading compute for memory. Array leaves of the arguments are traced;
    everything else is held static (and must be hashable).

    **Arguments:**

    - `fun`: the function to checkpoint, called as `fun(*args, **kwargs)`. May return
        any PyTree.
    - `prevent_cse`: if `True` (the default), JAX does not apply common subexpression
        elimination to the recomputation; see `jax.checkpoint`.
    - `policy`: which intermediate values may be saved rather than recomputed; one of
        the attributes of `jax.checkpoint_policies`.

    **Returns:**

    A function with the same arguments and outputs as `fun`. Usable as
    `@filter_checkpoint` or `@filter_checkpoint(policy=...)`.

    ```python
    >>> import jax, jax.numpy as jnp
    >>> @filter_checkpoint(policy=jax.checkpoint_policies.nothing_saveable)
    ... def layer(x, act):
    ...     return act(x).sum()
    >>> filter_grad(layer)(jnp.array([0.0, 1.0]), jnp.sin)
    Array([1.       , 0.5403023], dtype=float32)

    ```
    """
    if fun is NO_FUNCTION:
        return functools.partial(filter_checkpoint, prevent_cse=prevent_cse, policy=policy)
    return _CheckpointWrapper(fun, prevent_cse, policy)
