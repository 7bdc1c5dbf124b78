"""Equinox run-time errors (`eqx.error_if`) through filterjax's transforms.

Under `equinox.filter_jit` a failed check reaches the caller as
`equinox.EquinoxRuntimeError` carrying the check's message; filterjax's compiled
transforms must do the same, and the next call must work normally.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax_features import needs_pmap_error_recovery

import filterjax as fj
from filterjax import _equinox_errors


def _checked(x):
    return eqx.error_if(x, x < 0, "x must be >= 0") * 2


def _assert_equinox_error(info, message: str) -> None:
    assert type(info.value) is eqx.EquinoxRuntimeError
    text = str(info.value)
    assert message in text
    # Not JAX's wrapped report, nor its advice to use equinox.filter_jit.
    assert "wrap your program" not in text and "CpuCallback" not in text


def test_error_if_in_filter_jit_raises_equinox_runtime_error():
    f = fj.filter_jit(_checked)
    np.testing.assert_allclose(f(jnp.array(1.0)), 2.0)
    with pytest.raises(eqx.EquinoxRuntimeError) as info:
        f(jnp.array(-1.0))
    _assert_equinox_error(info, "x must be >= 0")
    assert info.value.__cause__ is None and info.value.__suppress_context__
    # The next calls work normally, again through the cached program.
    np.testing.assert_allclose(f(jnp.array(3.0)), 6.0)
    with pytest.raises(eqx.EquinoxRuntimeError, match="x must be >= 0"):
        f(jnp.array(-2.0))
    np.testing.assert_allclose(f(jnp.array(4.0)), 8.0)


def test_error_raised_on_the_first_call_and_with_static_arguments():
    f = fj.filter_jit(lambda x, scale: eqx.error_if(x, x < 0, f"negative ({scale})") * scale)
    with pytest.raises(eqx.EquinoxRuntimeError, match=r"negative \(3\)"):
        f(jnp.array(-1.0), 3)  # traced and raised in the same call
    np.testing.assert_allclose(f(jnp.array(1.0), 3), 3.0)
    with pytest.raises(eqx.EquinoxRuntimeError, match=r"negative \(5\)"):
        f(jnp.array(-1.0), 5)  # a new static value: a second program
    np.testing.assert_allclose(f(jnp.array(1.0), 5), 5.0)


def test_same_as_equinox_filter_jit():
    ours, theirs = fj.filter_jit(_checked), eqx.filter_jit(_checked)
    for call in (ours, theirs):
        with pytest.raises(Exception) as info:
            call(jnp.array([1.0, -1.0]))
        assert type(info.value) is eqx.EquinoxRuntimeError
        assert "x must be >= 0" in str(info.value)
    np.testing.assert_allclose(ours(jnp.array([1.0])), theirs(jnp.array([1.0])))


def test_branched_error_if_picks_the_message():
    msgs = ["first problem", "second problem", "third problem"]

    @fj.filter_jit
    def f(x, i):
        return eqx.branched_error_if(x, x < 0, i, msgs)

    for i, msg in enumerate(msgs):
        with pytest.raises(eqx.EquinoxRuntimeError, match=msg):
            f(jnp.array(-1.0), jnp.array(i))
    np.testing.assert_allclose(f(jnp.array(1.0), jnp.array(2)), 1.0)


def test_the_stack_shown_ends_at_the_compiled_function():
    def inner_library_step(x):
        return eqx.error_if(x, x < 0, "step failed")

    def outer_caller_of_the_jit(f, x):
        return f(x)

    f = fj.filter_jit(lambda x: inner_library_step(x) + 1)
    with pytest.raises(eqx.EquinoxRuntimeError) as info:
        outer_caller_of_the_jit(f, jnp.array(-1.0))
    text = str(info.value)
    assert "inner_library_step" in text  # inside the compiled program
    assert "outer_caller_of_the_jit" not in text  # outside it: Python's traceback shows it
    assert "filterjax" not in text  # filterjax's own frames are left out


def _stack_functions(info) -> list[str]:
    """The function names of the frames in an EquinoxRuntimeError's stack, outermost first."""
    return re.findall(r'File "[^"]*", line \d+, in (\S+)', str(info.value))


def _shared_check(x):
    return eqx.error_if(x, x < 0, "shared check failed")


def _through_check(x):
    return _shared_check(x) + 1


def _through_other(x):
    return _through_check(x) * 2


def _call_failing(f, x=None):
    with pytest.raises(eqx.EquinoxRuntimeError, match="shared check failed") as info:
        f(jnp.array(-1.0) if x is None else x)
    return _stack_functions(info)


# jax older than 0.8 keeps no per-function trace cache that filterjax can make forget
# Equinox's check, so there the stack is the one of the trace that first reached the check
# (migrating.md says so).
needs_fresh_stacks = pytest.mark.skipif(
    not _equinox_errors.stacks_are_fresh(),
    reason=f"jax {jax.__version__} cannot re-trace Equinox's check for a fresh stack",
)


@needs_fresh_stacks
@needs_pmap_error_recovery
@pytest.mark.parametrize("earlier_jit", [eqx.filter_jit, fj.filter_jit])
def test_the_stack_is_the_failing_functions_own(earlier_jit):
    # The check is traced (and its stack recorded) once per shape by Equinox; whatever
    # failed before, the stack shown is the one of the function that failed now.
    mine = ["_through_check", "_shared_check"]
    # (Equinox's own stack is right only for the call that traced the check: not tested.)
    _call_failing(earlier_jit(_through_check))
    assert _call_failing(fj.filter_jit(_through_check)) == mine
    assert _call_failing(fj.filter_jit(_through_other)) == ["_through_other", *mine]
    assert _call_failing(fj.filter_jit(_through_check)) == mine
    devices = -jnp.ones(jax.local_device_count())
    _call_failing(earlier_jit(_through_check), devices)
    assert _call_failing(fj.filter_pmap(_through_check), devices) == mine


@needs_fresh_stacks
def test_nested_filter_jit_stack_never_shows_another_calls_frames():
    inner = fj.filter_jit(_through_check)
    assert _call_failing(inner) == ["_through_check", "_shared_check"]

    def calls_inner(x):
        return inner(x) - 1

    # `inner` was traced before for these shapes, so its check is reused from then: the
    # stack shows the frames inside `inner` only, never those of the earlier call.
    stack = _call_failing(fj.filter_jit(calls_inner))
    assert stack[-2:] == ["_through_check", "_shared_check"]
    assert "_call_failing" not in stack and "<module>" not in stack


def test_after_patch_equinox():
    class Solver(eqx.Module):
        max_steps: int

        @eqx.filter_jit  # Equinox's own, bound at class creation: left alone by the patch
        def solve_eqx(self, y0):
            return self._solve(y0)

        def _solve(self, y0):
            def cond(carry):
                step, y = carry
                return (y > 1e-3) & (step < self.max_steps)

            def body(carry):
                step, y = carry
                return step + 1, y / 2

            steps, y = jax.lax.while_loop(cond, body, (0, y0))
            return eqx.error_if(y, steps >= self.max_steps, "max_steps reached")

    with fj.patch_equinox():
        solve = eqx.filter_jit(Solver._solve)
        assert isinstance(solve, type(fj.filter_jit(_checked)))
        solver = Solver(max_steps=4)
        with pytest.raises(eqx.EquinoxRuntimeError, match="max_steps reached"):
            solve(solver, jnp.array(1.0))
        assert float(solve(Solver(max_steps=100), jnp.array(1.0))) < 1e-3
        with pytest.raises(eqx.EquinoxRuntimeError, match="max_steps reached"):
            solver.solve_eqx(jnp.array(1.0))


def test_nested_filter_jits_and_equinox_jit_around_filterjax():
    inner = fj.filter_jit(_checked)
    outer = fj.filter_jit(lambda x: inner(x) + 1)
    with pytest.raises(eqx.EquinoxRuntimeError, match="x must be >= 0"):
        outer(jnp.array(-1.0))
    np.testing.assert_allclose(outer(jnp.array(1.0)), 3.0)
    around = eqx.filter_jit(lambda x: inner(x) + 1)
    with pytest.raises(eqx.EquinoxRuntimeError, match="x must be >= 0"):
        around(jnp.array(-1.0))


def test_aot_compiled_program():
    compiled = fj.filter_jit(_checked).lower(jnp.array(1.0)).compile()
    with pytest.raises(eqx.EquinoxRuntimeError, match="x must be >= 0"):
        compiled(jnp.array(-1.0))
    np.testing.assert_allclose(compiled(jnp.array(2.0)), 4.0)


def test_donating_filter_jit():
    f = fj.filter_jit(_checked, donate="all")
    with pytest.raises(eqx.EquinoxRuntimeError, match="x must be >= 0"):
        f(jnp.array(-1.0))
    np.testing.assert_allclose(f(jnp.array(1.0)), 2.0)


@pytest.mark.parametrize(
    "name",
    [
        "filter_vmap",
        "filter_grad",
        pytest.param("filter_pmap", marks=needs_pmap_error_recovery),
    ],
)
def test_other_transforms_raise_equinox_runtime_error(name):
    def loss(x):
        return jnp.sum(_checked(x))

    fun = loss if name == "filter_grad" else _checked
    x = -jnp.ones(jax.local_device_count())
    with pytest.raises(eqx.EquinoxRuntimeError, match="x must be >= 0"):
        getattr(fj, name)(fun)(x)
    good = getattr(fj, name)(fun)(-x)
    np.testing.assert_allclose(good, 2.0)


def test_other_errors_are_left_alone():
    def fails(x):
        raise ZeroDivisionError("not an Equinox error")

    @fj.filter_jit
    def f(x):
        return jax.pure_callback(fails, jax.ShapeDtypeStruct((), jnp.float32), x)

    with pytest.raises(Exception, match="not an Equinox error") as info:
        f(jnp.array(1.0))
    assert type(info.value) is not eqx.EquinoxRuntimeError
    with pytest.raises(ValueError, match="boom"):
        fj.filter_jit(lambda x: (_ for _ in ()).throw(ValueError("boom")))(jnp.array(1.0))


def test_trace_time_equinox_errors_pass_through():
    # A predicate known at trace time raises Equinox's trace-time error, unchanged.
    f = fj.filter_jit(lambda x: eqx.error_if(x, True, "always"))
    with pytest.raises(eqx.EquinoxTracetimeError, match="always"):
        f(jnp.array(1.0))


@pytest.mark.single_backend
def test_translate_interface(monkeypatch):
    assert _equinox_errors.translate(ValueError("unrelated")) is None
    assert _equinox_errors.translate(KeyboardInterrupt()) is None
    wrapped = ValueError("INTERNAL: ... _EquinoxRuntimeError: the message\n\n\n---- advice")
    monkeypatch.setattr(sys.modules["equinox._jit"], "last_error_info", None)
    translated = _equinox_errors.translate(wrapped)
    assert type(translated) is eqx.EquinoxRuntimeError
    assert "the message" in str(translated) and "advice" not in str(translated)
    monkeypatch.setattr(
        sys.modules["equinox._jit"], "last_error_info", ("from the callback", ["  frame\n"])
    )
    assert "from the callback" in str(_equinox_errors.translate(wrapped))
    # Without Equinox imported, nothing can be an Equinox error.
    monkeypatch.delitem(sys.modules, "equinox")
    assert _equinox_errors.translate(wrapped) is None
    assert not _equinox_errors.watching()


def test_jax_callback_log_is_silenced_for_equinox_errors_only(caplog):
    f = fj.filter_jit(_checked)
    with caplog.at_level(logging.ERROR, logger="jax._src.callback"):
        with pytest.raises(eqx.EquinoxRuntimeError):
            f(jnp.array(-1.0))
    assert not [r for r in caplog.records if "pure_callback failed" in r.getMessage()]


@pytest.mark.single_backend
def test_filterjax_never_imports_equinox():
    code = textwrap.dedent(
        """
        import sys, jax, jax.numpy as jnp, filterjax as fj
        f = fj.filter_jit(lambda x: x * 2)
        assert float(f(jnp.array(1.0))) == 2.0
        try:
            fj.filter_jit(lambda x: jax.pure_callback(
                lambda v: 1 / 0, jax.ShapeDtypeStruct((), jnp.float32), x))(jnp.array(1.0))
        except Exception as err:
            assert "ZeroDivisionError" in str(err), err
        else:
            raise AssertionError("no error")
        assert "equinox" not in sys.modules
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"


@needs_pmap_error_recovery
def test_caught_runtime_errors_leave_no_traceback_at_exit(backend):
    # A failed check in a pmapped program leaves failed effect tokens that JAX waits on
    # at exit; once filter_pmap has raised the error, nothing must be printed again then.
    code = textwrap.dedent(
        """
        import equinox as eqx, jax, jax.numpy as jnp, filterjax as fj

        def checked(x):
            return eqx.error_if(x, x < 0, "x must be >= 0") * 2

        n = jax.local_device_count()
        assert n == 2, n
        for name in ("filter_pmap", "filter_jit", "filter_vmap"):
            f = getattr(fj, name)(checked)
            try:
                f(-jnp.ones(n))
            except eqx.EquinoxRuntimeError as err:
                assert "x must be >= 0" in str(err)
            else:
                raise AssertionError(name + " raised nothing")
            assert float(f(jnp.ones(n)).sum()) == 2 * n
        print("ok")
        """
    )
    env = {
        **os.environ,
        "FILTERJAX_BACKEND": backend,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
    }
    env.pop("JAX_NUM_CPU_DEVICES", None)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "Exception ignored" not in result.stderr, result.stderr[-3000:]


def test_fresh_stacks_leave_other_traces_alone():
    # filterjax has Equinox's check traced afresh in each of its traces; every other
    # function keeps JAX's cached traces. (Clearing JAX's trace caches wholesale made the
    # third call below trace again: the first trace failed, so JAX's C++ cache misses.)
    traces = []
    failing = [True]

    @fj.filter_jit
    def f(x, k):
        traces.append(k)
        if failing[0]:
            raise ValueError("first trace fails")
        return x * k

    x = jnp.arange(3.0)
    with pytest.raises(ValueError, match="first trace fails"):
        f(x, 2)
    failing[0] = False
    np.testing.assert_allclose(f(x, 2), x * 2)
    np.testing.assert_allclose(f(x + 1, 2), (x + 1) * 2)
    assert len(traces) == 2
