"""filter_jit: `jax.jit` that traces every array leaf and holds everything else static.

Per call, the work outside JAX is one native call (the core's `Dispatcher`): look up the
argument-binding plan of the call's shape and apply it (so keyword calls share the
positional calls' programs at the same cost), one `partition` of `(args, kwargs)` giving
the flat dynamic leaves and a hashable static key, one dict lookup of the `jax.jit`
compiled for that key, a call of it with the flat array leaves only (JAX's C++ dispatch
sees no static argument), and one `rebuild` of the output. The output's static part
travels back through JAX's own output treedef, so it is right for every traced signature
and costs no Python callback. Nothing blocks: JAX's asynchronous dispatch is kept.

Compiled programs belong to the function, not to the wrapper (Equinox's semantics): every
`filter_jit(f)` around an equal `f` with equal options shares one `_JitProgram`, found in a
bounded cache keyed on `f`'s static part. A wrapper is that program plus `f`'s own array
leaves, and is a PyTree of them.
"""

from __future__ import annotations

import functools
import inspect
import threading
import types
import warnings
from collections.abc import Callable
from typing import (
    Any,
    Concatenate,
    Generic,
    Literal,
    ParamSpec,
    Protocol,
    TypeVar,
    overload,
)

import jax
import jax.tree_util as jtu

from . import _backend, _caches, _equinox_errors, _explain
from ._errors import STATIC_INDEX_ATTR, UnhashableStaticError, rename_root, unhashable_message
from ._pycore import apply_plan
from ._wrapper import Wrapper, callable_name, metadata_of

__all__ = ["filter_jit"]

_P = ParamSpec("_P")
_Q = ParamSpec("_Q")
_T = TypeVar("_T")

_Donate = Literal["all", "all-except-first", "warn", "warn-except-first", "none"]
_DONATE_MODES = ("all", "all-except-first", "warn", "warn-except-first", "none")
_UNUSED_DONATION = "Some donated buffers were not usable*"
# jax.jit options that filter_jit decides itself.
_RESERVED_JIT_KWARGS = frozenset(
    {"static_argnums", "static_argnames", "donate_argnums", "donate_argnames"}
)


# ---------------------------------------------------------------------------------------
# `fun` as a PyTree: a functools.partial or bound method holding arrays has them traced.


class _PartialTree:
    """A functools.partial seen as a PyTree, so the arrays it holds are traced."""

    __slots__ = ("func", "args", "keywords")

    def __init__(self, func, args, keywords):
        self.func = func
        self.args = args
        self.keywords = keywords

    def __call__(self, *args, **kwargs):
        return self.func(*self.args, *args, **{**self.keywords, **kwargs})


class _MethodTree:
    """A bound method seen as a PyTree (`__func__`, `__self__`)."""

    __slots__ = ("func", "instance")

    def __init__(self, func, instance):
        self.func = func
        self.instance = instance

    def __call__(self, *args, **kwargs):
        return self.func(self.instance, *args, **kwargs)


jtu.register_pytree_node(
    _PartialTree,
    lambda p: ((p.func, p.args, p.keywords), None),
    lambda _, children: _PartialTree(*children),
)
jtu.register_pytree_node(
    _MethodTree,
    lambda m: ((m.func, m.instance), None),
    lambda _, children: _MethodTree(*children),
)


def _callable_as_tree(fun: Any) -> Any:
    if type(fun) is functools.partial:
        return _PartialTree(_callable_as_tree(fun.func), fun.args, dict(fun.keywords))
    if type(fun) is types.MethodType:
        return _MethodTree(_callable_as_tree(fun.__func__), fun.__self__)
    return fun


def _callable_from_tree(tree: Any) -> Any:
    """Inverse of `_callable_as_tree`: the callable as the user gave it."""
    if type(tree) is _PartialTree:
        return functools.partial(_callable_from_tree(tree.func), *tree.args, **tree.keywords)
    if type(tree) is _MethodTree:
        return types.MethodType(_callable_from_tree(tree.func), tree.instance)
    return tree


# ---------------------------------------------------------------------------------------
# Argument binding, cached per call shape (number of positionals, keyword names).


class _Slot:
    """Placeholder bound in place of a real argument, to learn where each one lands."""

    __slots__ = ("source",)

    def __init__(self, source: int | str):
        self.source = source


class _IdentityPlan:
    """The plan of calls already in the function's normal form: arguments pass as given."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<identity plan>"


IDENTITY_PLAN = _IdentityPlan()


def _make_plan(signature: inspect.Signature | None, args: tuple, kwargs: dict) -> Any:
    """How calls shaped like `(args, kwargs)` map onto `signature.bind(...)`'s normal form.

    `IDENTITY_PLAN`, or `(argument sources, ((keyword, source), ...))` where a source is a
    position in the call's `args` or a name in its `kwargs`: the form the core's
    Dispatchers apply (`_pycore.apply_plan`). Raises the TypeError `signature.bind` raises
    when such calls can't bind.
    """
    if signature is None:
        return IDENTITY_PLAN
    bound = signature.bind(*map(_Slot, range(len(args))), **{k: _Slot(k) for k in kwargs})
    arg_sources = tuple(slot.source for slot in bound.args)
    kwarg_sources = tuple((name, slot.source) for name, slot in bound.kwargs.items())
    if arg_sources == tuple(range(len(args))) and all(n == s for n, s in kwarg_sources):
        return IDENTITY_PLAN
    return arg_sources, kwarg_sources


def _signature_of(fun: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(fun)
    except (TypeError, ValueError):  # some builtins have none; pass arguments through
        return None


def _bind_error(name: str, err: TypeError) -> TypeError:
    return TypeError(f"{name}() {err}")


# ---------------------------------------------------------------------------------------
# The traced function and its output.


class _OutputSpec:
    """Static part of one trace's output.

    Returned from the traced function as the single key of a dict
    (`{_OutputSpec(key): dynamic_leaves}`), so that JAX stores it in the compiled
    signature's output treedef and hands the same object back on every call. Hashed by
    identity, so unhashable static outputs are fine.
    """

    __slots__ = ("key",)

    def __init__(self, key):
        self.key = key

    def __repr__(self) -> str:
        return "<filterjax output>"


def _run_and_split_output(fun: Callable, args: tuple, kwargs: dict, core: Any = None) -> Any:
    # This frame is where the stack of an `eqx.error_if` ends: Equinox records the marker
    # held in this local, and `_equinox_errors.translate` cuts there.
    __equinox_jit_id__ = _equinox_errors.FRAME_MARKER  # noqa: F841
    out = fun(*args, **kwargs)
    out_dynamic, out_key = (core or _backend).partition(out, None, None, False)
    if out_key.num_static == 0:
        # JAX rebuilds an all-array output itself, from the output treedef of the trace.
        # A lone dict keyed by an _OutputSpec is how a trace with static outputs says so.
        if not (type(out) is dict and len(out) == 1 and type(next(iter(out))) is _OutputSpec):
            return out
    return {_OutputSpec(out_key): out_dynamic}


def _rebuild_output(out: Any, core: Any = None) -> Any:
    if type(out) is dict and len(out) == 1:
        ((spec, leaves),) = out.items()
        if type(spec) is _OutputSpec:
            return (core or _backend).rebuild(spec.key, leaves)
    return out


def _make_traced(program: _JitProgram, key: Any) -> Callable:
    """The function handed to `jax.jit` for one static signature: the function's own array
    leaves (unless it has none) and the arguments' array leaves in, as flat sequences (one
    per argument of the `jax.jit`: JAX flattens a list in one pass but builds a tree
    structure per argument), the output split for JAX out."""
    core = program.core
    fun_key = program.fun_key
    static_fun = program.static_fun

    def fun_and_dynamic(parts: tuple) -> tuple[Callable, tuple]:
        if static_fun is not None:  # no `leading` argument
            return static_fun, parts
        return core.rebuild(fun_key, parts[0]), parts[1:]

    if program.split_first:
        first_key, rest_key = key

        def traced_first_apart(*parts):
            fun, (first_dynamic, rest_dynamic) = fun_and_dynamic(parts)
            (first,) = core.rebuild(first_key, first_dynamic)
            rest_args, kwargs = core.rebuild(rest_key, rest_dynamic)
            if _explain.enabled:  # runs only when JAX traces: a new program
                _explain.on_trace("filter_jit", core, fun, (first, *rest_args), kwargs)
            return _run_and_split_output(fun, (first, *rest_args), kwargs, core)

        traced: Callable = traced_first_apart
    else:

        def traced_together(*parts):
            fun, (dynamic,) = fun_and_dynamic(parts)
            args, kwargs = core.rebuild(key, dynamic)
            if _explain.enabled:  # runs only when JAX traces: a new program
                _explain.on_trace("filter_jit", core, fun, args, kwargs)
            return _run_and_split_output(fun, args, kwargs, core)

        traced = traced_together
    traced.__name__ = program.name
    traced.__qualname__ = program.qualname
    return traced


# ---------------------------------------------------------------------------------------


class JitFunction(Protocol[_P, _T]):
    """What `filter_jit` returns: called like the wrapped function, with `.lower(...)`.

    Defined on a class, it binds like a method (`instance.f(x)` calls `f(instance, x)`).
    """

    def __call__(self, *args: _P.args, **kwargs: _P.kwargs) -> _T: ...

    def lower(self, *args: _P.args, **kwargs: _P.kwargs) -> Lowered[_T]: ...

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> JitFunction[_P, _T]: ...

    @overload
    def __get__(
        self: JitFunction[Concatenate[Any, _Q], _T], instance: object, owner: type | None = None
    ) -> Callable[_Q, _T]: ...


_UNSET: Any = object()


class _JitProgram:
    """Everything compiled for one function (by its static part) and one set of options.

    Shared by every wrapper around an equal function: the plans (per call shape) and the
    programs (one `jax.jit` per static signature of the arguments) live here, and the
    wrappers' Dispatchers read them in place. A wrapper adds only the function's own
    array leaves (`leading`). Bound to the core (native or Python) it was made with.
    """

    def __init__(self, core: Any, fun: Callable, fun_key: Any, donate: _Donate, jitkwargs):
        self.core = core
        self.fun_key = fun_key
        self.donate = donate
        self.jitkwargs = jitkwargs
        self.num_leading = fun_key.num_dynamic
        # A function holding no arrays is rebuilt once, not in every trace.
        self.static_fun = None if self.num_leading else core.rebuild(fun_key, [])
        self.signature = _signature_of(fun)
        self.name = callable_name(fun)
        self.qualname = getattr(fun, "__qualname__", None) or self.name
        self.split_first = donate in ("all-except-first", "warn-except-first")
        self.silence_unused_donation = donate in ("all", "all-except-first")
        self.plans: dict = {}
        self.programs: dict = {}
        self._lock = threading.Lock()
        self.wrapper_class = _wrapper_class(core)
        self.fast = not (self.split_first or self.silence_unused_donation)
        self.metadata = metadata_of(fun)
        _caches.register_owner(self)

    def wrap(self, leading: Any, fn: Any = _UNSET) -> Any:
        """A wrapper (a `filter_jit` function) around this program and `leading`.

        `fn` is the wrapper's first PyTree child (the function's name, as in Equinox),
        kept as given so that flattening returns what unflattening got."""
        wrapper = self.wrapper_class(
            # `self._call` is bound here, not stored on the program: a program in a
            # reference cycle is freed by the cyclic GC, and measured that way each freed
            # `jax.jit` left ~1 MB of its executable's memory behind (test_jit's memory
            # test); freed by reference counting, nothing is left.
            self.plans,
            self.programs,
            IDENTITY_PLAN,
            self._call,
            _OutputSpec,
            leading,
            self.fast,
            _equinox_errors.replacement_for,
        )
        attributes = wrapper.__dict__
        attributes["_program"] = self
        attributes["fn"] = self.name if fn is _UNSET else fn
        attributes.update(self.metadata)
        return wrapper

    def _clear_cache(self) -> None:
        programs = list(self.programs.values())
        self.programs.clear()
        self.plans.clear()
        for jitted in programs:
            jitted.clear_cache()

    # Equality by what the program was made for: the treedefs of two wrappers around
    # equal functions compare equal even if one program was evicted and made again.
    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if type(other) is not _JitProgram:
            return NotImplemented
        return (
            self.core is other.core
            and self.donate == other.donate
            and self.jitkwargs == other.jitkwargs
            and self.fun_key == other.fun_key
        )

    def __hash__(self) -> int:
        return hash((self.donate, self.fun_key))

    def __repr__(self) -> str:
        return f"<filter_jit program of {self.qualname}>"

    # -- the slow path ------------------------------------------------------------------

    def bind(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        shape = (len(args), tuple(kwargs)) if kwargs else len(args)
        plan = self.plans.get(shape)
        if plan is None:
            try:
                plan = _make_plan(self.signature, args, kwargs)
            except TypeError as err:
                raise _bind_error(self.qualname, err) from None
            self.plans[shape] = plan
        if plan is IDENTITY_PLAN:
            return args, kwargs
        bound = apply_plan(plan, args, kwargs)
        assert bound is not None, "a plan made for this call shape always fits it"
        return bound

    def arguments(self, args: tuple, kwargs: dict) -> tuple[Any, tuple]:
        """The call's static key, and its dynamic leaves as the arguments the program takes
        after the function's own leaves: `(dynamic,)`, or `(first, rest)` with the first
        argument kept undonated."""
        args, kwargs = self.bind(args, kwargs)
        partition = self.core.partition
        try:
            if self.split_first:
                if not args:
                    raise TypeError(
                        f"filter_jit(donate={self.donate!r}) needs at least one positional "
                        f"argument to keep undonated; {self.name}() was called without one."
                    )
                first_dynamic, first_key = partition((args[0],))
                rest_dynamic, rest_key = partition((args[1:], kwargs))
                return (first_key, rest_key), (first_dynamic, rest_dynamic)
            dynamic, key = partition((args, kwargs))
        except UnhashableStaticError as err:
            raise _renamed(err, ("args", "kwargs")) from err.__cause__
        return key, (dynamic,)

    def program_for(self, key: Any, args: tuple, kwargs: dict) -> Any:
        """The `jax.jit` for this static signature, made on first use."""
        try:
            jitted = self.programs.get(key)
        except Exception as err:
            raise _static_comparison_error(args, kwargs, err) from err
        if jitted is None:
            with self._lock:  # one `jax.jit` per signature, however many threads miss it
                jitted = self.programs.get(key)
                if jitted is None:
                    jitted = jax.jit(
                        _make_traced(self, key),
                        donate_argnums=self._donated(key),
                        **self.jitkwargs,
                    )
                    _caches.bounded_insert(self.programs, key, jitted)
        return jitted

    def head(self, leading: tuple) -> tuple:
        """The program's arguments before the call's: `(leading,)`, or none at all for a
        function without arrays (as the Dispatchers call it)."""
        return (leading,) if self.num_leading else ()

    def _donated(self, key: Any) -> tuple[int, ...]:
        """Which arguments of the `jax.jit` are donated: [leading,] dynamic or, with the
        first argument kept, [leading,] rest (not first)."""
        if self.donate == "none":
            return ()
        heads = 1 if self.num_leading else 0
        if self.split_first:
            return (*range(heads), heads + 1)
        return tuple(range(heads + 1))

    def _call(self, leading: tuple, args: tuple, kwargs: dict) -> Any:
        """A call off the Dispatcher's fast path: first of its shape or static signature,
        donation modes, errors."""
        key, dynamic = self.arguments(args, kwargs)
        jitted = self.program_for(key, args, kwargs)
        _equinox_errors.watching()  # once Equinox is imported, silence its callback logs
        with _equinox_errors.translated():
            if self.silence_unused_donation:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=_UNUSED_DONATION)
                    out = jitted(*self.head(leading), *dynamic)
            else:
                out = jitted(*self.head(leading), *dynamic)
        return _rebuild_output(out, self.core)

    def lower(self, leading: tuple, args: tuple, kwargs: dict) -> Lowered:
        key, dynamic = self.arguments(args, kwargs)
        jitted = self.program_for(key, args, kwargs)
        return Lowered(self, leading, jitted.lower(*self.head(leading), *dynamic), key)


class _JitWrapperBase(Wrapper):
    """What `filter_jit` returns (see `filter_jit`): a core `Dispatcher` and a PyTree.

    Its children are laid out as Equinox's: the function's name, then the function's
    array leaves; its static part is the shared `_JitProgram`. Unflattening makes a new
    wrapper around the same program, so it keeps every compiled program.
    """

    __slots__ = ()
    _transform = "filter_jit"
    _child_names = ("fn", "_dynamic_fun")
    # Set per instance by `_JitProgram.wrap` (`leading` is the Dispatcher's).
    fn: Any
    _program: _JitProgram
    leading: tuple

    def _tree_flatten(self) -> tuple[tuple, Any]:
        return (self.fn, self.leading), self._program

    @classmethod
    def _tree_unflatten(cls, program: Any, children: Any) -> Any:
        fn, leading = children
        return program.wrap(leading, fn)

    def _wrapped(self) -> Any:
        program = self._program
        return _callable_from_tree(program.core.rebuild(program.fun_key, self.leading))

    def _reduce(self) -> tuple[Callable, tuple]:
        program = self._program
        return _remake, (self._wrapped(), program.donate, program.jitkwargs)

    def lower(self, /, *args: Any, **kwargs: Any) -> Lowered:
        """Lower for these arguments (ahead-of-time compilation).

        **Returns:**

        A `Lowered` object with `.as_text()` and `.compile()`; the compiled object is
        called with the same arguments (static ones included) as this function.
        """
        return self._program.lower(self.leading, args, kwargs)

    def __hash__(self) -> int:
        return hash((self._program, tuple(self.leading)))


def _remake(fun: Callable, donate: _Donate, jitkwargs: dict) -> Any:
    return filter_jit(fun, donate=donate, **jitkwargs)


_wrapper_classes: dict[str, type] = {}


def _wrapper_class(core: Any) -> type:
    """The wrapper type for a core: `_JitWrapperBase` on that core's `Dispatcher`."""
    cls = _wrapper_classes.get(core.BACKEND)
    if cls is None:
        cls = type(
            "_JitWrapper",
            (_JitWrapperBase, core.Dispatcher),
            {
                "__slots__": (),
                "__module__": __name__,
                # The Dispatcher's own construction and binding (a plain method: C-level,
                # no Python frame per call), not the generic Wrapper's.
                "__init__": core.Dispatcher.__init__,
                "__get__": core.Dispatcher.__get__,
            },
        )
        _wrapper_classes[core.BACKEND] = cls
    return cls


# Compiled programs of every filter_jit function, keyed on the function's static part
# and the options (see `filterjax._caches`).
_PROGRAMS = _caches.ProgramCache()


def _program_key(core: Any, fun_key: Any, donate: str, jitkwargs: dict) -> Any:
    try:
        options = tuple(sorted(jitkwargs.items()))
    except TypeError:
        options = tuple(jitkwargs.items())
    return (core.BACKEND, fun_key, donate, options)


def _static_comparison_error(args: tuple, kwargs: dict, err: Exception) -> TypeError:
    """Name the static leaf (path and type) whose `__eq__` broke the cache lookup: one whose
    comparison with itself fails (raises, or gives something without a truth value), else
    the one the core reported."""
    paths_and_leaves, _ = jtu.tree_flatten_with_path((args, kwargs))
    statics = [(p, leaf) for p, leaf in paths_and_leaves if not _backend.is_array_fast(leaf)]
    for path, leaf in statics:
        try:
            bool(leaf == leaf)
        except Exception as cause:
            return _static_comparison_message(path, leaf, cause)
    index = getattr(err, STATIC_INDEX_ATTR, None)
    if type(index) is int and 0 <= index < len(statics):
        return _static_comparison_message(*statics[index], err)
    return TypeError(f"A static argument could not be compared with __eq__: {err}")


def _static_comparison_message(path: Any, leaf: Any, cause: Exception) -> TypeError:
    kind = type(leaf)
    return TypeError(
        f"The __eq__ of the static leaf at {rename_root(path, ('args', 'kwargs'))} "
        f"(type {kind.__module__}.{kind.__qualname__}) raised "
        f"{type(cause).__name__}: {cause}, so this call could not be matched with "
        "earlier calls' compiled programs. Non-array leaves are static: give the type "
        "an __eq__ that returns a bool, or make the leaf dynamic by wrapping it in an "
        "array."
    )


def _renamed(err: UnhashableStaticError, roots: tuple[str, ...]) -> UnhashableStaticError:
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
        return _rebuild_output(out, self._program.core)


@overload
def filter_jit(
    *, donate: _Donate = "none", **jitkwargs: Any
) -> Callable[[Callable[_P, _T]], JitFunction[_P, _T]]: ...


@overload
def filter_jit(
    fun: Callable[_P, _T], *, donate: _Donate = "none", **jitkwargs: Any
) -> JitFunction[_P, _T]: ...


def filter_jit(fun=None, *, donate: _Donate = "none", **jitkwargs):
    """An easier-to-use version of `jax.jit`. All JAX and NumPy arrays are traced, and
    all other types are held static.

    **Arguments:**

    - `fun` is a pure function to JIT compile. It may be a PyTree itself (an Equinox
        Module, a bound method of one, a `functools.partial` holding arrays): its array
        leaves are traced too.
    - `donate` indicates whether the buffers of JAX arrays are donated or not. It should
        either be:
        - `'all'`: donate all arrays and suppress all warnings about unused buffers;
        - `'all-except-first'`: donate all arrays except for those in the first
            argument, and suppress all warnings about unused buffers;
        - `'warn'`: as above, but don't suppress unused buffer warnings;
        - `'warn-except-first'`: as above, but don't suppress unused buffer warnings;
        - `'none'`: no buffer donation. (This the default.)
    - `**jitkwargs`: any other keyword arguments of `jax.jit` (e.g. `keep_unused`,
        `inline`), passed through.

    **Returns:**

    The JIT'd version of `fun`. It returns as soon as the computation is dispatched (JAX's
    asynchronous dispatch), like `jax.jit`. It has a `.lower(*args, **kwargs)` method for
    ahead-of-time compilation.

    Calls that bind to the same arguments (positionally or by keyword) share one compiled
    program; a new static value, tree structure, or array shape/dtype compiles again.
    Compiled programs belong to the function, as in Equinox: any number of `filter_jit`
    wrappers around equal functions (with equal options) share them, so
    `filter_jit(model)(x)` in a loop compiles once. The wrapper is a PyTree (the function's
    name, then its array leaves, as Equinox lays it out), compares equal to wrappers
    around equal functions, and copies, deep-copies and pickles.

    !!! example

        ```python
        >>> import jax.numpy as jnp
        >>> @filter_jit
        ... def f(x, y):  # both args traced if arrays, static if non-arrays
        ...     return x + y, x - y
        >>> f(jnp.array(1), jnp.array(2))  # both args traced
        (Array(3, dtype=int32, weak_type=True), Array(-1, dtype=int32, weak_type=True))
        >>> f(jnp.array(1), 2)  # first arg traced, second arg static
        (Array(3, dtype=int32, weak_type=True), Array(-1, dtype=int32, weak_type=True))
        >>> f(1, 2)  # both args static
        (3, -1)

        ```

    !!! info

        Donating arguments allows their underlying memory to be used in the computation.
        This can produce speed and memory improvements, but means that you cannot use any
        donated arguments again, as their underlying memory has been overwritten. (JAX
        will throw an error if you try to.)

    !!! info

        To trace a Python `bool`/`int`/`float`/`complex` too, wrap it in a JAX array:
        `jnp.asarray(x)`. To donate only some arguments, use
        `filter_jit(donate="all-except-first")` and pass everything you don't want
        donated through the first argument (packed into a tuple if necessary).
    """
    if donate not in _DONATE_MODES:
        raise ValueError(
            "`filter_jit(..., donate=...)` must be one of 'all', 'all-except-first', "
            f"'warn', 'warn-except-first', or 'none'; got {donate!r}."
        )
    reserved = _RESERVED_JIT_KWARGS.intersection(jitkwargs)
    if reserved:
        raise ValueError(
            f"filter_jit decides {sorted(reserved)} itself: arrays are traced, everything "
            "else is static; use `donate=` for donation."
        )
    if fun is None:
        return functools.partial(filter_jit, donate=donate, **jitkwargs)
    if not callable(fun):
        raise TypeError(f"filter_jit expects a callable, got {type(fun).__name__}")
    core = _backend._core
    try:
        leading, fun_key = core.partition(_callable_as_tree(fun))
    except UnhashableStaticError as err:
        raise _renamed(err, ("fun",)) from err.__cause__
    program = _PROGRAMS.get_or_create(
        _program_key(core, fun_key, donate, jitkwargs),
        lambda: _JitProgram(core, fun, fun_key, donate, jitkwargs),
    )
    return program.wrap(leading)
