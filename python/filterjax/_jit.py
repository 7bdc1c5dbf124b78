"""filter_jit: `jax.jit` that traces every array leaf and holds everything else static.

Per call, the work outside JAX is one native call (the core's `Dispatcher`): look up the
argument-binding plan of the call's shape and apply it (so keyword calls share the
positional calls' programs at the same cost), one `flatten_split` of `(args, kwargs)` giving
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
from collections.abc import Callable
from typing import (
    Any,
    Concatenate,
    ParamSpec,
    Protocol,
    TypeVar,
    overload,
)

import jax
import jax.tree_util as jtu

from . import _backend, _caches, _equinox_errors, _explain, _nnx
from ._compile_utils import (
    DONATE_MODES,
    Donate,
    Lowered,
    OutputSpec,
    SignatureTable,
    call_donating,
    callable_as_tree,
    callable_from_tree,
    check_options,
    rebuild_output,
    run_and_split_output,
    with_call_path,
)
from ._errors import STATIC_INDEX_ATTR, UnhashableStaticError, rename_root
from ._plans import IDENTITY_PLAN, apply_plan, make_plan
from ._wrapper import NO_FUNCTION, Wrapper, callable_name, metadata_of

__all__ = ["filter_jit"]

_P = ParamSpec("_P")
_Q = ParamSpec("_Q")
_T = TypeVar("_T")

# jax.jit options that filter_jit decides itself.
_RESERVED_JIT_KWARGS = frozenset(
    {"static_argnums", "static_argnames", "donate_argnums", "donate_argnames"}
)


def _signature_of(fun: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(fun)
    except (TypeError, ValueError):  # some builtins have none; pass arguments through
        return None


def _bind_error(name: str, err: TypeError) -> TypeError:
    return TypeError(f"{name}() {err}")


def _make_traced(program: _JitProgram, key: Any) -> Callable:
    """The function handed to `jax.jit` for one static signature: the function's own array
    leaves (unless it has none) and the arguments' array leaves in, as flat sequences (one
    per argument of the `jax.jit`: JAX flattens a list in one pass but builds a tree
    structure per argument), the output split for JAX out."""
    core = program.core
    fun_key = program.fun_key
    static_fun = program.static_fun
    records = program.records
    # An NNX program (`_nnx.NnxKey`) also returns its Variables' new values; an ordinary
    # one reroutes the call if its arguments turn out to hold NNX objects.
    key, run = _nnx.runner(program, key, run_and_split_output)

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
            # Runs only when JAX traces (a new program): recorded whether or not explained.
            _explain.on_trace(records, "filter_jit", core, fun, (first, *rest_args), kwargs)
            return run(fun, (first, *rest_args), kwargs, core)

        traced: Callable = traced_first_apart
    else:

        def traced_together(*parts):
            fun, (dynamic,) = fun_and_dynamic(parts)
            args, kwargs = core.rebuild(key, dynamic)
            # Runs only when JAX traces (a new program): recorded whether or not explained.
            _explain.on_trace(records, "filter_jit", core, fun, args, kwargs)
            return run(fun, args, kwargs, core)

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


class _JitProgram:
    """Everything compiled for one function (by its static part) and one set of options.

    Shared by every wrapper around an equal function: the plans (per call shape) and the
    programs (one `jax.jit` per static signature of the arguments) live here, and the
    wrappers' Dispatchers read them in place. A wrapper adds only the function's own
    array leaves (`leading`). Bound to the core (native or Python) it was made with.
    """

    # Set once a call shape holding Flax NNX objects was seen (see `filterjax._nnx`).
    routes_nnx = False

    def __init__(self, core: Any, fun: Callable, fun_key: Any, donate: Donate, jitkwargs):
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
        self.table = SignatureTable()
        self.programs = self.table.programs
        self.records = _explain.Records()  # signatures of the traces, for explanations
        self.wrapper_class = _wrapper_class(core)
        self.fast = not (self.split_first or self.silence_unused_donation)
        self.metadata = metadata_of(fun)
        _caches.register_owner(self)

    def wrap(self, leading: Any, fn: Any = NO_FUNCTION) -> Any:
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
            OutputSpec,
            leading,
            self.fast,
            _equinox_errors.replacement_for,
        )
        attributes = wrapper.__dict__
        attributes["_program"] = self
        attributes["fn"] = self.name if fn is NO_FUNCTION else fn
        attributes.update(self.metadata)
        return wrapper

    def _clear_cache(self) -> None:
        programs = self.table.clear()
        self.plans.clear()
        self.records.clear()
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
                plan = make_plan(self.signature, args, kwargs)
            except TypeError as err:
                raise _bind_error(self.qualname, err) from None
            # Bounded like the programs: a shape forgotten is planned again when called.
            _caches.bounded_insert(self.plans, shape, plan)
        if type(plan) is _nnx.NnxPlan:
            plan = plan.inner
        if plan is IDENTITY_PLAN:
            return args, kwargs
        bound = apply_plan(plan, args, kwargs)
        assert bound is not None, "a plan made for this call shape always fits it"
        return bound

    def arguments(self, args: tuple, kwargs: dict, is_leaf: Any = None) -> tuple[Any, tuple]:
        """The call's static key, and its dynamic leaves as the arguments the program takes
        after the function's own leaves: `(dynamic,)`, or `(first, rest)` with the first
        argument kept undonated. `is_leaf` is passed to the core's split."""
        args, kwargs = self.bind(args, kwargs)
        flatten_split = self.core.flatten_split
        try:
            if self.split_first:
                if not args:
                    raise TypeError(
                        f"filter_jit(donate={self.donate!r}) needs at least one positional "
                        f"argument to keep undonated; {self.name}() was called without one."
                    )
                first_dynamic, first_key = flatten_split((args[0],), is_leaf=is_leaf)
                rest_dynamic, rest_key = flatten_split((args[1:], kwargs), is_leaf=is_leaf)
                return (first_key, rest_key), (first_dynamic, rest_dynamic)
            dynamic, key = flatten_split((args, kwargs), is_leaf=is_leaf)
        except UnhashableStaticError as err:
            raise with_call_path(err, ("args", "kwargs")) from err.__cause__
        return key, (dynamic,)

    def program_for(self, key: Any, args: tuple, kwargs: dict) -> Any:
        """The `jax.jit` for this static signature, made on first use."""
        try:
            jitted = self.programs.get(key)
        except Exception as err:
            raise _static_comparison_error(args, kwargs, err) from err
        if jitted is None:
            jitted = self.table.get_or_make(
                key,
                lambda: jax.jit(
                    _make_traced(self, key), donate_argnums=self._donated(key), **self.jitkwargs
                ),
            )
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
        donation modes, errors, Flax NNX arguments."""
        if self.routes_nnx and _nnx.routed(self, args, kwargs):
            return _nnx.call(self, leading, args, kwargs)
        key, dynamic = self.arguments(args, kwargs)
        jitted = self.program_for(key, args, kwargs)
        try:
            out = self.run(jitted, leading, dynamic)
        except _nnx.Reroute:
            out = _nnx.Reroute  # called again outside the handler: no chained exception
        if out is _nnx.Reroute:
            return _nnx.reroute(self, key, leading, args, kwargs)
        return self.finish(out)

    def run(self, jitted: Any, leading: tuple, dynamic: tuple) -> Any:
        """Call a program of this function with the call's dynamic leaves."""
        _equinox_errors.watching()  # once Equinox is imported, silence its callback logs
        with _equinox_errors.translated():
            return call_donating(
                self.silence_unused_donation, jitted, *self.head(leading), *dynamic
            )

    def finish(self, out: Any) -> Any:
        """A program's output as the function returned it."""
        return rebuild_output(out, self.core)

    def lower(self, leading: tuple, args: tuple, kwargs: dict) -> Lowered:
        key, dynamic = self.arguments(args, kwargs)
        jitted = self.program_for(key, args, kwargs)
        try:
            lowered = jitted.lower(*self.head(leading), *dynamic)
        except _nnx.Reroute:
            _nnx.forget(self, key)
            raise _nnx.lower_error(self.qualname) from None
        return Lowered(self, leading, lowered, key)


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
        return callable_from_tree(program.core.rebuild(program.fun_key, self.leading))

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


def _remake(fun: Callable, donate: Donate, jitkwargs: dict) -> Any:
    return filter_jit(fun, donate=donate, **jitkwargs)


_wrapper_classes: dict[str, type] = {}


def _wrapper_class(core: Any) -> type:
    """The wrapper type for a core: `_JitWrapperBase` on that core's `Dispatcher`."""
    cls = _wrapper_classes.get(core.BACKEND)
    if cls is None:
        # Called straight into the core's Dispatcher, arguments as given.
        cls = core.dispatcher_subclass((_JitWrapperBase, core.Dispatcher))
        cls.__name__ = cls.__qualname__ = "_JitWrapper"
        cls.__module__ = __name__
        # The Dispatcher's own construction and binding (a plain method: C-level, no
        # Python frame per call), not the generic Wrapper's.
        cls.__init__ = core.Dispatcher.__init__
        cls.__get__ = core.Dispatcher.__get__
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


@overload
def filter_jit(
    *, donate: Donate = "none", **jitkwargs: Any
) -> Callable[[Callable[_P, _T]], JitFunction[_P, _T]]: ...


@overload
def filter_jit(
    fun: Callable[_P, _T], *, donate: Donate = "none", **jitkwargs: Any
) -> JitFunction[_P, _T]: ...


def filter_jit(fun=NO_FUNCTION, *, donate: Donate = "none", **jitkwargs):
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
    check_options("filter_jit", donate, DONATE_MODES, jitkwargs, _RESERVED_JIT_KWARGS)
    if fun is NO_FUNCTION:
        return functools.partial(filter_jit, donate=donate, **jitkwargs)
    if not callable(fun):
        raise TypeError(f"filter_jit expects a callable, got {type(fun).__name__}")
    core = _backend._core
    try:
        leading, fun_key = core.flatten_split(callable_as_tree(fun))
    except UnhashableStaticError as err:
        raise with_call_path(err, ("fun",)) from err.__cause__
    program = _PROGRAMS.get_or_create(
        _program_key(core, fun_key, donate, jitkwargs),
        lambda: _JitProgram(core, fun, fun_key, donate, jitkwargs),
    )
    return program.wrap(leading)
