"""filter_vmap and filter_pmap: `jax.vmap`/`jax.pmap` over arbitrary PyTrees.

Array leaves are mapped (by default down axis 0) and everything else is broadcast. Axis
specifications are PyTree prefixes whose leaves are `int`, `None`, or callables
`leaf -> int | None` (such as `if_array(0)`), resolved against the actual arguments on
every call.

filter_vmap traces `fun` once per call (as `jax.vmap` does); non-array outputs are
carried out of that single trace on the side, so they are the same object for the whole
batch. filter_pmap compiles: like filter_jit, it splits the arguments into a StaticKey and a flat
list of array leaves, hands the leaves to `jax.pmap`, and gets the static part of the
output back through JAX's own output tree. Each static signature (StaticKey) gets its
own `jax.pmap`, found with one dict lookup per call.
"""

from __future__ import annotations

import functools
import inspect
import re
import threading
import warnings
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Literal, ParamSpec, TypeVar, overload

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from . import _backend, _caches, _equinox_errors, _explain, _nnx
from ._errors import UnhashableStaticError, format_path
from ._filters import if_array
from ._jit import (
    Compiled,
    Lowered,
    _callable_as_tree,
    _OutputSpec,
    _rebuild_output,
    _renamed,
    _run_and_split_output,
)
from ._wrapper import Wrapper, callable_name, copy_metadata

__all__ = ["filter_vmap", "filter_pmap"]

_UNUSED_DONATION = "Some donated buffers were not usable*"


# ---------------------------------------------------------------------------------------
# Axis specifications.


def _is_none(x: Any) -> bool:
    return x is None


def _always(_: Any) -> bool:
    return True


def _resolve_leaf_axis(spec: Any, leaf: Any, what: str) -> int | None:
    if spec is None or type(spec) is int:
        return spec
    if callable(spec):
        axis = spec(leaf)
        if axis is None or type(axis) is int:
            return axis
        raise ValueError(
            f"`{what}` callables must return an int or None; {spec!r} returned {axis!r}."
        )
    raise ValueError(
        f"`{what}` must consist of None, ints, and callables only; got {spec!r:.100} "
        f"(of type {type(spec).__name__})."
    )


def _is_single_spec(spec: Any) -> bool:
    """True when `spec` applies to a whole tree (rather than being a prefix tree)."""
    if spec is None or type(spec) is int or type(spec) is if_array:
        return True
    if not callable(spec):
        return False
    # A callable PyTree node (e.g. an Equinox Module with __call__) is a prefix tree.
    leaves = jtu.tree_leaves(spec)
    return len(leaves) == 1 and leaves[0] is spec


def _leaf_axes(spec: Any, tree: Any, leaves: list, what: str) -> list:
    """One resolved axis (int or None) per leaf of `tree`; `leaves` are its leaves."""
    if _is_single_spec(spec):
        return [_resolve_leaf_axis(spec, leaf, what) for leaf in leaves]
    spec_def: Any  # jaxlib ships no stub for PyTreeDef
    spec_leaves, spec_def = jtu.tree_flatten(spec, is_leaf=_is_none)
    try:
        subtrees = spec_def.flatten_up_to(tree)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"`{what}` must be a PyTree prefix of the {_WHAT_TREE[what]}: its structure "
            f"{spec_def} does not match {jtu.tree_structure(tree)}."
        ) from err
    axes = []
    for sub_spec, subtree in zip(spec_leaves, subtrees, strict=True):
        for leaf in jtu.tree_leaves(subtree):
            axes.append(_resolve_leaf_axis(sub_spec, leaf, what))
    return axes


_WHAT_TREE = {"in_axes": "tuple of positional arguments", "out_axes": "output of `fun`"}


def _uniform_axis(spec: Any) -> tuple[bool, int | None]:
    """(True, axis) if `spec` gives every array leaf `axis` and every other leaf None."""
    if type(spec) is if_array:
        return True, spec.axis
    if spec is None:
        return True, None
    return False, None


def _parameter_names(fun: Callable) -> tuple[str, ...] | None:
    try:
        return tuple(inspect.signature(fun).parameters)
    except (TypeError, ValueError):
        return None


def _named_in_axes(in_axes: dict, names: tuple[str, ...] | None, nargs: int, name: str):
    """Turn `{parameter name: axis spec}` into a tuple with one spec per passed argument."""
    if names is None:
        raise ValueError(
            f"`in_axes` was given as a dict of parameter names, but the signature of "
            f"{name} cannot be inspected."
        )
    remaining = dict(in_axes)
    # Only the arguments actually passed are considered: a named argument left to its
    # default value could not be said to be mapped or not.
    specs = tuple(remaining.pop(param, if_array(0)) for param in names[:nargs])
    if remaining:
        raise ValueError(
            f"The following `in_axes` did not correspond to any argument: {tuple(remaining)}"
        )
    return specs


def _check_no_kwargs(kwargs: dict, transform: str) -> None:
    if kwargs:
        raise RuntimeError(
            f"keyword arguments cannot be used with functions wrapped with `{transform}` "
            f"(got {sorted(kwargs)}); pass them positionally."
        )


def _require_mapped_axis(transform: str, any_mapped: bool, axis_size: int | None) -> None:
    """[issue 11] Refuse, before JAX sees it, a call where nothing gives the axis size."""
    if any_mapped or axis_size is not None:
        return
    raise ValueError(
        f"{transform}: no argument has a mapped axis (`in_axes` resolves to None for every "
        "leaf of the arguments; only arrays can be mapped), so the size of the mapped axis "
        f"is unknown. Pass `axis_size=...` to {transform}, or map an argument: give an "
        "array argument an integer axis in `in_axes`."
    )


# ---------------------------------------------------------------------------------------
# Error diagnosis (only run once JAX has refused the mapped inputs).


def _leaf_paths(tree: Any) -> list[str]:
    return [format_path(tuple(path), "args") for path, _ in jtu.tree_flatten_with_path(tree)[0]]


def _diagnose_mapped_inputs(
    transform: str, args: tuple, indices: list[int], axes: list, leaves: list, axis_size
) -> ValueError | None:
    """A clear error for mapped inputs JAX refused, or None if nothing wrong is found."""
    paths = _leaf_paths(args)
    sizes: dict[int, list[str]] = {}
    for index, axis, leaf in zip(indices, axes, leaves, strict=True):
        where = paths[index] if index < len(paths) else f"leaf {index}"
        shape = getattr(leaf, "shape", None)
        if shape is None:
            return ValueError(
                f"{transform}: in_axes maps the leaf at {where} along axis {axis}, but it is "
                f"not an array (it is a {type(leaf).__name__}). Use None (or if_array) for "
                "non-array leaves."
            )
        ndim = len(shape)
        if not -ndim <= axis < ndim:
            return ValueError(
                f"{transform}: in_axes maps the leaf at {where} along axis {axis}, which is "
                f"out of range for its shape {tuple(shape)} (rank {ndim})."
            )
        sizes.setdefault(shape[axis], []).append(f"{where} (axis {axis} of {tuple(shape)})")
    if axis_size is not None and any(size != axis_size for size in sizes):
        sizes.setdefault(axis_size, []).insert(0, "axis_size")
    if len(sizes) > 1:
        listing = "; ".join(
            f"size {size}: {', '.join(where[:5])}{' ...' if len(where) > 5 else ''}"
            for size, where in sizes.items()
        )
        return ValueError(
            f"{transform} got inconsistent sizes for the mapped axis: {listing}. Every "
            "mapped leaf must have the same size along its mapped axis."
        )
    return None


# ---------------------------------------------------------------------------------------
# filter_vmap


def _unmapped_but_batched(err: ValueError, info: Any, uniform_out: bool) -> ValueError | None:
    """Name the output leaf JAX found batched although out_axes gives it None."""
    found = re.match(r"at vmap out_axes\[1\]\[(\d+)\]", str(err))
    if uniform_out or found is None:
        return None
    out_key, leaves, axes = info
    target = int(found.group(1))
    unmapped = [
        i
        for i, (leaf, axis) in enumerate(zip(leaves, axes, strict=True))
        if axis is None and _backend.is_array_fast(leaf)
    ]
    if target >= len(unmapped):
        return None
    paths = jtu.tree_flatten_with_path(_backend.rebuild(out_key, leaves))[0]
    where = format_path(tuple(paths[unmapped[target]][0]), "out")
    return ValueError(
        f"filter_vmap: out_axes gives None for the output at {where}, but that array depends "
        "on the mapped inputs (it differs across the batch). Give it an integer out axis, "
        "or make it independent of the mapped inputs."
    )


def _moveaxis(array: Any, axis: int) -> Any:
    return array if axis == 0 else jnp.moveaxis(array, 0, axis)


_VMAP_FIELDS = ("_fun", "_in_axes", "_out_axes", "_axis_name", "_axis_size", "_vmapkwargs")


class _VmapWrapper(Wrapper):
    """The callable `filter_vmap` returns (see `filter_vmap`). A PyTree laid out as
    Equinox's: children `fun`, `in_axes`, `out_axes`, `axis_name`, `axis_size`, the
    keyword arguments of `jax.vmap`."""

    __slots__ = _VMAP_FIELDS + ("__dict__", "__weakref__")
    _transform = "filter_vmap"
    _child_names = _VMAP_FIELDS
    _fun: Callable
    _in_axes: Any
    _out_axes: Any
    _axis_name: Hashable
    _axis_size: int | None
    _vmapkwargs: dict
    _derived = False  # see `_derive`

    def _derive(self) -> None:
        """What calls need from the children; computed on first call, since unflattening
        may hand this wrapper placeholder children that are never called."""
        fun, in_axes, out_axes = self._fun, self._in_axes, self._out_axes
        self._name = callable_name(fun)
        self._uniform_in, self._in_axis = _uniform_axis(in_axes)
        self._uniform_out, self._out_axis = _uniform_axis(out_axes)
        self._names = _parameter_names(fun) if isinstance(in_axes, dict) else None
        self._derived = True

    def __call__(self, /, *args, **kwargs):
        _check_no_kwargs(kwargs, "filter_vmap")
        if not self._derived:
            self._derive()
        in_axes = self._in_axes
        if type(in_axes) is dict:
            in_axes = _named_in_axes(in_axes, self._names, len(args), self._name)

        if self._uniform_in and in_axes is self._in_axes:
            axis = self._in_axis
            if axis is None:
                mapped: list = []
                key = None
                all_leaves = None
            else:
                mapped, key = _backend.partition(args, None, None, False)
                all_leaves = None
            jax_in_axes: Any = axis
        else:
            all_leaves, key = _backend.partition(args, _always, None, False)
            leaf_axes = _leaf_axes(in_axes, args, all_leaves, "in_axes")
            mapped_index = [i for i, a in enumerate(leaf_axes) if a is not None]
            mapped = [all_leaves[i] for i in mapped_index]
            jax_in_axes = tuple(leaf_axes[i] for i in mapped_index)

        def rebuild_args(tracers):
            if key is None:
                return args
            if all_leaves is None:
                return _backend.rebuild(key, list(tracers))
            leaves = list(all_leaves)
            for i, tracer in zip(mapped_index, tracers, strict=True):
                leaves[i] = tracer
            return _backend.rebuild(key, leaves)

        side: list = []
        entered = []

        def vectorised(*tracers):
            entered.append(True)
            out = self._fun(*rebuild_args(tracers))
            return self._split_output(out, side)

        _require_mapped_axis("filter_vmap", bool(mapped), self._axis_size)  # [issue 11]
        jax_out_axes = self._out_axis if self._uniform_out else (0, None)
        try:
            out = jax.vmap(
                vectorised,
                in_axes=jax_in_axes,
                out_axes=jax_out_axes,
                axis_name=self._axis_name,
                axis_size=self._axis_size,
                **self._vmapkwargs,
            )(*mapped)
        except (ValueError, TypeError) as err:
            if entered:
                better = (
                    isinstance(err, ValueError)
                    and side
                    and _unmapped_but_batched(err, side[0], self._uniform_out)
                )
                if better:
                    raise better from err
                raise
            if all_leaves is None:
                mask = _backend.partition(args, None, None, False)[1].mask
                indices = [i for i, dynamic in enumerate(mask) if dynamic]
                axes = [jax_in_axes] * len(mapped)
            else:
                indices, axes = mapped_index, list(jax_in_axes)
            better = _diagnose_mapped_inputs(
                "filter_vmap", args, indices, axes, mapped, self._axis_size
            )
            if better is None:
                raise
            raise better from err
        return self._join_output(side[0], out)

    def _split_output(self, out: Any, side: list) -> Any:
        """Inside the trace: return the arrays for JAX, keep everything else in `side`."""
        if self._uniform_out:
            dynamic, out_key = _backend.partition(out, None, None, False)
            side.append(out_key)
            return dynamic
        leaves, out_key = _backend.partition(out, _always, None, False)
        axes = _leaf_axes(self._out_axes, out, leaves, "out_axes")
        mapped, unmapped = [], []
        for leaf, axis in zip(leaves, axes, strict=True):
            if axis is not None:
                mapped.append(leaf)
            elif _backend.is_array_fast(leaf):
                unmapped.append(leaf)
        side.append((out_key, leaves, axes))
        return mapped, unmapped

    def _join_output(self, info: Any, vectorised_out: Any) -> Any:
        if self._uniform_out:
            return _backend.rebuild(info, vectorised_out)
        out_key, leaves, axes = info
        mapped, unmapped = vectorised_out
        mapped_iter, unmapped_iter = iter(mapped), iter(unmapped)
        paths = None
        joined = []
        for index, (leaf, axis) in enumerate(zip(leaves, axes, strict=True)):
            if axis is not None:
                value = next(mapped_iter)
                ndim = np.ndim(value)
                if not -ndim <= axis < ndim:
                    if paths is None:
                        paths = [
                            format_path(tuple(p), "out")
                            for p, _ in jtu.tree_flatten_with_path(
                                _backend.rebuild(out_key, leaves)
                            )[0]
                        ]
                    raise ValueError(
                        f"filter_vmap: out_axes puts the mapped axis of the output at "
                        f"{paths[index]} at position {axis}, which is out of range for its "
                        f"batched shape {tuple(np.shape(value))}."
                    )
                joined.append(_moveaxis(value, axis))
            elif _backend.is_array_fast(leaf):
                joined.append(next(unmapped_iter))
            else:
                joined.append(leaf)
        return _backend.rebuild(out_key, joined)


_P = ParamSpec("_P")
_T = TypeVar("_T")


@overload
def filter_vmap(
    *,
    in_axes: Any = ...,
    out_axes: Any = ...,
    axis_name: Hashable = None,
    axis_size: int | None = None,
    **kwargs: Any,
) -> Callable[[Callable[_P, _T]], Callable[_P, _T]]: ...


@overload
def filter_vmap(
    fun: Callable[_P, _T],
    *,
    in_axes: Any = ...,
    out_axes: Any = ...,
    axis_name: Hashable = None,
    axis_size: int | None = None,
    **kwargs: Any,
) -> Callable[_P, _T]: ...


def filter_vmap(
    fun=None,
    *,
    in_axes: Any = if_array(0),
    out_axes: Any = if_array(0),
    axis_name: Hashable = None,
    axis_size: int | None = None,
    **vmapkwargs,
):
    """Vectorises a function. By default, all JAX/NumPy arrays are vectorised down their
    leading axis (i.e. axis index 0), and all other types are broadcast.

    **Arguments:**

    For both `in_axes` and `out_axes`, an `int` indicates an array axis to vectorise
    over, `None` indicates that an argument should be broadcast (not vectorised over),
    and callables `Leaf -> int | None` are evaluated on every leaf of their subtree.
    `None` should be used for non-JAX-array arguments.

    - `fun` is a pure function to vectorise. Should be of the form `fun(*args)`; that is
        to say it cannot accept keyword arguments.
    - `in_axes` indicates which axes of the input arrays should be vectorised over. It
        should be a PyTree of `None`, `int`, or callables `Leaf -> int | None`. Its tree
        structure should either be:
        1. a prefix of the input tuple of `args`.
        2. a dictionary, in which case the named arguments use the specified indices to
            vectorise over, and all other arguments will have the default `if_array(0)`.
    - `out_axes` indicates which axis of the output arrays the mapped axis should appear
        at. It should be a PyTree of `None`, `int`, or callables `Leaf -> int | None`,
        and its tree structure should be a prefix of the output `fun(*args)`.
    - `axis_name` is an optional hashable Python object used to identify the mapped axis
        so that parallel collectives (e.g. `jax.lax.psum`) can be applied.
    - `axis_size` is an optional `int` describing the size of the axis mapped. This only
        needs to be passed if none of the input arguments are vectorised, as else it can
        be deduced by looking at the argument shapes.

    **Returns:**

    The vectorised version of `fun`. Non-array outputs (and arrays given a `None` out
    axis) come back once, unbatched: `fun` is traced once for the whole batch.

    !!! tip

        To vectorise all JAX/NumPy arrays down their `j`th axis, and broadcast all other
        types, use `if_array(j)`, which returns a callable
        `leaf -> j if is_array(leaf) else None`. The defaults of `in_axes` and
        `out_axes` are both `if_array(0)`.

    !!! example

        ```python
        >>> import jax.numpy as jnp
        >>> @filter_vmap
        ... def f(x, y):
        ...     return x + y
        >>> f(jnp.array([1, 2]), jnp.array([3, 4]))  # both args vectorised down axis 0
        Array([4, 6], dtype=int32)
        >>> f(jnp.array([1, 2]), 3)  # first arg vectorised, second broadcast
        Array([4, 5], dtype=int32)
        >>> @filter_vmap(in_axes=(None, 1))
        ... def g(x, y):
        ...     return x + y
        >>> g(jnp.array(1), jnp.array([[2, 3]]))  # second arg vectorised down axis 1
        Array([[3],
               [4]], dtype=int32)

        ```

    !!! example

        An ensemble of models: the arrays of the returned model get a leading batch
        axis, its other leaves (activation functions, sizes) are shared.

        ```python
        >>> import jax, jax.random as jr
        >>> def make_model(key):
        ...     return {"w": jr.normal(key, (3,)), "activation": jax.nn.relu}
        >>> ensemble = filter_vmap(make_model)(jr.split(jr.PRNGKey(0), 8))
        >>> ensemble["w"].shape, ensemble["activation"] is jax.nn.relu
        ((8, 3), True)
        >>> @filter_vmap(in_axes=(if_array(0), None))
        ... def evaluate(model, x):
        ...     return model["activation"](model["w"] @ x)
        >>> evaluate(ensemble, jnp.ones(3)).shape
        (8,)

        ```
    """
    if fun is None:
        return functools.partial(
            filter_vmap,
            in_axes=in_axes,
            out_axes=out_axes,
            axis_name=axis_name,
            axis_size=axis_size,
            **vmapkwargs,
        )
    if not callable(fun):
        raise TypeError(f"filter_vmap expects a callable, got {type(fun).__name__}")
    return _VmapWrapper(fun, in_axes, out_axes, axis_name, axis_size, vmapkwargs)


# ---------------------------------------------------------------------------------------
# filter_pmap


class _MoreOutputGroups(Exception):
    """Raised from inside a trace: the output needs more per-axis groups than provided."""

    def __init__(self, needed: int):
        super().__init__(needed)
        self.needed = needed


def _normalise_out_axis(axis: int, leaf: Any) -> int:
    rank = np.ndim(leaf) + 1  # the mapped axis is inserted into the per-device value
    if not -rank <= axis < rank:
        raise ValueError(
            f"filter_pmap: out_axes entry {axis} is out of range for an output of per-device "
            f"shape {tuple(np.shape(leaf))} (the mapped axis must go at a position in "
            f"[{-rank}, {rank - 1}])."
        )
    return axis % rank


_PMAP_FIELDS = (
    "_fun",
    "_in_axes",
    "_out_axes",
    "_axis_name",
    "_axis_size",
    "_filter_warning",
    "_pmapkwargs",
)


class _PmapProgram:
    """Everything compiled for one function (by its static part) and one set of options:
    one `jax.pmap` per static signature of the arguments, shared by every wrapper around
    an equal function. Bound to the core it was made with."""

    # Set once a call holding Flax NNX objects was seen: from then on every call collects
    # its Variables and every program returns their updates (see `filterjax._nnx`).
    routes_nnx = False

    def __init__(
        self, core, fun_key, name, in_axes, out_axes, axis_name, axis_size, donate, pmapkwargs
    ):
        self.core = core
        self.fun_key = fun_key
        self.name = name
        self.out_axes = out_axes
        self.axis_name = axis_name
        self.axis_size = axis_size
        self.donate = donate
        self.pmapkwargs = pmapkwargs
        self.uniform_in, self.in_axis = _uniform_axis(in_axes)
        if type(in_axes) is int:  # only array leaves are traced, so `k` means if_array(k)
            self.uniform_in, self.in_axis = True, in_axes
        self.uniform_out, self.out_axis = _uniform_axis(out_axes)
        self.silence_unused_donation = donate == "all"
        self.dummy = None if axis_size is None else np.zeros(axis_size, np.int8)
        self.lock = threading.Lock()
        self._clear_cache()
        _caches.register_owner(self)

    def _clear_cache(self) -> None:
        # One jax.pmap per static signature, looked up by the call's StaticKey alone on the
        # fast path (uniform axes), else by (key, per-leaf input axes, output groups).
        self.pmapped: dict = {}
        self.groups = 4

    def pmap_for(self, cache_key, key, leaf_axes: tuple | None, groups: int):
        pmapped = self.pmapped.get(cache_key)
        if pmapped is not None:
            return pmapped
        with self.lock:
            pmapped = self.pmapped.get(cache_key)
            if pmapped is None:
                pmapped = self._make_pmap(key, leaf_axes, groups)
                _caches.bounded_insert(self.pmapped, cache_key, pmapped)
        return pmapped

    def _make_pmap(self, key, leaf_axes: tuple | None, groups: int):
        core, fun_key = self.core, self.fun_key
        out_axes = self.out_axes
        # NNX programs return `(out, changed, new values)`, the values along the input axis.
        nnx = self.routes_nnx
        uniform_out = self.uniform_out and not nnx
        if nnx:
            in_axis = self.in_axis
            out_axes = (out_axes, None, None if in_axis is None else if_array(in_axis))

        def parallelised(leaves):
            # Where the stack of an `eqx.error_if` ends (see `_equinox_errors`).
            __equinox_jit_id__ = _equinox_errors.FRAME_MARKER  # noqa: F841
            fun_dynamic, dynamic, _ = leaves
            fun = core.rebuild(fun_key, fun_dynamic)
            args = core.rebuild(key, list(dynamic))
            if _explain.enabled:  # runs only when JAX traces: a new program
                _explain.on_trace("filter_pmap", core, fun, args, {})
            if nnx:
                fun = _nnx.stepper(self.name, self.donate != "none", fun, args, {})
            else:
                _nnx.refuse(fun, args, {})
            if uniform_out:
                return _run_and_split_output(fun, args, {}, core)
            return _group_output(core, fun(*args), out_axes, groups)

        parallelised.__name__ = parallelised.__qualname__ = self.name
        dynamic_axes = self.in_axis if leaf_axes is None else leaf_axes
        pmap_out_axes: Any = self.out_axis if uniform_out else (None, *range(groups), None)
        return jax.pmap(
            parallelised,
            axis_name=self.axis_name,
            in_axes=((None, dynamic_axes, 0),),
            out_axes=pmap_out_axes,
            axis_size=self.axis_size,
            donate_argnums=() if self.donate == "none" else (0,),
            **self.pmapkwargs,
        )

    def run(self, pmapped, fun_dynamic, dynamic):
        with _equinox_errors.translated():
            if self.silence_unused_donation:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=_UNUSED_DONATION)
                    out = pmapped((fun_dynamic, dynamic, self.dummy))
            else:
                out = pmapped((fun_dynamic, dynamic, self.dummy))
            if _equinox_errors.watching():
                # Devices run asynchronously: wait, so that a failed `eqx.error_if` is
                # raised by this call rather than when `out` is used.
                jax.block_until_ready(out)
        return out

    def finish(self, out):
        if self.uniform_out and not self.routes_nnx:
            return _rebuild_output(out, self.core)
        return _ungroup_output(self.core, out)


# Compiled programs of every filter_pmap function (see `filterjax._caches`).
_PMAP_PROGRAMS = _caches.ProgramCache()


def _pmap_program_key(core, fun_key, in_axes, out_axes, axis_name, axis_size, donate, kwargs):
    try:
        _, axes_key = core.partition((in_axes, out_axes), _never)
        options = tuple(sorted(kwargs.items()))
    except Exception:
        return [fun_key]  # unhashable: not shared
    return (core.BACKEND, fun_key, axes_key, axis_name, axis_size, donate, options)


def _never(_: Any) -> bool:
    return False


class _PmapWrapper(Wrapper):
    """The callable `filter_pmap` returns (see `filter_pmap`). A PyTree laid out as
    Equinox's: children `fun`, `in_axes`, `out_axes`, `axis_name`, `axis_size`, whether
    unused-donation warnings are filtered, the keyword arguments of `jax.pmap`."""

    __slots__ = _PMAP_FIELDS + ("_donate", "_state", "__dict__", "__weakref__")
    _transform = "filter_pmap"
    _child_names = _PMAP_FIELDS

    def __init__(self, fun, in_axes, out_axes, axis_name, axis_size, donate, pmapkwargs):
        self._fun = fun
        self._in_axes = in_axes
        self._out_axes = out_axes
        self._axis_name = axis_name
        self._axis_size = axis_size
        self._filter_warning = donate == "all"
        self._pmapkwargs = pmapkwargs
        self._donate = donate
        self._state = None
        copy_metadata(self, fun)

    def _tree_flatten(self) -> tuple[tuple, Any]:
        return tuple(getattr(self, name) for name in _PMAP_FIELDS), self._donate

    @classmethod
    def _tree_unflatten(cls, donate: Any, children: Any) -> Any:
        fun, in_axes, out_axes, axis_name, axis_size, _, pmapkwargs = children
        return cls(fun, in_axes, out_axes, axis_name, axis_size, donate, pmapkwargs)

    def _wrapped(self) -> Any:
        return self._fun

    def _reduce(self) -> tuple[Callable, tuple]:
        return _remake_pmap, (
            self._fun,
            self._in_axes,
            self._out_axes,
            self._axis_name,
            self._axis_size,
            self._donate,
            self._pmapkwargs,
        )

    def _ready(self) -> tuple[_PmapProgram, list]:
        """(the shared program, fun's array leaves): made on first call, since
        unflattening may hand this wrapper placeholder children that are never called."""
        state = self._state
        if state is None:
            core = _backend._core
            try:
                fun_dynamic, fun_key = core.partition(_callable_as_tree(self._fun))
            except UnhashableStaticError as err:
                raise _renamed(err, ("fun",)) from err.__cause__
            options = (
                self._in_axes,
                self._out_axes,
                self._axis_name,
                self._axis_size,
                self._donate,
                self._pmapkwargs,
            )
            program = _PMAP_PROGRAMS.get_or_create(
                _pmap_program_key(core, fun_key, *options),
                lambda: _PmapProgram(core, fun_key, callable_name(self._fun), *options),
            )
            self._names = _parameter_names(self._fun) if isinstance(self._in_axes, dict) else None
            state = self._state = (program, fun_dynamic)
        return state

    def _call_args(
        self, program: _PmapProgram, args: tuple, variables: list | None = None
    ) -> tuple[Any, tuple | None, Sequence]:
        """(StaticKey, per-leaf axes or None if uniform, dynamic leaves) for a call; the
        NNX Variables of `args` appended to `variables` if given."""
        in_axes = self._in_axes
        if type(in_axes) is dict:
            in_axes = _named_in_axes(in_axes, self._names, len(args), program.name)
        try:
            is_leaf = None if variables is None else _nnx.collector(variables)
            dynamic, key = program.core.partition(args, None, is_leaf)
        except UnhashableStaticError as err:
            raise _renamed(err, ("args",)) from err.__cause__
        if program.uniform_in and in_axes is self._in_axes:
            return key, None, dynamic
        leaves, _ = program.core.partition(args, _always, None, False)
        axes = _leaf_axes(in_axes, args, leaves, "in_axes")
        leaf_axes = tuple(a for a, m in zip(axes, key.mask, strict=True) if m)
        return key, leaf_axes, tuple(dynamic)

    def _pmapped_for(self, program, key, leaf_axes, groups):
        cache_key = key if leaf_axes is None and groups == 4 else (key, leaf_axes, groups)
        return program.pmap_for(cache_key, key, leaf_axes, groups)

    def __call__(self, /, *args, **kwargs):
        _check_no_kwargs(kwargs, "filter_pmap")
        program, fun_dynamic = self._ready()
        variables: list | None = [] if program.routes_nnx else None
        key, leaf_axes, dynamic = self._call_args(program, args, variables)
        if variables:
            _nnx.check_pmap_call(program.name, args, variables, leaf_axes)
        self._require_mapped(program, leaf_axes, dynamic)
        groups = program.groups
        pmapped = self._pmapped_for(program, key, leaf_axes, groups)
        try:
            out = program.run(pmapped, fun_dynamic, dynamic)
        except _MoreOutputGroups as more:
            program.groups = groups = max(program.groups, more.needed)
            pmapped = self._pmapped_for(program, key, leaf_axes, groups)
            out = program.run(pmapped, fun_dynamic, dynamic)
        except _nnx.Reroute:
            out = _nnx.Reroute  # called again outside the handler: no chained exception
        except ValueError as err:
            better = self._diagnose(program, args, key, leaf_axes, dynamic)
            if better is None:
                raise
            raise better from err
        if out is _nnx.Reroute:
            # NNX objects in the arguments: every program of this function must now return
            # their updates, so the ordinary ones made so far are dropped.
            program.routes_nnx = True
            program.pmapped.clear()
            return self(*args)
        if variables is None:
            return program.finish(out)
        out, changed, values = program.finish(out)
        if changed:
            _nnx.write_back(variables, changed, values)
        return out

    def lower(self, /, *args, **kwargs) -> _PmapLowered:
        """Lower for these arguments (ahead-of-time compilation).

        **Returns:**

        A lowered object with `.as_text()` and `.compile()`; the compiled object is called
        with the same arguments (static ones included) as this function.
        """
        _check_no_kwargs(kwargs, "filter_pmap")
        program, fun_dynamic = self._ready()
        if program.routes_nnx:
            raise _nnx.lower_error(program.name)
        key, leaf_axes, dynamic = self._call_args(program, args)
        self._require_mapped(program, leaf_axes, dynamic)
        groups = program.groups
        flat = (fun_dynamic, dynamic, program.dummy)
        try:
            lowered = self._pmapped_for(program, key, leaf_axes, groups).lower(flat)
        except _nnx.Reroute:
            program.pmapped.pop(key, None)
            raise _nnx.lower_error(program.name) from None
        except _MoreOutputGroups as more:
            program.groups = groups = max(program.groups, more.needed)
            lowered = self._pmapped_for(program, key, leaf_axes, groups).lower(flat)
        return _PmapLowered(program, fun_dynamic, lowered, (key, leaf_axes), self)

    def _require_mapped(self, program, leaf_axes, dynamic) -> None:
        any_mapped = bool(dynamic) and (
            program.in_axis is not None
            if leaf_axes is None
            else any(axis is not None for axis in leaf_axes)
        )
        _require_mapped_axis("filter_pmap", any_mapped, self._axis_size)

    def _diagnose(self, program, args, key, leaf_axes, dynamic) -> ValueError | None:
        indices = [i for i, m in enumerate(key.mask) if m]
        axes = [program.in_axis] * len(dynamic) if leaf_axes is None else list(leaf_axes)
        mapped = [
            (i, a, leaf) for i, a, leaf in zip(indices, axes, dynamic, strict=True) if a is not None
        ]
        if not mapped:
            return None
        indices, axes, leaves = (list(column) for column in zip(*mapped, strict=True))
        return _diagnose_mapped_inputs("filter_pmap", args, indices, axes, leaves, self._axis_size)


def _remake_pmap(fun, in_axes, out_axes, axis_name, axis_size, donate, pmapkwargs):
    return _PmapWrapper(fun, in_axes, out_axes, axis_name, axis_size, donate, pmapkwargs)


class _PmapLowered(Lowered):
    """A `filter_pmap` function lowered for one call signature (see `lower`)."""

    @property
    def _compiled_type(self) -> type[Compiled]:
        return _PmapCompiled


class _PmapCompiled(Compiled):
    """A compiled `filter_pmap` program, callable with the arguments it was lowered for."""

    def __call__(self, *args, **kwargs):
        _check_no_kwargs(kwargs, "filter_pmap")
        program = self._program
        key, leaf_axes, dynamic = self._owner._call_args(program, args)
        if (key, leaf_axes) != self._key:
            raise TypeError(
                f"This compiled {program.name} was lowered for arguments with another "
                "tree structure, other static (non-array) values or other mapped axes than "
                "the ones it was called with. Lower and compile again for these arguments, "
                "or call the filter_pmap function itself (which compiles as needed)."
            )
        return program.finish(program.run(self._compiled, self._leading, dynamic))


class _GroupedOutput:
    """Static part of a pmap output split by out axis: where each leaf went."""

    __slots__ = ("key", "placement")

    def __init__(self, key, placement):
        self.key = key
        self.placement = placement


def _group_output(core: Any, out: Any, out_axes: Any, groups: int) -> tuple:
    """Inside the trace: split the output into one list per (non-negative) out axis."""
    leaves, out_key = core.partition(out, _always, None, False)
    axes = _leaf_axes(out_axes, out, leaves, "out_axes")
    by_axis: list[list] = [[] for _ in range(groups)]
    unmapped: list = []
    placement: list[tuple[int | None, Any]] = []
    for leaf, axis in zip(leaves, axes, strict=True):
        if axis is not None:
            axis = _normalise_out_axis(axis, leaf)
            if axis >= groups:
                raise _MoreOutputGroups(max(axis + 1, 2 * groups))
            placement.append((axis, len(by_axis[axis])))
            by_axis[axis].append(leaf)
        elif _backend.is_array_fast(leaf):
            placement.append((-1, len(unmapped)))
            unmapped.append(leaf)
        else:
            placement.append((None, leaf))
    spec = {_OutputSpec(_GroupedOutput(out_key, tuple(placement))): ()}
    return (spec, *by_axis, unmapped)


def _ungroup_output(core: Any, out: tuple) -> Any:
    ((spec, _),) = out[0].items()
    grouped = spec.key
    groups = out[1:]
    leaves = [
        value if group is None else groups[group][value] for group, value in grouped.placement
    ]
    return core.rebuild(grouped.key, leaves)


_RESERVED_PMAP_KWARGS = frozenset({"static_broadcasted_argnums", "donate_argnums"})


@overload
def filter_pmap(
    *,
    in_axes: Any = ...,
    out_axes: Any = ...,
    axis_name: Hashable = None,
    axis_size: int | None = None,
    donate: Literal["all", "warn", "none"] = "none",
    **kwargs: Any,
) -> Callable[[Callable[_P, _T]], Callable[_P, _T]]: ...


@overload
def filter_pmap(
    fun: Callable[_P, _T],
    *,
    in_axes: Any = ...,
    out_axes: Any = ...,
    axis_name: Hashable = None,
    axis_size: int | None = None,
    donate: Literal["all", "warn", "none"] = "none",
    **kwargs: Any,
) -> Callable[_P, _T]: ...


def filter_pmap(
    fun=None,
    *,
    in_axes: Any = if_array(0),
    out_axes: Any = if_array(0),
    axis_name: Hashable = None,
    axis_size: int | None = None,
    donate: Literal["all", "warn", "none"] = "none",
    **pmapkwargs,
):
    """!!! warning

        JAX has now added more powerful parallelism APIs directly to the JIT interface.
        As such, using `filter_jit` with sharded inputs is now recommended over
        `filter_pmap`.

    Parallelises a function. By default, all JAX/NumPy arrays are parallelised down
    their leading axis (i.e. axis index 0), and all other types are broadcast.

    `jax.pmap`, and thus `filter_pmap`, also compiles the function in the same way as
    `jax.jit`: all JAX arrays are traced, and all other arguments are treated as static
    inputs. A call with the same static inputs, structure and array shapes as an earlier
    one reuses its compiled program.

    **Arguments:**

    For both `in_axes` and `out_axes`, an `int` indicates an array axis to parallelise
    over, `None` indicates that an argument should be broadcast (not parallelised over),
    and callables `Leaf -> int | None` are evaluated on every leaf of their subtree.

    - `fun` is a pure function to parallelise. Should be of the form `fun(*args)`; that
        is to say it cannot accept keyword arguments.
    - `in_axes` indicates which axes of the input arrays should be parallelised over. It
        should be a PyTree of `None`, `int`, or callables `Leaf -> int | None`. Its tree
        structure should either be:
        1. a prefix of the input tuple of `args`.
        2. a dictionary, in which case the named arguments use the specified indices to
            parallelise over, and all other arguments will have the default
            `if_array(0)`.
    - `out_axes` indicates which axis of the output arrays the mapped axis should appear
        at. It should be a PyTree of `None`, `int`, or callables `Leaf -> int | None`,
        and its tree structure should be a prefix of the output `fun(*args)`.
    - `axis_name` is an optional hashable Python object used to identify the mapped axis
        so that parallel collectives (e.g. `jax.lax.psum`) can be applied.
    - `axis_size` is an optional `int` describing the size of the axis mapped. This only
        needs to be passed if none of the input arguments are parallelised, as else it
        can be deduced by looking at the argument shapes.
    - `donate` indicates whether the buffers of JAX arrays are donated or not. It should
        either be:
        - `'all'`: donate all arrays and suppress all warnings about unused buffers;
        - `'warn'`: as above, but don't suppress unused buffer warnings;
        - `'none'`: the default, disables buffer donation.

    **Returns:**

    The parallelised version of `fun`.

    !!! example

        ```python
        >>> import jax, jax.numpy as jnp
        >>> n = jax.local_device_count()
        >>> @filter_pmap
        ... def f(x, y):
        ...     return x + y
        >>> f(jnp.arange(n), jnp.arange(n)).shape == (n,)  # both args parallelised
        True
        >>> f(jnp.arange(n), 3).tolist() == [i + 3 for i in range(n)]  # 3 is broadcast
        True

        ```
    """
    if donate not in ("all", "warn", "none"):
        raise ValueError(
            f"`filter_pmap(..., donate=...)` must be one of 'all', 'warn', or 'none'; "
            f"got {donate!r}."
        )
    reserved = _RESERVED_PMAP_KWARGS.intersection(pmapkwargs)
    if reserved:
        raise ValueError(
            f"filter_pmap decides {sorted(reserved)} itself: arrays are traced, everything "
            "else is static; use `donate=` for donation."
        )
    if fun is None:
        return functools.partial(
            filter_pmap,
            in_axes=in_axes,
            out_axes=out_axes,
            axis_name=axis_name,
            axis_size=axis_size,
            donate=donate,
            **pmapkwargs,
        )
    if not callable(fun):
        raise TypeError(f"filter_pmap expects a callable, got {type(fun).__name__}")
    return _PmapWrapper(fun, in_axes, out_axes, axis_name, axis_size, donate, pmapkwargs)
