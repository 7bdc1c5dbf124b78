"""When a `register_dataclass` node can be rebuilt without calling its type.

jaxlib rebuilds such a node with `type(**fields)`. For most dataclasses that call only
allocates the object and runs the `__init__` that `dataclasses` generated, which assigns
each argument to its attribute, in field order, with the generic attribute assignment
(`self.x = x`, or `object.__setattr__(self, "x", x)` for a frozen class). The native core
rebuilds those types by doing exactly that itself: `object.__new__(type)`, then one
`PyObject_GenericSetAttr` per field in the same order. `direct_fields` decides, once per
type, whether that is observably identical to the call; anything it cannot establish
keeps the call.

The call and the direct build agree when all of these hold:

- `type(type).__call__` is `type.__call__` and `type.__new__` is `object.__new__`: the call
  allocates with `object.__new__` and then runs `__init__`, nothing else (`object.__new__`
  ignores the keyword arguments because the type has its own `__init__`).
- The `__init__` found on the type is one `dataclasses` generated (compiled from a string
  inside its `__create_fn__` helper): a user-written `__init__` is kept. Its code loads no
  global and no attribute other than the fields (and `__setattr__`, for the frozen form),
  and every variable it closes over is `object`, the default-factory marker or a field's
  default factory: it can do nothing but assign its arguments.
- It calls no `__post_init__` and the type has none; it takes exactly the dataclass's
  fields, every one with `init=True` (no `InitVar`, no `init=False` field it would set
  itself), and those are exactly jax's data and meta fields (no `drop_fields`, whose
  defaults `__init__` would fill in).
- The assignment is the generic one: for `self.x = x`, the type's `__setattr__` is
  `object.__setattr__`; for `object.__setattr__(self, "x", x)`, no class in the MRO
  defines a C-level `__setattr__` (which would make that call raise). Slot fields go
  through their slot descriptors either way.
- A field with a default factory whose value is the factory marker itself would have the
  factory called: the native core checks for that object per node and calls the type then.

The decision is made once per type (the core caches it with the type's fields): a class
changed after its first rebuild (a new `__init__`, `__setattr__` or `__post_init__`
assigned to it) keeps the first decision until jax's registry changes size.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from typing import Any

# `co_qualname` of every `__init__` that `dataclasses` compiles (Python 3.11 to 3.14).
_GENERATED_QUALNAME = "__create_fn__.<locals>.__init__"
_STAR_ARGS = inspect.CO_VARARGS | inspect.CO_VARKEYWORDS


def direct_fields(
    kind: Any, data_fields: tuple[str, ...], meta_fields: tuple[str, ...]
) -> tuple[tuple[str, bool, int, Any], ...] | None:
    """How to rebuild `kind` without calling it, or None to call it.

    A tuple with one entry per field, in the order `__init__` assigns them:
    `(name, is_meta, index, marker)`: the value is `meta[index]` (node data) or
    `children[index]`, and if it is `marker` (not None) the type must be called instead.
    """
    try:
        return _plan(kind, tuple(data_fields), tuple(meta_fields))
    except Exception:
        return None


def _plan(kind: Any, data: tuple[str, ...], meta: tuple[str, ...]):
    if not isinstance(kind, type) or not dataclasses.is_dataclass(kind):
        return None
    if type(kind).__call__ is not type.__call__ or kind.__new__ is not object.__new__:
        return None
    if hasattr(kind, "__post_init__"):
        return None
    init = kind.__init__
    if type(init) is not types.FunctionType:
        return None
    code = init.__code__
    if (
        code.co_filename != "<string>"
        or code.co_name != "__init__"
        or code.co_qualname != _GENERATED_QUALNAME
        or code.co_flags & _STAR_ARGS
        or code.co_posonlyargcount
    ):
        return None
    params = code.co_varnames[1 : code.co_argcount + code.co_kwonlyargcount]
    fields = dataclasses.fields(kind)
    names = [f.name for f in fields]
    if any(not f.init for f in fields) or sorted(params) != sorted(names):
        return None
    if len(data) + len(meta) != len(names) or set(data) | set(meta) != set(names):
        return None
    if not set(code.co_names) <= {*names, "__setattr__"}:
        return None
    # What `__init__` closes over: `object` (frozen), the factory marker, the factories.
    signature = inspect.signature(init)
    factories = {f.name: f.default_factory for f in fields}
    markers = {
        name: signature.parameters[name].default
        for name, factory in factories.items()
        if factory is not dataclasses.MISSING
    }
    allowed = [object, *markers.values(), *(f for f in factories.values())]
    cells = init.__closure__ or ()
    if any(not any(cell.cell_contents is ok for ok in allowed) for cell in cells):
        return None
    if "__setattr__" in code.co_names:
        # `object.__setattr__(self, name, value)`: refused by CPython if a C base
        # overrides `__setattr__`; a Python-level `__setattr__` (a frozen class's) is
        # bypassed, as the generic assignment does.
        for base in kind.__mro__[:-1]:
            own = vars(base).get("__setattr__")
            if own is not None and type(own) is not types.FunctionType:
                return None
    elif kind.__setattr__ is not object.__setattr__:
        return None
    plan = []
    for name in names:
        is_meta = name in meta
        index = meta.index(name) if is_meta else data.index(name)
        plan.append((name, is_meta, index, markers.get(name)))
    return tuple(plan)
