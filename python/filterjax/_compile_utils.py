"""Compile plumbing shared by the transforms that trace a function once per static
signature (filter_jit, filter_pmap, filter_eval_shape, filter_make_jaxpr, ...).

Nothing here belongs to one transform: the donation modes, their check and their
unused-donation warning; the locked, bounded table of programs per static signature; the
callable-as-PyTree classes; the one way a trace's static output travels out (through
JAX's output treedef) and is rebuilt; naming a leaf's path from the call;
`Lowered`/`Compiled`.
"""

from __future__ import annotations

import functools
import threading
import types
import warnings
from collections.abc import Callable
from typing import Any, Generic, Literal, TypeVar

import jax
import jax.tree_util as jtu

from . import _backend, _caches, _equinox_errors
from ._errors import UnhashableStaticError, rename_root, unhashable_message

_T = TypeVar("_T")

Donate = Literal["all", "all-except-first", "warn", "warn-except-first", "none"]
DONATE_MODES = ("all", "all-except-first", "warn", "warn-except-first", "none")
UNUSED_DONATION = "Some donated buffers were not usable*"


def check_options(
    transform: str, donate: str, modes: tuple[str, ...], kwargs: dict, reserved: frozenset
) -> None:
    """Refuse a `donate` mode outside `modes`, and options of JAX's transform that
    filterjax sets itself (`reserved`)."""
    if donate not in modes:
        listed = ", ".join(repr(mode) for mode in modes[:-1])
        raise ValueError(
            f"`{transform}(..., donate=...)` must be one of {listed}, or {modes[-1]!r}; "
            f"got {donate!r}."
        )
    clash = reserved.intersection(kwargs)
    if clash:
        raise ValueError(
            f"{transform} decides {sorted(clash)} itself: arrays are traced, everything "
            "else is static; use `donate=` for donation."
        )


def call_donating(silence_unused: bool, program: Callable, *args: Any) -> Any:
    """`program(*args)`, with JAX's warning about donated buffers it could not use
    silenced when `silence_unused` (the modes `'all'` and `'all-except-first'`)."""
    if not silence_unused:
        return program(*args)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=UNUSED_DONATION)
        return program(*args)


class SignatureTable:
    """Compiled programs by static signature: bounded (oldest forgotten first beyond
    `_caches.MAX_SIGNATURES`), each made once however many threads miss it.

    `programs` is a plain dict, which the core's Dispatchers read in place. The lock is
    reentrant: a key comparison runs a static leaf's `__eq__`, user code that may call
    the same transformed function from the thread holding the lock.
    """

    __slots__ = ("programs", "_lock")

    def __init__(self) -> None:
        self.programs: dict = {}
        self._lock = threading.RLock()

    def get_or_make(self, key: Any, make: Callable[[], Any]) -> Any:
        found = self.programs.get(key)
        if found is None:
            with self._lock:
                found = self.programs.get(key)
                if found is None:
                    found = make()
                    _caches.bounded_insert(self.programs, key, found)
        return found

    def clear(self) -> list:
        """Forget every program; returns them (to clear JAX's caches of each)."""
        programs = list(self.programs.values())
        self.programs.clear()
        return programs


# ---------------------------------------------------------------------------------------
# `fun` as a PyTree: a functools.partial or bound method holding arrays has them traced.


class PartialTree:
    """A functools.partial seen as a PyTree, so the arrays it holds are traced."""

    __slots__ = ("func", "args", "keywords")

    def __init__(self, func, args, keywords):
        self.func = func
        self.args = args
        self.keywords = keywords

    def __call__(self, *args, **kwargs):
        return self.func(*self.args, *args, **{**self.keywords, **kwargs})


class MethodTree:
    """A bound method seen as a PyTree (`__func__`, `__self__`)."""

    __slots__ = ("func", "instance")

    def __init__(self, func, instance):
        self.func = func
        self.instance = instance

    def __call__(self, *args, **kwargs):
        return self.func(self.instance, *args, **kwargs)


jtu.register_pytree_node(
    PartialTree,
    lambda p: ((p.func, p.args, p.keywords), None),
    lambda _, children: PartialTree(*children),
)
jtu.register_pytree_node(
    MethodTree,
    lambda m: ((m.func, m.instance), None),
    lambda _, children: MethodTree(*children),
)


def callable_as_tree(fun: Any) -> Any:
    if type(fun) is functools.partial:
        return PartialTree(callable_as_tree(fun.func), fun.args, dict(fun.keywords))
    if type(fun) is types.MethodType:
        return MethodTree(callable_as_tree(fun.__func__), fun.__self__)
    return fun


def callable_from_tree(tree: Any) -> Any:
    """Inverse of `callable_as_tree`: the callable as the user gave it."""
    if type(tree) is PartialTree:
        return functools.partial(callable_from_tree(tree.func), *tree.args, **tree.keywords)
    if type(tree) is MethodTree:
        return types.MethodType(callable_from_tree(tree.func), tree.instance)
    return tree


def has_shape_and_dtype(leaf: Any) -> bool:
    """Arrays, `jax.ShapeDtypeStruct`s and anything else with `.shape` and `.dtype`."""
    return hasattr(leaf, "shape") and hasattr(leaf, "dtype")


def is_array_or_struct(leaf: Any) -> bool:
    """Traced by the abstract transforms: arrays and `jax.ShapeDtypeStruct`s."""
    return _backend.is_array_fast(leaf) or isinstance(leaf, jax.ShapeDtypeStruct)


class OutputSpec:
    """The static part of a trace's output, carried out of the trace by JAX itself.

    Every transform returns its traced function's output as `{OutputSpec(key): dynamic
    leaves}` (`split_output`): JAX keeps dict keys in the output treedef, so the key comes
    back with the results (and, under `jax.jit`, on every later call of the compiled
    program with no Python callback), and `join_output` rebuilds the output. Equal when
    the keys are equal, since JAX compares treedefs (a custom_vjp's primal and forward
    outputs, say).
    """

    __slots__ = ("key",)

    def __init__(self, key):
        self.key = key

    def __eq__(self, other: object) -> bool:
        return type(other) is OutputSpec and (self.key is other.key or bool(self.key == other.key))

    def __hash__(self) -> int:
        # Constant: consistent with `__eq__`, free (a spec is the only key of its dict) and
        # never raises, so static outputs need not be hashable.
        return 0x5EC

    def __repr__(self) -> str:
        return "<filterjax output>"


def split_output(out: Any, core: Any = None, predicate: Any = None) -> dict:
    """Inside a trace: `{OutputSpec(key): dynamic leaves}` for JAX to return (the dynamic
    leaves are `out`'s arrays, or those `predicate` picks)."""
    dynamic, key = (core or _backend).flatten_split(out, predicate, hashed=False)
    return {OutputSpec(key): dynamic}


def output_parts(out: Any) -> tuple[Any, Any]:
    """`(key, leaves)` of what `split_output` made, as JAX returned it."""
    ((spec, leaves),) = out.items()
    return spec.key, leaves


def join_output(out: Any, core: Any = None, statics: Any = None) -> Any:
    """The output `split_output` split, with the leaves JAX returned (and `statics` in
    place of the static leaves, if given)."""
    key, leaves = output_parts(out)
    return (core or _backend).rebuild(key, leaves, statics)


def run_and_split_output(fun: Callable, args: tuple, kwargs: dict, core: Any = None) -> Any:
    # This frame is where the stack of an `eqx.error_if` ends: Equinox records the marker
    # held in this local, and `_equinox_errors.translate` cuts there.
    __equinox_jit_id__ = _equinox_errors.FRAME_MARKER  # noqa: F841
    _equinox_errors.fresh_stacks()
    try:
        out = fun(*args, **kwargs)
    finally:  # and this trace's stacks are not reused by later traces either
        _equinox_errors.fresh_stacks()
    split = split_output(out, core)
    if next(iter(split)).key.num_static == 0:
        # JAX rebuilds an all-array output itself, from the output treedef of the trace,
        # with no rebuild of ours per call. A lone dict keyed by an OutputSpec is how a
        # trace with static outputs says so, so such an output is always split.
        if not (type(out) is dict and len(out) == 1 and type(next(iter(out))) is OutputSpec):
            return out
    return split


def rebuild_output(out: Any, core: Any = None) -> Any:
    """The output of a program whose trace ran `run_and_split_output` (split or not)."""
    if type(out) is dict and len(out) == 1:
        ((spec, leaves),) = out.items()
        if type(spec) is OutputSpec:
            return (core or _backend).rebuild(spec.key, leaves)
    return out


def with_call_path(err: UnhashableStaticError, roots: tuple[str, ...]) -> UnhashableStaticError:
    """The same error, with the leaf's path named from the call (`args[1]['cfg']`)."""
    where = rename_root(err.path, roots) if len(roots) > 1 else roots[0] + jtu.keystr(err.path)
    message = unhashable_message(where, err.leaf_type or object, err.__cause__)
    return UnhashableStaticError(message, err.path, err.leaf_type)


class Lowered(Generic[_T]):
    """A `filter_jit` function lowered for one call signature (see `JitFunction.lower`).

    `owner` is the wrapper it was lowered from, for compiled types that need it.
    """

    def __init__(self, program: Any, leading: Any, lowered, key, owner: Any = None):
        self._program = program
        self._leading = leading
        self._lowered = lowered
        self._key = key
        self._owner = owner

    def as_text(self, *args, **kwargs) -> str:
        """The lowered program as text (StableHLO by default)."""
        return self._lowered.as_text(*args, **kwargs)

    def compiler_ir(self, *args, **kwargs):
        return self._lowered.compiler_ir(*args, **kwargs)

    def compile(self, *args, **kwargs) -> Compiled[_T]:
        """Compile the lowered program."""
        compiled = self._lowered.compile(*args, **kwargs)
        return self._compiled_type(self._program, self._leading, compiled, self._key, self._owner)

    @property
    def _compiled_type(self) -> type[Compiled]:
        return Compiled


class Compiled(Generic[_T]):
    """A compiled `filter_jit` program, callable with the arguments it was lowered for."""

    def __init__(self, program: Any, leading: Any, compiled, key, owner: Any = None):
        self._program = program
        self._leading = leading
        self._compiled = compiled
        self._key = key
        self._owner = owner

    def as_text(self, *args, **kwargs) -> str:
        return self._compiled.as_text(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> _T:
        key, dynamic = self._program.arguments(args, kwargs)
        if key != self._key:
            raise TypeError(
                f"This compiled {self._program.name} was lowered for arguments with another "
                "tree structure or other static (non-array) values than the ones it was "
                "called with. Lower and compile again for these arguments, or call the "
                "filter_jit function itself (which compiles as needed)."
            )
        with _equinox_errors.translated():
            out = self._compiled(*self._program.head(self._leading), *dynamic)
        return rebuild_output(out, self._program.core)
