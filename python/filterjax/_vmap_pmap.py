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
own `jax.pmap`, found with one dict lookup per call; for the common call shape that is the
core's `Dispatcher`, as for filter_jit, with no Python per call. Calls stay asynchronous,
except those of a program holding an Equinox error check, which wait so that a failed
check is raised by the call that caused it.
"""

from __future__ import annotations

import functools
import inspect
import re
import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Literal, ParamSpec, TypeVar, overload

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from . import _backend, _caches, _equinox_errors, _explain, _nnx
from ._compile_utils import (
    Compiled,
    Lowered,
    OutputSpec,
    SignatureTable,
    call_donating,
    callable_as_tree,
    check_options,
    join_output,
    output_parts,
    rebuild_output,
    run_and_split_output,
    split_output,
    with_call_path,
)
from ._errors import UnhashableStaticError, format_path
from ._filters import if_array
from ._plans import IDENTITY_PLAN
from ._wrapper import NO_FUNCTION, Wrapper, callable_name, copy_metadata

__all__ = ["filter_vmap", "filter_pmap"]


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
    """Refuse, before JAX sees it, a call where nothing gives the axis size."""
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
        if axis is None and leaf is _ARRAY_LEAF
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
        plan = self._plan(args)
        _require_mapped_axis("filter_vmap", bool(plan.mapped), self._axis_size)
        layouts: list = []  # the traced output's layout, read only to explain an error
        fun, uniform_out, out_axes = self._fun, self._uniform_out, self._out_axes

        def vectorised(*tracers):
            out = fun(*plan.arguments(tracers))
            if uniform_out:
                return split_output(out)
            layout, mapped, unmapped = _layout_output(out, out_axes)
            layouts.append(layout)
            return mapped, unmapped, {OutputSpec(layout): ()}

        try:
            out = jax.vmap(
                vectorised,
                in_axes=plan.in_axes,
                out_axes=self._out_axis if uniform_out else (0, None, None),
                axis_name=self._axis_name,
                axis_size=self._axis_size,
                **self._vmapkwargs,
            )(*plan.mapped)
        # jax < 0.5 fails with an IndexError while wording its own size-mismatch message
        # for a function of `*args`: diagnosed like the ValueError newer releases raise.
        except (ValueError, TypeError, IndexError) as err:
            better = self._diagnose(err, args, plan, layouts)
            if better is None:
                raise
            raise better from err
        if uniform_out:
            return join_output(out)
        mapped, unmapped, carried = out
        layout, _ = output_parts(carried)
        return _join_output(layout, mapped, unmapped)

    def _plan(self, args: tuple) -> _VmapPlan:
        """Which leaves of `args` JAX maps, and along which axes."""
        in_axes = self._in_axes
        if type(in_axes) is dict:
            in_axes = _named_in_axes(in_axes, self._names, len(args), self._name)
        if self._uniform_in and in_axes is self._in_axes:
            axis = self._in_axis
            if axis is None:
                return _VmapPlan(args, None, [], axis)
            mapped, key = _backend.flatten_split(args, hashed=False)
            return _VmapPlan(args, key, mapped, axis)
        all_leaves, key = _backend.flatten_split(args, _always, hashed=False)
        leaf_axes = _leaf_axes(in_axes, args, all_leaves, "in_axes")
        mapped_index = [i for i, a in enumerate(leaf_axes) if a is not None]
        mapped = [all_leaves[i] for i in mapped_index]
        jax_in_axes = tuple(leaf_axes[i] for i in mapped_index)
        return _VmapPlan(args, key, mapped, jax_in_axes, all_leaves, mapped_index)

    def _diagnose(
        self, err: Exception, args: tuple, plan: _VmapPlan, layouts: list
    ) -> ValueError | None:
        """A clearer error than JAX's, naming the leaf at fault, or None."""
        if plan.traced:
            # JAX refused the output, or the function itself raised.
            if isinstance(err, ValueError) and layouts:
                return _unmapped_but_batched(err, layouts[0], self._uniform_out)
            return None
        if plan.all_leaves is None:
            mask = _backend.flatten_split(args, hashed=False)[1].mask
            indices = [i for i, dynamic in enumerate(mask) if dynamic]
            axes = [plan.in_axes] * len(plan.mapped)
        else:
            indices, axes = plan.mapped_index, list(plan.in_axes)
        return _diagnose_mapped_inputs(
            "filter_vmap", args, indices, axes, plan.mapped, self._axis_size
        )


class _VmapPlan:
    """One call's mapped leaves and their axes, and how to rebuild the arguments from
    JAX's tracers."""

    __slots__ = ("args", "key", "mapped", "in_axes", "all_leaves", "mapped_index", "traced")

    def __init__(self, args, key, mapped, in_axes, all_leaves=None, mapped_index=None):
        self.args = args
        self.key = key
        self.mapped = mapped
        self.in_axes = in_axes
        self.all_leaves = all_leaves
        self.mapped_index = mapped_index
        self.traced = False

    def arguments(self, tracers: tuple) -> Any:
        self.traced = True
        if self.key is None:
            return self.args
        if self.all_leaves is None:
            return _backend.rebuild(self.key, list(tracers))
        leaves = list(self.all_leaves)
        for i, tracer in zip(self.mapped_index, tracers, strict=True):
            leaves[i] = tracer
        return _backend.rebuild(self.key, leaves)


class _NotStatic:
    """Stands in a vmap output layout for an array leaf (the array goes through JAX)."""

    __slots__ = ()


_ARRAY_LEAF = _NotStatic()


def _layout_output(out: Any, out_axes: Any) -> tuple[tuple, list, list]:
    """Inside the trace: `(layout, mapped arrays, unmapped arrays)` of the output, the
    layout being `(key, leaves with _ARRAY_LEAF for arrays, out axis per leaf)`."""
    leaves, out_key = _backend.flatten_split(out, _always, hashed=False)
    axes = _leaf_axes(out_axes, out, leaves, "out_axes")
    mapped, unmapped, kept = [], [], []
    for leaf, axis in zip(leaves, axes, strict=True):
        if axis is not None:
            mapped.append(leaf)
            kept.append(_ARRAY_LEAF)
        elif _backend.is_array_fast(leaf):
            unmapped.append(leaf)
            kept.append(_ARRAY_LEAF)
        else:
            kept.append(leaf)
    return (out_key, kept, axes), mapped, unmapped


def _join_output(layout: tuple, mapped: list, unmapped: list) -> Any:
    """The output from its layout and the mapped and unmapped arrays JAX returned."""
    out_key, leaves, axes = layout
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
                        for p, _ in jtu.tree_flatten_with_path(_backend.rebuild(out_key, leaves))[0]
                    ]
                raise ValueError(
                    f"filter_vmap: out_axes puts the mapped axis of the output at "
                    f"{paths[index]} at position {axis}, which is out of range for its "
                    f"batched shape {tuple(np.shape(value))}."
                )
            joined.append(_moveaxis(value, axis))
        elif leaf is _ARRAY_LEAF:
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
    fun=NO_FUNCTION,
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
    if fun is NO_FUNCTION:
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
        self.num_leading = fun_key.num_dynamic
        self.table = SignatureTable()
        self.records = _explain.Records()  # signatures of the traces, for explanations
        # The wrappers' Dispatchers read these in place: call shapes (number of
        # positionals) -> IDENTITY_PLAN, and StaticKey -> pmap for the programs a call
        # may reach without Python (filled by the fallback, `_PmapWrapper._slow_call`).
        # Only the common shape gets there: one axis for every array leaf in and out,
        # no `axis_size`, no unused-donation warning to silence, no Flax NNX objects,
        # and no Equinox error check in the program (whose calls must wait for it).
        self.plans: dict = {}
        self.fast_programs: dict = {}
        self.fast = (
            self.uniform_in
            and self.in_axis is not None
            and self.uniform_out
            and axis_size is None
            and not self.silence_unused_donation
        )
        # pmap -> whether a trace of it reached an Equinox error check.
        self.error_checks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        _caches.register_owner(self)

    def _clear_cache(self) -> None:
        self.table.clear()
        self.records.clear()
        self.forget_fast()

    def forget_fast(self) -> None:
        """Send every call back through the fallback until it has run again."""
        self.fast_programs.clear()
        self.plans.clear()

    def parts(self, fun_dynamic: tuple, dynamic: Any) -> tuple:
        """The pmap's arguments: [fun's array leaves,] the call's array leaves[, the
        placeholder that carries `axis_size`]. The first two as the Dispatcher passes them
        (a tuple and a list, so both paths hit the same compiled program)."""
        head = (fun_dynamic,) if self.num_leading else ()
        tail = () if self.dummy is None else (self.dummy,)
        return (*head, dynamic, *tail)

    def _unpack(self, parts: tuple) -> tuple[Any, Any]:
        """(fun's array leaves, the call's array leaves) from the pmap's arguments."""
        if self.num_leading:
            return parts[0], parts[1]
        return (), parts[0]

    def has_check(self, pmapped: Any) -> bool:
        """Whether a trace of `pmapped` reached an Equinox error check (True if unknown)."""
        try:
            return self.error_checks.get(pmapped, True)
        except TypeError:  # a compiled program, which cannot be weakly referenced
            return True

    def pmap_for(self, key, leaf_axes: tuple | None, fun_dynamic, dynamic):
        """The `jax.pmap` for a call: one per static signature, found by the call's
        StaticKey alone with uniform axes, else by the per-leaf input axes too, and, when
        the output is split by out axis, by the arrays' shapes and dtypes (which decide
        the output's ranks, and so its layout)."""
        if self.uniform_out and not self.routes_nnx:
            cache_key = key if leaf_axes is None else (key, leaf_axes)
            return self.table.get_or_make(cache_key, lambda: self._make_pmap(key, leaf_axes, 0))
        cache_key = (key, leaf_axes, _shapes(fun_dynamic), _shapes(dynamic))
        return self.table.get_or_make(
            cache_key,
            lambda: self._make_pmap(
                key, leaf_axes, self._output_groups(key, leaf_axes, fun_dynamic, dynamic)
            ),
        )

    def _in_axes(self, leaf_axes: tuple | None) -> Any:
        if leaf_axes is None and not self.num_leading and self.dummy is None:
            # The call's leaves alone, on one axis: an int, which `jax.pmap` spreads over
            # the leaves without matching a prefix tree on every call.
            return self.in_axis
        head = (None,) if self.num_leading else ()
        tail = () if self.dummy is None else (0,)
        return (*head, self.in_axis if leaf_axes is None else leaf_axes, *tail)

    def _output_groups(self, key, leaf_axes: tuple | None, fun_dynamic, dynamic) -> int:
        """How many per-axis groups the output needs: one per non-negative out axis up to
        the largest, found by an abstract pass (`jax.eval_shape` of the function mapped
        as `jax.pmap` will map it) before the pmap is built."""
        core, fun_key, out_axes = self.core, self.fun_key, self._traced_out_axes()

        def largest_axis(*parts):
            fun_dynamic, dynamic = self._unpack(parts)
            args, _ = core.rebuild(key, list(dynamic))
            out = self._traced_fun(core.rebuild(fun_key, fun_dynamic), args)(*args)
            leaves, _ = core.flatten_split(out, _always, hashed=False)
            axes = _leaf_axes(out_axes, out, leaves, "out_axes")
            normalised = [
                _normalise_out_axis(axis, leaf)
                for leaf, axis in zip(leaves, axes, strict=True)
                if axis is not None
            ]
            return {OutputSpec(max(normalised, default=-1)): ()}

        mapped = jax.vmap(
            largest_axis,
            in_axes=self._in_axes(leaf_axes),
            axis_name=self.axis_name,
            axis_size=self.axis_size,
        )
        largest, _ = output_parts(jax.eval_shape(mapped, *self.parts(fun_dynamic, dynamic)))
        return largest + 1

    def _traced_out_axes(self) -> Any:
        """The out axes of what the traced function returns: NNX programs return
        `(out, changed, new values)`, the values along the input axis."""
        if not self.routes_nnx:
            return self.out_axes
        in_axis = self.in_axis
        return (self.out_axes, None, None if in_axis is None else if_array(in_axis))

    def _traced_fun(self, fun: Callable, args: tuple) -> Callable:
        """`fun` as traced: for NNX programs, also returning the Variables' updates;
        otherwise refusing (rerouting) arguments that turn out to hold NNX objects."""
        if self.routes_nnx:
            return _nnx.stepper(self.name, self.donate != "none", fun, args, {})
        _nnx.refuse(fun, args, {})
        return fun

    def _make_pmap(self, key, leaf_axes: tuple | None, groups: int):
        core, fun_key, records = self.core, self.fun_key, self.records
        uniform_out = self.uniform_out and not self.routes_nnx
        out_axes = self._traced_out_axes()
        made: list = []  # the pmap, once made

        def parallelised(*parts):
            # Where the stack of an `eqx.error_if` ends (see `_equinox_errors`).
            __equinox_jit_id__ = _equinox_errors.FRAME_MARKER  # noqa: F841
            fun_dynamic, dynamic = self._unpack(parts)
            fun = core.rebuild(fun_key, list(fun_dynamic))
            args, _ = core.rebuild(key, list(dynamic))
            # Runs only when JAX traces (a new program): recorded whether or not explained.
            _explain.on_trace(records, "filter_pmap", core, fun, args, {})
            fun = self._traced_fun(fun, args)
            if uniform_out:
                out = run_and_split_output(fun, args, {}, core)
            else:
                _equinox_errors.fresh_stacks()
                out = _group_output(core, fun(*args), out_axes, groups)
            if _equinox_errors.trace_has_check():
                # Its calls wait for the result from now on (see `run`), so they must not
                # be reached without Python. Sticky: a program traced again for other
                # shapes keeps waiting.
                self.error_checks[made[0]] = True
                self.fast_programs.pop(key, None)
            return out

        parallelised.__name__ = parallelised.__qualname__ = self.name
        pmap_out_axes: Any = self.out_axis if uniform_out else (None, *range(groups), None)
        pmapped = jax.pmap(
            parallelised,
            axis_name=self.axis_name,
            in_axes=self._in_axes(leaf_axes),
            out_axes=pmap_out_axes,
            axis_size=self.axis_size,
            donate_argnums=() if self.donate == "none" else (0, 1) if self.num_leading else (0,),
            **self.pmapkwargs,
        )
        made.append(pmapped)
        self.error_checks[pmapped] = False
        return pmapped

    def run(self, pmapped, fun_dynamic, dynamic):
        watching = _equinox_errors.watching()  # before dispatch: it silences callback logs
        with _equinox_errors.translated():
            out = call_donating(
                self.silence_unused_donation, pmapped, *self.parts(fun_dynamic, dynamic)
            )
            if watching and self.has_check(pmapped):
                # Devices run asynchronously: wait, so that a failed `eqx.error_if` is
                # raised by this call rather than when `out` is used. Only programs
                # holding a check wait; every other call stays asynchronous.
                try:
                    jax.block_until_ready(out)
                except Exception:
                    _forget_failed_effects()
                    raise
        return out

    def finish(self, out):
        if self.uniform_out and not self.routes_nnx:
            return rebuild_output(out, self.core)
        return _ungroup_output(self.core, out)


def _forget_failed_effects() -> None:
    """Drop the per-device effect tokens of a pmapped call whose host callback failed.

    JAX keeps each device's last effect token and waits on it at exit (and in
    `jax.effects_barrier`); later calls through its C++ fast path do not replace it. Once
    this call has raised the failure, the failed token would only raise it again at exit,
    as an "Exception ignored in atexit callback" traceback. Tokens that completed are
    kept."""
    try:
        from jax._src import dispatch

        tokens = dispatch.runtime_tokens.output_runtime_tokens
    except (ImportError, AttributeError):  # a JAX that keeps no such tokens
        return
    for device, token in list(tokens.items()):
        try:
            token.block_until_ready()
        except Exception:
            tokens.pop(device, None)


# Compiled programs of every filter_pmap function (see `filterjax._caches`).
_PMAP_PROGRAMS = _caches.ProgramCache()


def _pmap_program_key(core, fun_key, in_axes, out_axes, axis_name, axis_size, donate, kwargs):
    try:
        _, axes_key = core.flatten_split((in_axes, out_axes), _never)
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

    __slots__ = _PMAP_FIELDS + ("_donate", "_state", "_dispatch", "__dict__", "__weakref__")
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
        self._dispatch: Any = None
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

    def _ready(self) -> tuple[_PmapProgram, tuple]:
        """(the shared program, fun's array leaves): made on first call, since
        unflattening may hand this wrapper placeholder children that are never called."""
        state = self._state
        if state is None:
            core = _backend._core
            try:
                fun_dynamic, fun_key = core.flatten_split(callable_as_tree(self._fun))
            except UnhashableStaticError as err:
                raise with_call_path(err, ("fun",)) from err.__cause__
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
            leading = tuple(fun_dynamic)  # as the Dispatcher holds it
            # The per-call path: the core's Dispatcher, as for filter_jit, on this
            # program's fast tables; it calls `_slow_call` for everything else. It holds
            # the wrapper weakly, so that wrapper and Dispatcher form no reference cycle.
            self._dispatch = core.Dispatcher(
                program.plans,
                program.fast_programs,
                IDENTITY_PLAN,
                functools.partial(_slow_call_of, weakref.ref(self)),
                OutputSpec,
                leading,
                program.fast,
                _fast_error,
            )
            state = self._state = (program, leading)
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
            # Split as the Dispatcher splits a call, `(args, kwargs)`, for the same key.
            dynamic, key = program.core.flatten_split((args, {}), is_leaf=is_leaf)
        except UnhashableStaticError as err:
            raise with_call_path(err, ("args", "kwargs")) from err.__cause__
        if program.uniform_in and in_axes is self._in_axes:
            return key, None, dynamic
        leaves, _ = program.core.flatten_split(args, _always, hashed=False)
        axes = _leaf_axes(in_axes, args, leaves, "in_axes")
        leaf_axes = tuple(a for a, m in zip(axes, key.mask, strict=True) if m)
        return key, leaf_axes, tuple(dynamic)

    def __call__(self, /, *args, **kwargs):
        dispatch = self._dispatch
        if dispatch is None:
            self._ready()
            dispatch = self._dispatch
        try:
            return dispatch(*args, **kwargs)
        except _Undiagnosed as wrapped:
            # A compiled program refused arrays that its static signature matched (mapped
            # axes of different sizes, say): explain which arguments, as the fallback does.
            err = wrapped.error
        program, _ = self._ready()
        key, leaf_axes, dynamic = self._call_args(program, args)
        better = self._diagnose(program, args, key, leaf_axes, dynamic)
        if better is None:
            raise err from err.__cause__
        raise better from err

    def _slow_call(self, args: tuple, kwargs: dict) -> Any:
        """A call off the Dispatcher's fast path: the first of its shape or static
        signature, per-leaf axes, split outputs, `axis_size`, NNX, errors."""
        _check_no_kwargs(kwargs, "filter_pmap")
        program, fun_dynamic = self._ready()
        variables: list | None = [] if program.routes_nnx else None
        key, leaf_axes, dynamic = self._call_args(program, args, variables)
        if variables:
            _nnx.check_pmap_call(program.name, args, variables, leaf_axes)
        self._require_mapped(program, leaf_axes, dynamic)
        try:
            pmapped = program.pmap_for(key, leaf_axes, fun_dynamic, dynamic)
            out = program.run(pmapped, fun_dynamic, dynamic)
        except _nnx.Reroute:
            out = _nnx.Reroute  # called again outside the handler: no chained exception
        except (ValueError, IndexError) as err:  # jax.pmap: IndexError for a missing axis
            better = self._diagnose(program, args, key, leaf_axes, dynamic)
            if better is None:
                raise
            raise better from err
        if out is _nnx.Reroute:
            # NNX objects in the arguments: every program of this function must now return
            # their updates, so the ordinary ones made so far are dropped.
            program.routes_nnx = True
            program.table.clear()
            program.forget_fast()
            return self._slow_call(args, {})
        if variables is None:
            if program.fast and leaf_axes is None and not program.has_check(pmapped):
                # Later calls of this shape and static signature skip Python.
                _caches.bounded_insert(program.fast_programs, key, pmapped)
                _caches.bounded_insert(program.plans, len(args), IDENTITY_PLAN)
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
        flat = program.parts(fun_dynamic, dynamic)
        try:
            lowered = program.pmap_for(key, leaf_axes, fun_dynamic, dynamic).lower(*flat)
        except _nnx.Reroute:
            program.table.clear()  # the ordinary program just made is of no use
            raise _nnx.lower_error(program.name) from None
        except (ValueError, IndexError) as err:
            better = self._diagnose(program, args, key, leaf_axes, dynamic)
            if better is None:
                raise
            raise better from err
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


def _slow_call_of(ref: weakref.ref, leading: tuple, args: tuple, kwargs: dict) -> Any:
    """The Dispatcher's fallback: the wrapper's `_slow_call`."""
    wrapper = ref()
    assert wrapper is not None, "the Dispatcher lives only as long as its wrapper"
    return wrapper._slow_call(args, kwargs)


class _Undiagnosed(Exception):
    """Carries a compiled program's ValueError/IndexError from the Dispatcher to the
    wrapper, which names the arguments at fault; never seen outside filterjax."""

    def __init__(self, error: BaseException):
        super().__init__(error)
        self.error = error


def _fast_error(err: BaseException) -> BaseException | None:
    """The Dispatcher's `on_error`: Equinox's exception for a failed check; errors that
    mapped axes may explain go to the wrapper (`_Undiagnosed`); others as raised."""
    replacement = _equinox_errors.replacement_for(err)
    if replacement is None and isinstance(err, ValueError | IndexError):
        return _Undiagnosed(err)
    return replacement


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


def _shapes(leaves: Sequence) -> tuple:
    return tuple((np.shape(leaf), getattr(leaf, "dtype", None)) for leaf in leaves)


def _group_output(core: Any, out: Any, out_axes: Any, groups: int) -> tuple:
    """Inside the trace: split the output into one list per (non-negative) out axis."""
    leaves, out_key = core.flatten_split(out, _always, hashed=False)
    axes = _leaf_axes(out_axes, out, leaves, "out_axes")
    by_axis: list[list] = [[] for _ in range(groups)]
    unmapped: list = []
    placement: list[tuple[int | None, Any]] = []
    for leaf, axis in zip(leaves, axes, strict=True):
        if axis is not None:
            axis = _normalise_out_axis(axis, leaf)
            if axis >= groups:  # the abstract pass saw every output leaf of this trace
                raise AssertionError(f"filter_pmap: out axis {axis} beyond the {groups} planned")
            placement.append((axis, len(by_axis[axis])))
            by_axis[axis].append(leaf)
        elif _backend.is_array_fast(leaf):
            placement.append((-1, len(unmapped)))
            unmapped.append(leaf)
        else:
            placement.append((None, leaf))
    spec = {OutputSpec(_GroupedOutput(out_key, tuple(placement))): ()}
    return (spec, *by_axis, unmapped)


def _ungroup_output(core: Any, out: tuple) -> Any:
    ((spec, _),) = out[0].items()
    grouped = spec.key
    groups = out[1:]
    leaves = [
        value if group is None else groups[group][value] for group, value in grouped.placement
    ]
    return core.rebuild(grouped.key, leaves)


_PMAP_DONATE_MODES = ("all", "warn", "none")
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
    fun=NO_FUNCTION,
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

    The parallelised version of `fun`. It returns as soon as the computation is
    dispatched (JAX's asynchronous dispatch), like `jax.pmap`; only a program holding an
    Equinox error check (`eqx.error_if`) waits for its result, so that a failed check
    raises `equinox.EquinoxRuntimeError` at the call that caused it.

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
    check_options("filter_pmap", donate, _PMAP_DONATE_MODES, pmapkwargs, _RESERVED_PMAP_KWARGS)
    if fun is NO_FUNCTION:
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
