"""`explain_recompiles`: say why a filtered function compiled again, leaf by leaf.

Every trace records the trace's *signature* (per leaf path, in the call's own names: a
static leaf's value, an array leaf's shape/dtype/weak type/sharding, each node's type and
keys) under the function's *family* (its code object, or its type for a Module), on or
off: the transforms call `on_trace` only inside the functions they hand to
`jax.jit`/`jax.pmap`, which run only when JAX traces (a new static key, or a new aval
under an existing one), never on a call that hits a compiled program. Recording while off
is what lets the feature, switched on mid-run, explain the very next recompile against the
programs compiled before, and count them. The records hold avals and static leaves, never
tracers; each compiled program holds its own (`Records`, at most MAX_SIGNATURES), so they
go when its compiled programs go, and the families are bounded (MAX_FAMILIES).

On (off by default), every trace after the family's first logs one WARNING to the
`"filterjax"` logger: the difference from the nearest earlier signature, with advice for
the known patterns.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import threading
import types
import weakref
from collections import OrderedDict
from typing import Any

from . import _caches

__all__ = ["explain_recompiles"]

logger = logging.getLogger("filterjax")

#: Whether recompiles are explained. Read by the transforms' traced functions.
enabled: bool = os.environ.get("FILTERJAX_EXPLAIN_RECOMPILES", "").strip().lower() in (
    "1",
    "true",
    "yes",
    "on",
)

# Bounds of what is remembered while on: functions (families), signatures per function.
MAX_FAMILIES = 256
MAX_SIGNATURES = 64
_REPR_LIMIT = 60
_OBJECT_EQ: Any = object.__eq__
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


class _Switch:
    """What `explain_recompiles` returns: already applied; restores on `__exit__`."""

    __slots__ = ("_previous",)

    def __init__(self, enable: bool):
        global enabled
        self._previous = enabled
        enabled = bool(enable)

    def __enter__(self) -> _Switch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        global enabled
        enabled = self._previous

    def __repr__(self) -> str:
        return f"<filterjax.explain_recompiles: {'on' if enabled else 'off'}>"


def explain_recompiles(enable: bool = True) -> _Switch:
    """Log why `filter_jit` and `filter_pmap` functions compile again.

    While on, every time a function traces a new program *after its first*, one WARNING
    record goes to the `logging` logger `"filterjax"`: the function's qualified name and
    how many programs it now has, the nearest earlier signature, what differs by leaf path
    in the call's own names (`args[1]['scale']`, `kwargs['cfg'].act`,
    `fun.layers[0].activation`), and advice for the known patterns. Nothing is logged on
    cache hits or first compiles; off (the default), it costs nothing on calls. Signatures
    are recorded whenever a function traces, on or off, so switched on mid-run it explains
    the next recompile against the programs compiled before.

    Also switched on by the environment variable `FILTERJAX_EXPLAIN_RECOMPILES=1`.

    **Arguments:**

    - `enable`: switch explanations on (`True`, the default) or off (`False`).

    **Returns:**

    A context manager: the setting applies at once, and leaving a `with` block restores
    the previous one.

    ```python
    >>> import filterjax
    >>> with filterjax.explain_recompiles():
    ...     pass  # recompiles in here are explained
    >>> _ = filterjax.explain_recompiles(True)  # on from now on
    >>> _ = filterjax.explain_recompiles(False)  # and off again

    ```
    """
    return _Switch(enable)


# ---------------------------------------------------------------------------------------
# Signatures


class _Aval:
    """An array leaf's abstract value, rendered only when a difference is explained:
    recording (every trace) keeps just JAX's aval."""

    __slots__ = ("aval",)

    def __init__(self, aval: Any):
        self.aval = aval

    @property
    def shape(self) -> tuple:
        return tuple(getattr(self.aval, "shape", ()))

    @property
    def dtype(self) -> str:
        return str(getattr(self.aval, "dtype", "?"))

    @property
    def weak_type(self) -> bool:
        return bool(getattr(self.aval, "weak_type", False))

    @property
    def sharding(self) -> str:
        return _sharding_str(getattr(self.aval, "sharding", None))

    @property
    def short(self) -> str:
        aval = self.aval
        return aval.str_short() if hasattr(aval, "str_short") else str(aval)

    def _parts(self) -> tuple:
        return (self.shape, self.dtype, self.weak_type, self.sharding)

    def __eq__(self, other: object) -> bool:
        if type(other) is not _Aval:
            return NotImplemented
        try:
            if self.aval == other.aval:
                return True
        except Exception:
            pass
        return self._parts() == other._parts()

    def __hash__(self) -> int:
        return hash(self.shape)


class _Signature:
    """One trace: `entries` maps a path (a tuple of rendered key entries, the root first)
    to ("static", value), ("array", _Aval) or ("node", description)."""

    __slots__ = ("entries", "number")

    def __init__(self, entries: dict[tuple, tuple], number: int):
        self.entries = entries
        self.number = number


class Records(list):
    """The signatures recorded for one compiled program (a `_JitProgram` or `_PmapProgram`
    holds its own): they live exactly as long as the program, so that recording holds no
    function or static value after its compiled programs are gone. At most MAX_SIGNATURES,
    the oldest forgotten first."""

    __slots__ = ("__weakref__",)


class _Family:
    __slots__ = ("count", "holders")

    def __init__(self) -> None:
        self.count = 0
        self.holders: list[weakref.ref[Records]] = []

    def signatures(self, records: Records) -> list[_Signature]:
        """Every live program's signatures, oldest first; `records` joins the family."""
        live = [ref for ref in self.holders if ref() is not None]
        if not any(ref() is records for ref in live):
            live.append(weakref.ref(records))
        self.holders = live
        found = [signature for ref in live for signature in ref() or ()]
        found.sort(key=lambda signature: signature.number)
        return found


_families: OrderedDict[Any, _Family] = OrderedDict()
_lock = threading.Lock()


def _clear() -> None:
    with _lock:
        _families.clear()


_caches.register_clearer(_clear)


def _aval_of(leaf: Any) -> _Aval | None:
    from ._compat import typeof

    try:
        return _Aval(typeof(leaf))
    except Exception:
        return None


def _sharding_str(sharding: Any) -> str:
    if sharding is None:
        return "none"
    spec = getattr(sharding, "spec", None)
    mesh = getattr(sharding, "mesh", None)
    if spec is None or mesh is None:
        return repr(sharding)
    entries = list(spec)
    while entries and entries[-1] is None:  # P(None,) and P() say the same
        entries.pop()
    axes = dict(getattr(mesh, "shape", {}) or {})
    if not axes:
        return "unsharded (no mesh)"
    if not entries:
        return f"replicated on mesh {axes}"
    return f"P({', '.join(map(repr, entries))}) on mesh {axes}"


def _tree_classes() -> tuple[Any, Any]:
    from ._compile_utils import MethodTree, PartialTree

    return PartialTree, MethodTree


def _walk(obj: Any, path: tuple, entries: dict, is_array: Any) -> None:
    """Record `obj` (and everything under it) at `path`."""
    import jax.tree_util as jtu

    partial_tree, method_tree = _tree_classes()
    if type(obj) is partial_tree:
        entries[path] = ("node", ("functools.partial", ("func", "args", "keywords")))
        _walk(obj.func, (*path, ".func"), entries, is_array)
        _walk(obj.args, (*path, ".args"), entries, is_array)
        _walk(obj.keywords, (*path, ".keywords"), entries, is_array)
        return
    if type(obj) is method_tree:
        entries[path] = ("node", ("bound method", ("__func__", "__self__")))
        _walk(obj.func, (*path, ".__func__"), entries, is_array)
        _walk(obj.instance, (*path, ".__self__"), entries, is_array)
        return
    if obj is None or is_array(obj):
        entries[path] = ("array", _aval_of(obj)) if obj is not None else ("static", None)
        return
    treedef: Any  # jaxlib ships no stub for PyTreeDef
    children, treedef = jtu.tree_flatten_with_path(obj, is_leaf=lambda x: x is not obj)
    if treedef.num_leaves == 1 and treedef.num_nodes == 1:  # a leaf, not a node
        entries[path] = ("static", obj)
        return
    names = tuple(jtu.keystr(tuple(child_path)) for child_path, _ in children)
    kind = type(obj)
    aux: Any = ()
    static_fields: list[tuple[str, Any]] = []
    if dataclasses.is_dataclass(obj):
        # Fields that are not children (static fields) are recorded as leaves.
        attrs = {name[1:] for name in names if name.startswith(".")}
        for field in dataclasses.fields(obj):
            if field.name not in attrs and hasattr(obj, field.name):
                static_fields.append((field.name, getattr(obj, field.name)))
    elif kind not in (tuple, list, dict):
        try:
            aux = _short(treedef.node_data()[1])
        except Exception:
            aux = ()
    entries[path] = ("node", (_type_name(kind), names, aux))
    for name, value in static_fields:
        entries[(*path, f".{name}")] = ("static", value)
    for (_, child), name in zip(children, names, strict=True):
        _walk(child, (*path, name), entries, is_array)


def _signature(fun: Any, args: tuple, kwargs: dict, is_array: Any, number: int) -> _Signature:
    entries: dict[tuple, tuple] = {}
    _walk(fun, ("fun",), entries, is_array)
    entries[("args",)] = ("node", ("positional", len(args)))
    for index, arg in enumerate(args):
        _walk(arg, ("args", f"[{index}]"), entries, is_array)
    entries[("kwargs",)] = ("node", ("keyword", tuple(kwargs)))
    for name, value in kwargs.items():
        _walk(value, ("kwargs", f"[{name!r}]"), entries, is_array)
    return _Signature(entries, number)


# ---------------------------------------------------------------------------------------
# Differences


@dataclasses.dataclass
class _Difference:
    path: str
    text: str
    advice: str | None = None


def _type_name(kind: type) -> str:
    return kind.__qualname__.rsplit(".<locals>.", 1)[-1]


def _short(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:
        text = f"<{_type_name(type(value))} object>"
    text = _ADDRESS.sub("", text)  # `<function f at 0x7f...>`: the same in every run
    if len(text) > _REPR_LIMIT:
        text = text[: _REPR_LIMIT - 3] + "..."
    return text


def _where(fun: Any) -> str:
    code = getattr(fun, "__code__", None)
    if code is None:
        return ""
    return f" defined at {os.path.basename(code.co_filename)}:{code.co_firstlineno}"


def _is_jax_jit(value: Any) -> bool:
    return type(value).__name__ == "PjitFunction" or (
        callable(value) and hasattr(value, "lower") and hasattr(value, "__wrapped__")
    )


def _render(path: tuple) -> str:
    return "".join(path)


def _static_difference(where: str, old: Any, new: Any) -> _Difference:
    kind = type(new)
    if type(old) is not kind:
        return _Difference(
            where,
            f"static value {_short(old)} ({_type_name(type(old))}) -> "
            f"{_short(new)} ({_type_name(kind)})",
        )
    if _is_jax_jit(new):
        inner = getattr(new, "__wrapped__", None)
        name = getattr(inner, "__qualname__", None) or _short(inner)
        return _Difference(
            where,
            f"a new jax.jit object each call (wrapping {name}); jax.jit objects compare by "
            "identity, so every new one is a new static value",
            f"hoist the jax.jit out of the loop: make it once and pass that same object as {where}",
        )
    if isinstance(new, types.FunctionType | types.BuiltinFunctionType | functools.partial):
        same_code = getattr(old, "__code__", None) is getattr(new, "__code__", 0)
        name = getattr(new, "__qualname__", None) or _short(new)
        return _Difference(
            where,
            f"a new function object each call ({name}{_where(new)}"
            f"{', same code' if same_code else ''}); functions compare by identity, so "
            "every new one is a new static value",
            f"hoist the lambda or function definition out of the loop so that {where} is "
            "the same object every call",
        )
    if kind.__eq__ is _OBJECT_EQ:
        return _Difference(
            where,
            f"a new {_type_name(kind)} object each call, and {_type_name(kind)} compares by "
            "identity (it has no __eq__): every new one is a new static value",
            f"make the {_type_name(kind)} once outside the loop, or give it __eq__ and "
            "__hash__ by value",
        )
    text = f"static value {_short(old)} -> {_short(new)} ({_type_name(kind)})"
    if kind in (int, float, complex):
        return _Difference(
            where,
            text,
            f"{where} is a Python number, held static: every new value compiles a new "
            "program; pass jnp.asarray(value) instead to trace it",
        )
    return _Difference(where, text)


def _array_difference(where: str, old: _Aval | None, new: _Aval | None) -> _Difference | None:
    if old is None or new is None or old == new:
        return None
    parts = []
    if old.shape != new.shape:
        parts.append(f"shape {old.shape} -> {new.shape}")
    if old.dtype != new.dtype:
        parts.append(f"dtype {old.dtype} -> {new.dtype}")
    if old.weak_type != new.weak_type:
        parts.append(f"weak_type {old.weak_type} -> {new.weak_type}")
    if old.sharding != new.sharding:
        parts.append(f"sharding {old.sharding} -> {new.sharding}")
    if not parts:
        return None
    advice = None
    if old.weak_type != new.weak_type:
        advice = (
            f"{where} is weak-typed in one call (an array made from a Python scalar): give "
            "it an explicit dtype, e.g. jnp.asarray(x, dtype=jnp.float32)"
        )
    return _Difference(where, f"array {old.short} -> {new.short}: {', '.join(parts)}", advice)


def _describe(entry: tuple) -> str:
    kind, value = entry
    if kind == "static":
        return f"static {_short(value)} ({_type_name(type(value))})"
    if kind == "array":
        return f"array {value.short if value is not None else '?'}"
    return f"{value[0]} node with children {', '.join(value[1]) or '(none)'}"


def _call_shape(entries: dict) -> str:
    count = entries[("args",)][1][1]
    names = entries[("kwargs",)][1][1]
    keywords = f"keywords {', '.join(names)}" if names else "no keywords"
    return f"{count} positional, {keywords}"


def _node_difference(where: str, old: tuple, new: tuple) -> tuple[_Difference, bool]:
    """(the difference, whether the children can still be compared path by path)."""
    old_type, old_names, old_aux = old
    new_type, new_names, new_aux = new
    if old_type != new_type:
        return _Difference(where, f"node type {old_type} -> {new_type}"), False
    if old_names != new_names:
        added = [n for n in new_names if n not in old_names]
        removed = [n for n in old_names if n not in new_names]
        change = []
        if added:
            change.append(f"added {', '.join(added)}")
        if removed:
            change.append(f"removed {', '.join(removed)}")
        if not change:
            change.append("same keys, in another order")
        return _Difference(where, f"{new_type} structure: {'; '.join(change)}"), True
    return _Difference(where, f"{new_type} node data {old_aux} -> {new_aux}"), True


def _differences(old: _Signature, new: _Signature) -> list[_Difference]:
    found: list[_Difference] = []
    skipped: list[tuple] = []  # subtrees whose node type changed: not compared inside
    old_entries, new_entries = old.entries, new.entries
    if old_entries[("args",)] != new_entries[("args",)] or (
        old_entries[("kwargs",)] != new_entries[("kwargs",)]
    ):
        found.append(
            _Difference(
                "call shape",
                f"{_call_shape(old_entries)} -> {_call_shape(new_entries)} (positional and "
                "keyword arguments that the function's signature does not bind to the same "
                "parameters make different programs)",
                "pass each argument the same way (positionally or by keyword) in every call",
            )
        )
    for path, new_entry in new_entries.items():
        if len(path) == 1 and path[0] in ("args", "kwargs"):
            continue
        if any(path[: len(prefix)] == prefix for prefix in skipped):
            continue
        old_entry = old_entries.get(path)
        if old_entry is None or (old_entry[0] != "static" and old_entry == new_entry):
            continue
        where = _render(path)
        if old_entry[0] != new_entry[0]:
            found.append(
                _Difference(
                    where,
                    f"{_describe(old_entry)} -> {_describe(new_entry)}",
                    _number_advice(where, new_entry),
                )
            )
            skipped.append(path)
        elif new_entry[0] == "static":
            if not _static_equal(old_entry[1], new_entry[1]):
                found.append(_static_difference(where, old_entry[1], new_entry[1]))
        elif new_entry[0] == "array":
            difference = _array_difference(where, old_entry[1], new_entry[1])
            if difference is not None:
                found.append(difference)
        else:
            node_difference, compare_children = _node_difference(where, old_entry[1], new_entry[1])
            found.append(node_difference)
            if not compare_children:
                skipped.append(path)
    return found


def _number_advice(where: str, entry: tuple) -> str | None:
    if entry[0] == "static" and type(entry[1]) in (int, float, complex):
        return (
            f"{where} is sometimes an array and sometimes a Python number: pass "
            "jnp.asarray(value) every time"
        )
    return None


def _static_equal(old: Any, new: Any) -> bool:
    if old is new:
        return True
    if type(old) is not type(new):
        return False
    try:
        return bool(old == new)
    except Exception:
        return False


# ---------------------------------------------------------------------------------------
# The hook


def _family_key(transform: str, fun: Any) -> Any:
    partial_tree, method_tree = _tree_classes()
    target = fun
    for _ in range(16):
        if type(target) in (partial_tree, method_tree):
            target = target.func
        elif isinstance(target, functools.partial):
            target = target.func
        elif isinstance(target, types.MethodType):
            target = target.__func__
        elif getattr(target, "__wrapped__", None) is not None and not isinstance(target, type):
            target = target.__wrapped__
        else:
            break
    code = getattr(target, "__code__", None)
    return (transform, code if code is not None else type(target))


def _qualname(fun: Any) -> str:
    partial_tree, method_tree = _tree_classes()
    while type(fun) in (partial_tree, method_tree):
        fun = fun.func
    name = getattr(fun, "__qualname__", None)
    if not isinstance(name, str):
        name = type(fun).__qualname__
    return name


def on_trace(
    records: Records, transform: str, core: Any, fun: Any, args: tuple, kwargs: dict
) -> None:
    """Called by a transform's traced function, with its program's `records`, the function
    and the arguments it is traced with (tracers at the dynamic leaves): records the
    signature, and explains it when `enabled`."""
    try:
        _explain(records, transform, core, fun, args, kwargs)
    except Exception:  # an explanation must never break a trace
        logger.debug("filterjax could not explain a recompile", exc_info=True)


def _record(family: _Family, records: Records, signature: _Signature) -> None:
    with _lock:
        family.count += 1
        signature.number = family.count
        records.append(signature)
        del records[:-MAX_SIGNATURES]


def _explain(
    records: Records, transform: str, core: Any, fun: Any, args: tuple, kwargs: dict
) -> None:
    family_key = _family_key(transform, fun)
    with _lock:
        family = _families.get(family_key)
        if family is None:
            family = _families[family_key] = _Family()
            while len(_families) > MAX_FAMILIES:
                _families.popitem(last=False)
        _families.move_to_end(family_key)
        earlier = family.signatures(records)
    signature = _signature(fun, args, kwargs, core.is_array, family.count + 1)
    nearest: _Signature | None = None
    nearest_differences: list[_Difference] = []
    for candidate in reversed(earlier):  # ties go to the most recent
        differences = _differences(candidate, signature)
        if not differences:
            return  # the same signature traced again (by JAX, not a new program)
        if nearest is None or len(differences) < len(nearest_differences):
            nearest, nearest_differences = candidate, differences
    _record(family, records, signature)
    if nearest is None or not enabled:
        return  # the function's first program, or recorded only
    lines = [
        f"filterjax: {_qualname(fun)} ({transform}) compiled a new program; it now has "
        f"{family.count} programs. Compared with the nearest earlier signature "
        f"(program #{nearest.number}), this call differs in:"
    ]
    lines.extend(f"  {d.path}: {d.text}" for d in nearest_differences)
    advice = next((d.advice for d in nearest_differences if d.advice), None)
    if advice is not None:
        lines.append(f"Advice: {advice}.")
    logger.warning("\n".join(lines))
