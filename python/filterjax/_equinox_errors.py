"""Equinox's run-time errors (`eqx.error_if`, `eqx.branched_error_if`) through filterjax.

How Equinox reports them (facts about Equinox, which filterjax never imports):

- At trace time, `error_if` walks the Python stack and records, innermost first, every
  frame's text and every `bytes` value a frame holds in a local named
  `__equinox_jit_id__` (the marker Equinox's own `filter_jit` frames carry).
- At run time, when the check fails, a host callback stores `(message, that stack)` in
  `equinox._jit.last_error_info` and raises Equinox's internal `_EquinoxRuntimeError`;
  JAX hands it to the caller wrapped in a `JaxRuntimeError`/`ValueError` whose text
  contains `_EquinoxRuntimeError: ` and a request to use `equinox.filter_jit`.
- `equinox.filter_jit` catches that and raises `equinox.EquinoxRuntimeError` instead,
  showing the stack from the `error_if` call up to its own frame.

filterjax does the same for its compiled programs: the traced function's frame carries
`FRAME_MARKER` under Equinox's local name (see `_compile_utils.run_and_split_output`), and
`translate` turns the wrapped error into Equinox's exception. Nothing here imports
Equinox: it is looked up in `sys.modules`, so a program that never imported Equinox
cannot have raised one of its errors.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import threading
import weakref
from typing import Any

__all__ = [
    "FRAME_MARKER",
    "MARKER_NAME",
    "fresh_stacks",
    "replacement_for",
    "trace_has_check",
    "translate",
    "translated",
    "watching",
]

# The local variable name Equinox's stack walk looks for, and filterjax's value for it.
# Any `bytes` works; Equinox only compares it with the ids of its own jit calls.
MARKER_NAME = "__equinox_jit_id__"
FRAME_MARKER: bytes = b"filterjax:" + os.urandom(16)

# What JAX's wrapped error says when the host callback raised Equinox's internal error.
_INTERNAL_NAME = "_EquinoxRuntimeError"
_INTERNAL_ERROR = _INTERNAL_NAME + ": "
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep

_lock = threading.Lock()
_log_filter_installed = False


class _DropEquinoxCallbackLogs(logging.Filter):
    """Drops JAX's "pure_callback failed" log record for Equinox's own error only.

    JAX logs every exception a host callback raises, with its traceback; for an Equinox
    error check that is the (long) text the user then receives as an exception anyway.
    `equinox.filter_jit` silences the same record while it runs.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        info = record.exc_info
        if not info or info[0] is None:
            return True
        return info[0].__name__ != _INTERNAL_NAME


def watching() -> bool:
    """True if the program has imported Equinox, so its run-time errors may be raised.

    The first time it is true, this also silences JAX's log record for a failed Equinox
    error check (see `_DropEquinoxCallbackLogs`). Cheap: one dict lookup afterwards.
    """
    global _log_filter_installed
    if "equinox" not in sys.modules:
        return False
    if not _log_filter_installed:
        with _lock:
            if not _log_filter_installed:
                logging.getLogger("jax._src.callback").addFilter(_DropEquinoxCallbackLogs())
                _log_filter_installed = True
    return True


def _inside_jit_stack(stack: Any) -> str:
    """The frames Equinox recorded (innermost first), from the `error_if` call out to the
    outermost filterjax-compiled function's frame, filterjax's own frames left out.

    Without filterjax's marker (the check was traced for a program that filterjax did not
    trace, and reused), the frames stop at the innermost Equinox jit; with no jit marker
    at all, none are shown: the frames beyond a marker belong to the call that traced the
    check, which need not be the one that failed."""
    items = list(stack) if isinstance(stack, list | tuple) else []
    markers = [i for i, item in enumerate(items) if type(item) is bytes]
    ours = [i for i in markers if items[i] == FRAME_MARKER]
    if ours:
        end = ours[-1]
    elif markers:
        end = markers[0]
    else:
        return ""
    pieces = [item for item in items[:end] if type(item) is str and _PACKAGE_DIR not in item]
    return "".join(reversed(pieces))


def fresh_stacks() -> None:
    """Make the `error_if` checks traced from here on record this trace's stack.

    Equinox records the stack when it traces a check, inside its own `jax.jit` of the
    check; a later trace that reaches the same check with the same shapes reuses JAX's
    cached trace of it, stack and all, so a failure would show the frames of whichever call
    traced the check first. Called where filterjax traces a function (never on a cache
    hit), this evicts that one function from JAX's trace caches (and nothing else: every
    other function keeps its traces), so the check is traced again under the current
    stack. Does nothing unless Equinox is imported, or where JAX keeps no such caches."""
    errors = sys.modules.get("equinox._errors")
    if errors is None:
        return
    jitted = getattr(getattr(errors, "branched_error_if_impl_jit", None), "_cached", None)
    fun = getattr(jitted, "_fun", None)
    if fun is None:
        return
    for cache in _trace_caches():
        try:
            cache.evict_weakref(fun)
        except Exception:  # another JAX: stacks may be stale, nothing worse
            pass


def _trace_caches() -> tuple:
    """JAX's per-function trace caches that can forget one function (jax >= 0.8); none
    on older releases, where a check's stack is the one of the trace that first reached it."""
    try:
        from jax._src import pjit
        from jax._src.interpreters import partial_eval
    except ImportError:
        return ()
    caches = (
        getattr(pjit, "_infer_params_cached", None),
        getattr(partial_eval, "trace_to_jaxpr", None),
    )
    if not all(hasattr(cache, "evict_weakref") for cache in caches):
        return ()
    return caches


def trace_has_check() -> bool:
    """Whether the function JAX is tracing right now has reached an Equinox error check
    (`eqx.error_if` and kin, which fail through a `jax.pure_callback` of Equinox's) so far,
    in its own equations or any nested program (a `jit`, `cond`, `scan` in it).

    False without Equinox imported. True when this JAX's trace cannot be read: a program
    is then assumed to hold a check, and its callers wait for its results."""
    if "equinox" not in sys.modules:
        return False
    try:
        from jax._src import core as jax_core

        frame = jax_core.trace_ctx.trace.frame
        # `tracing_eqns` from jax 0.8 on; older releases keep the equations in `eqns`.
        eqns = list(frame.tracing_eqns if hasattr(frame, "tracing_eqns") else frame.eqns)
        subprograms = jax_core.jaxprs_in_params
    except Exception:
        return True
    seen: set[int] = set()
    while eqns:
        eqn = eqns.pop()
        if isinstance(eqn, weakref.ref):  # an equation JAX may drop as unused
            eqn = eqn()
            if eqn is None:
                continue
        try:
            if eqn.primitive.name == "pure_callback" and _is_equinox_callback(eqn.params):
                return True
            for jaxpr in subprograms(eqn.params):
                if id(jaxpr) not in seen:
                    seen.add(id(jaxpr))
                    eqns.extend(jaxpr.eqns)
        except Exception:
            return True
    return False


def _is_equinox_callback(params: dict) -> bool:
    callback = params.get("callback")
    fun = getattr(callback, "callback_func", callback)
    while isinstance(fun, functools.partial):
        fun = fun.func
    module = getattr(fun, "__module__", None)
    return isinstance(module, str) and (module == "equinox" or module.startswith("equinox."))


def stacks_are_fresh() -> bool:
    """Whether `fresh_stacks` can work on this jax (see `_trace_caches`)."""
    return bool(_trace_caches())


def _message(msg: str, stack: Any) -> str:
    frames = _inside_jit_stack(stack)
    equinox_jit = sys.modules.get("equinox._jit")
    template = getattr(equinox_jit, "_on_error_msg", None)
    if isinstance(template, str):
        try:
            return template.format(msg=msg, stack=frames)
        except (KeyError, IndexError, ValueError):
            pass
    where = f"Stack inside the compiled program:\n{frames}\n" if frames else ""
    return f"{where}equinox.EquinoxRuntimeError: {msg}"


def translate(exc: BaseException) -> BaseException | None:
    """The exception to raise instead of `exc`, or None to raise `exc` itself.

    `exc` is what calling a compiled program raised. If it is JAX's report of a failed
    Equinox error check (and Equinox is imported), the answer is an
    `equinox.EquinoxRuntimeError` carrying the check's message and the stack inside the
    program, as `equinox.filter_jit` would raise. Raise it `from None`: the JAX error
    adds nothing but a long internal traceback.
    """
    equinox = sys.modules.get("equinox")
    if equinox is None or not isinstance(exc, Exception):
        return None
    try:
        text = str(exc)
    except Exception:
        return None
    if _INTERNAL_ERROR not in text:
        return None
    error_type = getattr(equinox, "EquinoxRuntimeError", None)
    info = getattr(sys.modules.get("equinox._jit"), "last_error_info", None)
    if not (isinstance(error_type, type) and issubclass(error_type, BaseException)):
        return None
    if isinstance(info, tuple) and len(info) == 2 and isinstance(info[0], str):
        msg, stack = info
    else:
        # Equinox did not leave the message where it usually does: take it from the text.
        msg = text.split(_INTERNAL_ERROR, 1)[1].split("\n\n\n", 1)[0]
        stack = ()
    return error_type(_message(msg, stack))


def replacement_for(exc: BaseException) -> BaseException | None:
    """`translate(exc)`, ready to be raised in its place: with no cause or context shown
    (the JAX error adds nothing but a long internal traceback). The hook the core's
    Dispatchers call when a compiled program raises."""
    replacement = translate(exc)
    if replacement is not None:
        replacement.__cause__ = None
        replacement.__suppress_context__ = True
    return replacement


@contextlib.contextmanager
def translated():
    """Run the block, raising Equinox's exception in place of JAX's report of one."""
    try:
        yield
    except Exception as err:
        replacement = replacement_for(err)
        if replacement is None:
            raise
        raise replacement  # noqa: B904 - its context is suppressed by replacement_for
