"""Argument-binding plans: how calls of one shape map onto a signature's normal form.

A plan is made once per call shape (number of positionals, keyword names) by binding
placeholders, and applied on every call by the core's Dispatchers (`apply_plan` here, its
twin in `rust/dispatch.rs`). Imports nothing from filterjax, so both layers can use it.
"""

from __future__ import annotations

import inspect
from typing import Any

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


def make_plan(signature: inspect.Signature | None, args: tuple, kwargs: dict) -> Any:
    """How calls shaped like `(args, kwargs)` map onto `signature.bind(...)`'s normal form.

    `IDENTITY_PLAN`, or `(argument sources, ((keyword, source), ...))` where a source is a
    position in the call's `args` or a name in its `kwargs`: the form the core's
    Dispatchers apply (`apply_plan`). Raises the TypeError `signature.bind` raises
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


def apply_plan(plan: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """`(args, kwargs)` bound by `plan = (argument sources, keyword sources)`, where a
    source is a position in `args` or a name in `kwargs`; None if the call does not fit."""
    if type(plan) is not tuple or len(plan) != 2:
        return None
    arg_sources, kw_sources = plan
    try:
        bound_args = tuple(
            kwargs[source] if type(source) is str else args[source] for source in arg_sources
        )
        bound_kwargs = {
            name: kwargs[source] if type(source) is str else args[source]
            for name, source in kw_sources
        }
    except (KeyError, IndexError):
        return None
    return bound_args, bound_kwargs
