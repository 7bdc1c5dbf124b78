"""Flax NNX objects in `filter_jit`: carry the in-place updates back, as `nnx.jit` does.

An NNX Module is a JAX PyTree whose leaves are its Variables' values, so `filter_jit`
traces it like any PyTree: inside the function the Module and its Variables are new
objects rebuilt from those values. What the function then does to them in place (an
optimizer step, BatchNorm's running statistics, an RNG stream's count) stays on those
copies. This module carries it back: the program also returns the new value of every
Variable the function changed, and the call writes them into the caller's Variables.

Nothing here runs for programs without NNX objects, and flax is never imported by
filterjax: everything first checks that the user's program imported `flax.nnx`.

How a call is recognised, without a per-call test on the fast path:

1. The first time a call shape (number of positionals, keyword names) reaches the
   program, it takes the ordinary path. When JAX traces it, the traced function looks
   for NNX objects in the arguments (trace time only) and raises `Reroute` if it finds
   any; the program of that signature is dropped.
2. The call shape's binding plan is then wrapped in an `NnxPlan`. The core's Dispatchers
   do not recognise it and hand every call of that shape to the Python fallback before
   partitioning anything, and the fallback sends it here.
3. Here, one partition of the arguments also collects their Variables (in flatten order,
   through `is_leaf`, which never stops the flatten), the program is looked up under an
   `NnxKey` (which the Dispatchers' own keys never equal), and its extra outputs are
   written into those Variables.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import jax.tree_util as jtu

from . import _equinox_errors
from ._errors import rename_root

__all__ = [
    "NnxKey",
    "NnxPlan",
    "Reroute",
    "call",
    "check_pmap_call",
    "collector",
    "forget",
    "lower_error",
    "refuse",
    "reroute",
    "routed",
    "runner",
    "stepper",
    "write_back",
]

_FLAX_NNX = "flax.nnx"


def loaded() -> bool:
    """Whether the user's program has imported Flax NNX (never imported from here)."""
    return _FLAX_NNX in sys.modules


class _Flax:
    """The few Flax names used here, resolved once `flax.nnx` is imported."""

    def __init__(self) -> None:
        from flax import errors, nnx
        from flax.nnx import tracers

        self.Variable = nnx.Variable
        # `nnx.Pytree` is the base of Modules, Rngs and Optimizers since flax 0.11.
        self.Pytree = getattr(nnx, "Pytree", nnx.Module)
        self.current_trace = tracers.current_jax_trace
        self.TraceContextError = errors.TraceContextError
        # `Variable.set_raw_value` checks the trace level twice (~4 us a Variable). When the
        # slots it guards are there, the trace level is compared once per call and the
        # value stored directly, as nnx.jit's own update path does.
        slots = set(getattr(self.Variable, "__slots__", ()))
        self.direct = {"_raw_value", "_trace_state"} <= slots


_flax: _Flax | None = None
# type -> 1 for a Variable type, 2 for another NNX PyTree type (Module, Rngs, Optimizer...),
# 0 otherwise. `isinstance(x, nnx.Variable)` goes through a metaclass `__instancecheck__`
# written in Python (~1.5 us); a dict lookup per node keeps the collecting flatten cheap.
_kinds: dict[type, int] = {}


def _nnx() -> _Flax:
    global _flax
    if _flax is None:
        _flax = _Flax()
    return _flax


def _kind(kind: type) -> int:
    known = _kinds.get(kind)
    if known is None:
        flax = _nnx()
        known = 1 if issubclass(kind, flax.Variable) else 2 if issubclass(kind, flax.Pytree) else 0
        _kinds[kind] = known
    return known


def collector(found: list) -> Callable[[Any], bool]:
    """An `is_leaf` that appends every Variable it is shown to `found` and stops nothing:
    the flatten, its leaves and its key are those of a flatten without it."""
    kinds = _kinds
    append = found.append

    def is_leaf(node: Any) -> bool:
        known = kinds.get(type(node))
        if known is None:
            known = _kind(type(node))
        if known == 1:
            append(node)
        return False

    return is_leaf


def _is_variable(node: Any) -> bool:
    return _kind(type(node)) == 1


def _scan(tree: Any) -> tuple[list, list]:
    """(the Variables of `tree` in flatten order, its leaves that are NNX objects JAX does
    not flatten, such as Modules made with `pytree=False`)."""
    variables: list = []
    leaves = jtu.tree_leaves(tree, is_leaf=collector(variables))
    return variables, [leaf for leaf in leaves if _kind(type(leaf))]


def _variable_paths(tree: Any, roots: tuple[str, ...]) -> list[tuple[str, Any]]:
    pairs, _ = jtu.tree_flatten_with_path(tree, is_leaf=_is_variable)
    return [(rename_root(path, roots), leaf) for path, leaf in pairs if _is_variable(leaf)]


def _static_nnx_path(tree: Any, roots: tuple[str, ...], obj: Any) -> str:
    pairs, _ = jtu.tree_flatten_with_path(tree)
    for path, leaf in pairs:
        if leaf is obj:
            return rename_root(path, roots)
    return "an argument"


# ---------------------------------------------------------------------------------------
# Markers shared with `_jit`.


class Reroute(Exception):
    """Raised while JAX traces an ordinary program whose arguments hold NNX objects: the
    call is made again on the NNX path."""


class NnxPlan:
    """The binding plan of a call shape whose calls hold NNX objects. The core's
    Dispatchers take only the identity plan or a tuple, so they hand such calls to the
    Python fallback without partitioning them; `_JitProgram.bind` unwraps it."""

    __slots__ = ("inner",)

    def __init__(self, inner: Any):
        self.inner = inner

    def __repr__(self) -> str:
        return f"<NNX plan {self.inner!r}>"


class NnxKey:
    """Key of an NNX program in a `_JitProgram`'s table: the arguments' `StaticKey`,
    wrapped so that it never equals a key the Dispatchers look up."""

    __slots__ = ("key", "_hash")

    def __init__(self, key: Any):
        self.key = key
        self._hash = hash(key) ^ 0x6E6E78

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if type(other) is not NnxKey:
            return NotImplemented
        return self._hash == other._hash and self.key == other.key

    def __repr__(self) -> str:
        return f"NnxKey({self.key!r})"


# ---------------------------------------------------------------------------------------
# The per-call path.


def _shape(args: tuple, kwargs: dict) -> Any:
    return (len(args), tuple(kwargs)) if kwargs else len(args)


def routed(program: Any, args: tuple, kwargs: dict) -> bool:
    """Whether this call's shape was found to hold NNX objects."""
    return type(program.plans.get(_shape(args, kwargs))) is NnxPlan


def forget(program: Any, key: Any) -> None:
    """Drop the ordinary program made for `key` before its trace found NNX objects."""
    program.programs.pop(key, None)


def reroute(program: Any, key: Any, leading: tuple, args: tuple, kwargs: dict) -> Any:
    """After `Reroute`: send this call shape to the NNX path from now on, and call."""
    forget(program, key)
    shape = _shape(args, kwargs)
    plan = program.plans.get(shape)
    if plan is not None and type(plan) is not NnxPlan:
        program.plans[shape] = NnxPlan(plan)
    program.routes_nnx = True
    return call(program, leading, args, kwargs)


def call(program: Any, leading: tuple, args: tuple, kwargs: dict) -> Any:
    """A call of a `filter_jit` program whose arguments hold NNX objects."""
    variables: list = []
    key, dynamic = program.arguments(args, kwargs, collector(variables))
    if len(variables) > 1 and len(set(map(id, variables))) != len(variables):
        raise _aliased(program.qualname, args, kwargs)
    jitted = program.program_for(NnxKey(key), args, kwargs)
    if program.fast:  # no donation warnings to silence: call without a context manager
        _equinox_errors.watching()
        try:
            raw = jitted(*program.head(leading), *dynamic)
        except Exception as err:
            replacement = _equinox_errors.replacement_for(err)
            if replacement is None:
                raise
            raise replacement from None
    else:
        raw = program.run(jitted, leading, dynamic)
    out, changed, values = program.finish(raw)
    if changed:
        write_back(variables, changed, values)
    return out


def write_back(variables: list, changed: tuple, values: list) -> None:
    flax = _nnx()
    trace = flax.current_trace()
    # Variables made in the same trace hold states that share one reference to it: an
    # identity test settles most of them before the (Python) equality does.
    same = getattr(trace, "_trace_ref", trace)
    set_attribute = object.__setattr__
    for index, value in zip(changed, values, strict=True):
        variable = variables[index]
        if not flax.direct:
            variable.set_raw_value(value)
            continue
        state = variable._trace_state._jax_trace
        if getattr(state, "_trace_ref", None) is not same and state != trace:
            raise flax.TraceContextError(
                f"Cannot mutate {type(variable).__name__} from a different trace level: "
                "filter_jit was called inside a JAX transformation with a Variable made "
                "outside it. Pass the Variable through that transformation too."
            )
        set_attribute(variable, "_raw_value", value)


def _aliased(name: str, args: tuple, kwargs: dict) -> ValueError:
    seen: dict[int, str] = {}
    for path, variable in _variable_paths((args, kwargs), ("args", "kwargs")):
        first = seen.setdefault(id(variable), path)
        if first != path:
            return ValueError(
                f"{name}: the same {type(variable).__name__} is reached at "
                f"{first} and at {path}. filterjax flattens arguments as PyTrees, so "
                "inside the function each path would hold its own copy and their updates "
                "could not be carried back to one Variable. Pass each Variable once (drop "
                "the duplicate argument, or untie the shared Variable), or use nnx.jit, "
                "(or nnx.pmap), which keeps shared references."
            )
    return ValueError(f"{name}: an NNX Variable is reached twice in the arguments.")


# ---------------------------------------------------------------------------------------
# Trace time.


def refuse(fun: Any, args: tuple, kwargs: dict) -> None:
    """In the trace of an ordinary program: raise `Reroute` if the arguments hold NNX
    objects, and a TypeError if the function itself does."""
    if not loaded():
        return
    _check_function(fun)
    variables, static = _scan((args, kwargs))
    if variables or static:
        raise Reroute


def _check_function(fun: Any) -> None:
    variables, static = _scan(fun)
    if variables or static:
        raise TypeError(
            "filter_jit: the function holds NNX objects (an nnx.Module, or a bound method "
            "or functools.partial of one). Its Variables are read when filter_jit(f) is "
            "made and in-place updates to them could not be carried back. Pass the Module "
            "as an argument instead, e.g. filter_jit(lambda model, x: model(x))(model, x), "
            "or decorate the method in the class body."
        )


def runner(program: Any, key: Any, run_and_split_output: Callable) -> tuple[Any, Callable]:
    """(the StaticKey to rebuild the arguments from, the function that runs `fun` and
    splits its output) for the program of `key` (an `NnxKey` or an ordinary key)."""
    if type(key) is not NnxKey:

        def run_checked(fun: Any, args: tuple, kwargs: dict, core: Any) -> Any:
            refuse(fun, args, kwargs)
            return run_and_split_output(fun, args, kwargs, core)

        return key, run_checked

    keep_all = program.donate != "none"
    name = program.qualname

    def run_nnx(fun: Any, args: tuple, kwargs: dict, core: Any) -> Any:
        return run_and_split_output(stepper(name, keep_all, fun, args, kwargs), args, kwargs, core)

    return key.key, run_nnx


def stepper(name: str, keep_all: bool, fun: Any, args: tuple, kwargs: dict) -> Callable:
    """At trace time: `fun` made to return `(out, changed, values)`, where `changed` are the
    positions (in flatten order) of the arguments' Variables whose value it changed and
    `values` their new values; `keep_all` returns every Variable's (for donated buffers).
    Raises if the arguments hold NNX objects it cannot carry back, or if `fun` changes
    their structure."""
    _check_function(fun)
    tree = (args, kwargs)
    variables, static = _scan(tree)
    if static:
        raise _not_a_pytree(name, tree, static[0])
    for variable in variables:
        metadata = variable._var_metadata
        if metadata.get("ref") or metadata.get("hijax"):
            raise TypeError(
                f"{name}: a {type(variable).__name__} made with ref=True or hijax=True "
                "was passed to a filterjax transformation, which carries Variables' values, "
                "not references. Make it with ref=False and hijax=False, or use nnx.jit."
            )
    structure = jtu.tree_structure(tree, is_leaf=_is_variable)
    before = [variable.get_raw_value() for variable in variables]
    metadata_before = [dict(variable._var_metadata) for variable in variables]

    def stepped(*args: Any, **kwargs: Any) -> Any:
        out = fun(*args, **kwargs)
        _check_unchanged(name, tree, structure, variables, metadata_before)
        if keep_all:  # donated buffers: every Variable needs its new array
            changed = tuple(range(len(variables)))
        else:
            changed = tuple(
                index
                for index, (variable, old) in enumerate(zip(variables, before, strict=True))
                if variable.get_raw_value() is not old
            )
        return out, changed, [variables[index].get_raw_value() for index in changed]

    return stepped


def _not_a_pytree(name: str, tree: Any, obj: Any) -> TypeError:
    where = _static_nnx_path(tree, ("args", "kwargs"), obj)
    return TypeError(
        f"{name}: {where} is a {type(obj).__name__}, an NNX object that is not a JAX PyTree "
        "(made with pytree=False, such as nnx.Object), so filter_jit would hold it static "
        "and lose its updates. Make it a PyTree (nnx.Module, or nnx.Pytree without "
        "pytree=False), or use nnx.jit."
    )


def _check_unchanged(
    name: str, tree: Any, structure: Any, variables: list, metadata_before: list
) -> None:
    """Raise if the function changed the arguments' NNX structure: only new values of the
    Variables they held are carried back."""
    after, _ = _scan(tree)
    problem = None
    same_structure = True
    try:
        same_structure = bool(jtu.tree_structure(tree, is_leaf=_is_variable) == structure)
    except Exception:  # a static field whose __eq__ fails: judged by the Variables alone
        pass
    if not same_structure or len(after) != len(variables):
        problem = "an attribute was added, removed or replaced, or a static field changed"
    else:
        paths = None
        for index, (old, new) in enumerate(zip(variables, after, strict=True)):
            if old is not new or old._var_metadata != metadata_before[index]:
                paths = paths or _variable_paths(tree, ("args", "kwargs"))
                what = "replaced by a new Variable" if old is not new else "given new metadata"
                problem = f"the Variable at {paths[index][0]} was {what}"
                break
    if problem is not None:
        raise ValueError(
            f"{name} changed the structure of an NNX object it was given: {problem}. "
            "filter_jit carries back new values of the Variables the arguments held, not "
            "structural changes (new attributes, new or replaced Variables, changed static "
            "fields such as model.train() / model.eval()). Make such changes outside the "
            "jitted function, or use nnx.jit, which carries them."
        )


def check_pmap_call(name: str, args: tuple, variables: list, leaf_axes: Any) -> None:
    """Per call of a filter_pmap function holding NNX Variables."""
    if len(variables) > 1 and len(set(map(id, variables))) != len(variables):
        raise _aliased(name, args, {})
    if leaf_axes is not None:
        raise ValueError(
            f"{name}: filter_pmap carries NNX Variables' updates back along the axis their "
            "values were mapped over, so it needs one `in_axes` for every array (the "
            "default, 0, or None). Pass the arrays that need another axis through a "
            "separate filter_pmap, or use nnx.pmap."
        )


def lower_error(name: str) -> TypeError:
    return TypeError(
        f"{name}.lower(...): the arguments hold NNX objects, whose in-place "
        "updates a lowered program could not carry back. Call the filter_jit function "
        "itself, or lower nnx.jit(...)."
    )
