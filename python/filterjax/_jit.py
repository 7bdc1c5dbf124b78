"""filter_jit: `jax.jit` that traces every array leaf and holds everything else static.

Per call, the work outside JAX is: look up a cached argument-binding plan, one core
`partition` of `(args, kwargs)` giving the flat dynamic leaves and a hashable static key,
one call of an inner `jax.jit` (whose C++ dispatch hashes the key as a static argument and
checks the leaves' avals), and one `rebuild` of the output. The output's static part
travels back through JAX's own output treedef, so it is right for every traced signature
and costs no Python callback. Nothing blocks: JAX's asynchronous dispatch is kept.
"""

from __future__ import annotations

import functools
import inspect
import types
import warnings
import weakref
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

from . import _backend, _caches, _equinox_errors
from ._errors import UnhashableStaticError, rename_root, unhashable_message

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


# ---------------------------------------------------------------------------------------
# Argument binding, cached per call shape (number of positionals, keyword names).


class _Slot:
    """Placeholder bound in place of a real argument, to learn where each one lands."""

    __slots__ = ("source",)

    def __init__(self, source: int | str):
        self.source = source


def _identity_plan(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return args, kwargs


def _make_plan(signature: inspect.Signature | None, args: tuple, kwargs: dict):
    """How calls shaped like `(args, kwargs)` map onto `signature.bind(...)`'s normal form.

    Raises the TypeError `signature.bind` raises when such calls can't bind.
    """
    if signature is None:
        return _identity_plan
    bound = signature.bind(*map(_Slot, range(len(args))), **{k: _Slot(k) for k in kwargs})
    arg_sources = tuple(slot.source for slot in bound.args)
    kwarg_sources = tuple((name, slot.source) for name, slot in bound.kwargs.items())
    if arg_sources == tuple(range(len(args))) and all(n == s for n, s in kwarg_sources):
        return _identity_plan

    def plan(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        def pick(source):
            return args[source] if type(source) is int else kwargs[source]

        return (
            tuple(map(pick, arg_sources)),
            {name: pick(source) for name, source in kwarg_sources},
        )

    return plan


def _signature_of(fun: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(fun)
    except (TypeError, ValueError):  # some builtins have none; pass arguments through
        return None


def _bind_error(fun: Callable, err: TypeError) -> TypeError:
    name = getattr(fun, "__qualname__", None) or type(fun).__qualname__
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


def _run_and_split_output(fun: Callable, args: tuple, kwargs: dict) -> Any:
    # [issue 11, Equinox errors] This frame is where an `eqx.error_if` stack ends: Equinox
    # records the marker held in this local, and `_equinox_errors.translate` cuts there.
    __equinox_jit_id__ = _equinox_errors.FRAME_MARKER  # noqa: F841
    out = fun(*args, **kwargs)
    out_dynamic, out_key = _backend.partition(out, hashed=False)
    if out_key.num_static == 0:
        # JAX rebuilds an all-array output itself, from the output treedef of the trace.
        # A lone dict keyed by an _OutputSpec is how a trace with static outputs says so.
        if not (type(out) is dict and len(out) == 1 and type(next(iter(out))) is _OutputSpec):
            return out
    return {_OutputSpec(out_key): out_dynamic}


def _rebuild_output(out: Any) -> Any:
    if type(out) is dict and len(out) == 1:
        ((spec, leaves),) = out.items()
        if type(spec) is _OutputSpec:
            return _backend.rebuild(spec.key, leaves)
    return out


def _make_traced(fun_key, fun_is_static: bool, name: str, split_first: bool) -> Callable:
    """The function handed to `jax.jit`. Static argument 0 is the call's StaticKey.

    When `fun` holds no arrays it is rebuilt once, here, and the traced function takes no
    `fun_dynamic` argument.
    """

    def traced_split_first(key, fun_dynamic, first_dynamic, rest_dynamic):
        first_key, rest_key = key
        call = _backend.rebuild(fun_key, fun_dynamic)
        (first,) = _backend.rebuild(first_key, first_dynamic)
        rest_args, kwargs = _backend.rebuild(rest_key, rest_dynamic)
        return _run_and_split_output(call, (first, *rest_args), kwargs)

    def traced_static_fun(key, dynamic):
        args, kwargs = _backend.rebuild(key, dynamic)
        return _run_and_split_output(static_fun, args, kwargs)

    def traced(key, fun_dynamic, dynamic):
        call = _backend.rebuild(fun_key, fun_dynamic)
        args, kwargs = _backend.rebuild(key, dynamic)
        return _run_and_split_output(call, args, kwargs)

    if split_first:
        chosen: Callable = traced_split_first
    elif fun_is_static:
        static_fun = _backend.rebuild(fun_key, [])
        chosen = traced_static_fun
    else:
        chosen = traced
    chosen.__name__ = chosen.__qualname__ = name
    return chosen


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


class _JitState:
    """Everything behind one `filter_jit` function except its per-call fast path.

    The callable handed to the user is a core `Dispatcher` (native or Python), which runs
    the common call in one go and hands every other call to `call_slow`.
    """

    def __init__(self, fun: Callable, donate: _Donate, jitkwargs: dict):
        self.fun = fun
        self.donate = donate
        self.jitkwargs = jitkwargs
        self.signature = _signature_of(fun)
        self.name = getattr(fun, "__name__", type(fun).__name__)
        self.split_first = donate in ("all-except-first", "warn-except-first")
        self.silence_unused_donation = donate in ("all", "all-except-first")
        self.dispatcher_ref: weakref.ref | None = None
        self.equinox = False  # [issue 11] all calls take call_slow (Equinox imported)
        self._setup()

    def _setup(self) -> None:
        """(Re)build everything derived from the backend: fun's partition, plans, jit."""
        try:
            self.fun_dynamic, fun_key = _backend.partition(_callable_as_tree(self.fun))
        except UnhashableStaticError as err:
            raise _renamed(err, ("fun",)) from err.__cause__
        self.plans: dict = {}
        fun_is_static = not self.fun_dynamic
        if self.split_first:
            donate_argnums: tuple[int, ...] = (1, 3)
        elif self.donate == "none":
            donate_argnums = ()
        elif fun_is_static:
            donate_argnums = (1,)
        else:
            donate_argnums = (1, 2)
        self.jitted: Any = jax.jit(
            _make_traced(fun_key, fun_is_static, self.name, self.split_first),
            static_argnums=0,
            donate_argnums=donate_argnums,
            **self.jitkwargs,
        )

    def make_dispatcher(self):
        dispatcher = _backend.Dispatcher(
            self.jitted,
            self.plans,
            _identity_plan,
            self.call_slow,
            _OutputSpec,
            **self._dispatch_options(),
        )
        self.dispatcher_ref = weakref.ref(dispatcher)
        return dispatcher

    def _dispatch_options(self) -> dict:
        return {
            "leading": self.fun_dynamic or None,
            "fast": not (self.split_first or self.silence_unused_donation or self.equinox),
        }

    def _watch_equinox_errors(self) -> None:
        """[issue 11, Equinox errors] Once Equinox is imported, send every call down
        `call_slow`, where an Equinox run-time error is translated (the native fast path
        raises JAX's error as it is)."""
        self.equinox = True
        dispatcher = self.dispatcher_ref() if self.dispatcher_ref is not None else None
        if dispatcher is not None:
            dispatcher.reset(self.jitted, self.plans, **self._dispatch_options())

    def _clear_cache(self) -> None:
        self.jitted.clear_cache()
        self._setup()
        dispatcher = self.dispatcher_ref() if self.dispatcher_ref is not None else None
        if dispatcher is not None:
            options = self._dispatch_options()
            # A Dispatcher of the other backend would build keys the traced function can't
            # read: send all its calls down the (backend-neutral) slow path.
            options["fast"] = options["fast"] and type(dispatcher) is _backend.Dispatcher
            dispatcher.reset(self.jitted, self.plans, **options)

    def bind(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        shape = (len(args), tuple(kwargs)) if kwargs else len(args)
        plan = self.plans.get(shape)
        if plan is None:
            try:
                plan = _make_plan(self.signature, args, kwargs)
            except TypeError as err:
                raise _bind_error(self.fun, err) from None
            self.plans[shape] = plan
        return plan(args, kwargs)

    def jit_arguments(self, args: tuple, kwargs: dict) -> tuple:
        """Everything `self.jitted` is called with: (key, [fun_dynamic], dynamic...)."""
        args, kwargs = self.bind(args, kwargs)
        try:
            if self.split_first:
                if not args:
                    raise TypeError(
                        f"filter_jit(donate={self.donate!r}) needs at least one positional "
                        f"argument to keep undonated; {self.name}() was called without one."
                    )
                first_dynamic, first_key = _backend.partition((args[0],))
                rest_dynamic, rest_key = _backend.partition((args[1:], kwargs))
                return (first_key, rest_key), self.fun_dynamic, first_dynamic, rest_dynamic
            dynamic, key = _backend.partition((args, kwargs))
        except UnhashableStaticError as err:
            raise _renamed(err, ("args", "kwargs")) from err.__cause__
        if self.fun_dynamic:
            return key, self.fun_dynamic, dynamic
        return key, dynamic

    def call_slow(self, args: tuple, kwargs: dict) -> Any:
        """A call off the Dispatcher's fast path: first of its shape, donation modes, errors."""
        jit_args = self.jit_arguments(args, kwargs)
        if not self.equinox and _equinox_errors.watching():  # [issue 11, Equinox errors]
            self._watch_equinox_errors()
        try:
            if self.silence_unused_donation:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=_UNUSED_DONATION)
                    out = self.jitted(*jit_args)
            else:
                out = self.jitted(*jit_args)
        except Exception as err:
            if isinstance(err, ValueError) and str(err).startswith(JAX_STATIC_EQ_ERROR):
                raise _static_comparison_error(args, kwargs, err) from err
            translated = _equinox_errors.translate(err)  # [issue 11, Equinox errors]
            if translated is not None:
                raise translated from None
            raise
        if not self.equinox and _equinox_errors.watching():  # imported while tracing
            self._watch_equinox_errors()
        return _rebuild_output(out)

    def lower(self, /, *args: Any, **kwargs: Any) -> Lowered:
        """Lower for these arguments (ahead-of-time compilation).

        **Returns:**

        A `Lowered` object with `.as_text()` and `.compile()`; the compiled object is
        called with the same arguments (static ones included) as this function.
        """
        jit_args = self.jit_arguments(args, kwargs)
        return Lowered(self, self.jitted.lower(*jit_args), jit_args[0])


# How JAX's dispatch reports a static argument whose `__eq__` raised. The Dispatchers send
# such calls down `call_slow`, which says which leaf it was.
JAX_STATIC_EQ_ERROR = "static arguments should be comparable"


def _static_comparison_error(args: tuple, kwargs: dict, err: ValueError) -> TypeError:
    """Name the static leaf (path and type) whose `__eq__` broke JAX's cache lookup."""
    paths_and_leaves, _ = jtu.tree_flatten_with_path((args, kwargs))
    for path, leaf in paths_and_leaves:
        if _backend.is_array_fast(leaf):
            continue
        try:
            leaf == leaf  # noqa: B015 - the comparison itself is the test
        except Exception as cause:
            kind = type(leaf)
            return TypeError(
                f"The __eq__ of the static leaf at {rename_root(path, ('args', 'kwargs'))} "
                f"(type {kind.__module__}.{kind.__qualname__}) raised "
                f"{type(cause).__name__}: {cause}, so this call could not be matched with "
                "earlier calls' compiled programs. Non-array leaves are static: give the type "
                "an __eq__ that returns a bool, or make the leaf dynamic by wrapping it in an "
                "array."
            )
    return TypeError(f"A static argument could not be compared with __eq__: {err}")


def _renamed(err: UnhashableStaticError, roots: tuple[str, ...]) -> UnhashableStaticError:
    """The same error, with the leaf's path named from the call (`args[1]['cfg']`)."""
    where = rename_root(err.path, roots) if len(roots) > 1 else roots[0] + jtu.keystr(err.path)
    message = unhashable_message(where, err.leaf_type or object, err.__cause__)
    return UnhashableStaticError(message, err.path, err.leaf_type)


class Lowered(Generic[_T]):
    """A `filter_jit` function lowered for one call signature (see `JitFunction.lower`)."""

    def __init__(self, wrapper: _JitState, lowered, key):
        self._wrapper = wrapper
        self._lowered = lowered
        self._key = key

    def as_text(self, *args, **kwargs) -> str:
        """The lowered program as text (StableHLO by default)."""
        return self._lowered.as_text(*args, **kwargs)

    def compiler_ir(self, *args, **kwargs):
        return self._lowered.compiler_ir(*args, **kwargs)

    def compile(self, *args, **kwargs) -> Compiled[_T]:
        """Compile the lowered program."""
        return Compiled(self._wrapper, self._lowered.compile(*args, **kwargs), self._key)


class Compiled(Generic[_T]):
    """A compiled `filter_jit` program, callable with the arguments it was lowered for."""

    def __init__(self, wrapper: _JitState, compiled, key):
        self._wrapper = wrapper
        self._compiled = compiled
        self._key = key

    def as_text(self, *args, **kwargs) -> str:
        return self._compiled.as_text(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> _T:
        key, *dynamic = self._wrapper.jit_arguments(args, kwargs)
        if key != self._key:
            raise TypeError(
                f"This compiled {self._wrapper.name} was lowered for arguments with another "
                "tree structure or other static (non-array) values than the ones it was "
                "called with. Lower and compile again for these arguments, or call the "
                "filter_jit function itself (which compiles as needed)."
            )
        try:
            out = self._compiled(*dynamic)
        except Exception as err:
            translated = _equinox_errors.translate(err)  # [issue 11, Equinox errors]
            if translated is not None:
                raise translated from None
            raise
        return _rebuild_output(out)


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
    state = _JitState(fun, donate, jitkwargs)
    dispatcher = state.make_dispatcher()
    # updated=(): copying fun's __dict__ would plant its attributes (a Module's fields,
    # another wrapper's state) on the dispatcher.
    functools.update_wrapper(dispatcher, fun, updated=())
    dispatcher.lower = state.lower
    dispatcher._filterjax_state = state
    _caches.register_owner(state)
    return dispatcher
