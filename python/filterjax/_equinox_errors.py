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
import logging
import os
import sys
import threading
from typing import Any

__all__ = ["FRAME_MARKER", "MARKER_NAME", "replacement_for", "translate", "translated", "watching"]

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
    """The frames Equinox recorded, from the `error_if` call out to filterjax's frame."""
    pieces: list[str] = []
    for item in stack if isinstance(stack, list | tuple) else ():
        if type(item) is bytes:
            if item == FRAME_MARKER:
                break
        elif type(item) is str and _PACKAGE_DIR not in item:
            pieces.append(item)
    return "".join(reversed(pieces))


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
