"""Real libraries built on Equinox (diffrax, lineax, optimistix) run unchanged under
`filterjax.patch_equinox()`: same results, same run-time errors, no extra compiles.

Each run is a fresh interpreter, patched before the libraries are imported (as a user's
program does it), and its printed results are compared with an unpatched run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import filterjax as fj
from filterjax import _backend

pytest.importorskip("diffrax")
pytest.importorskip("lineax")
pytest.importorskip("optimistix")

_PROGRAM = textwrap.dedent(
    """
    import json, sys
    import filterjax
    if sys.argv[1] == "patched":
        filterjax.patch_equinox()
    import equinox as eqx, jax, jax.numpy as jnp
    import diffrax, lineax as lx, optimistix as optx

    results = {}
    traces = []

    def vector_field(t, y, k):
        traces.append(1)
        return -k * y

    term = diffrax.ODETerm(vector_field)
    controller = diffrax.PIDController(rtol=1e-6, atol=1e-6)

    def solve(y0, k, t1=1.0, max_steps=4096):
        return diffrax.diffeqsolve(
            term, diffrax.Tsit5(), 0.0, t1, 0.1, y0, args=k,
            stepsize_controller=controller, max_steps=max_steps,
        ).ys

    for k in (1.0, 2.0, 3.0):  # new arrays, same program: fresh wrappers each time
        results[f"ode k={k}"] = eqx.filter_jit(solve)(jnp.ones(3), jnp.asarray(k)).tolist()
    results["ode traces"] = len(traces)
    results["ode grad"] = float(
        eqx.filter_grad(lambda k: solve(jnp.ones(3), k).sum())(jnp.asarray(2.0))
    )

    def error_of(thunk):
        try:
            jax.block_until_ready(thunk())
        except Exception as err:
            return type(err).__name__
        return None

    results["ode max_steps"] = error_of(lambda: solve(jnp.ones(3), 2.0, 100.0, 4))
    A = jnp.array([[3.0, 1.0], [1.0, 2.0]])
    results["linear"] = lx.linear_solve(
        lx.MatrixLinearOperator(A), jnp.array([1.0, 2.0])
    ).value.tolist()
    results["linear singular"] = error_of(
        lambda: lx.linear_solve(
            lx.MatrixLinearOperator(jnp.zeros((2, 2))), jnp.ones(2), solver=lx.LU()
        ).value
    )
    newton = optx.Newton(rtol=1e-6, atol=1e-6)
    results["root"] = float(
        optx.root_find(lambda y, a: y**2 - a, newton, jnp.array(1.0), args=jnp.array(2.0)).value
    )
    results["root diverges"] = error_of(
        lambda: optx.root_find(lambda y, a: y**2 + 1.0, newton, jnp.array(1.0), max_steps=5).value
    )
    results["patched"] = eqx.filter_jit is filterjax.filter_jit
    print(json.dumps(results))
    """
)


def _run(mode: str) -> dict:
    package_parent = os.path.dirname(os.path.dirname(fj.__file__))
    env = {**os.environ, "PYTHONPATH": package_parent, "JAX_PLATFORMS": "cpu"}
    env["FILTERJAX_BACKEND"] = _backend.backend()
    result = subprocess.run(
        [sys.executable, "-c", _PROGRAM, mode],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_diffrax_lineax_optimistix_match_equinox_under_patch_equinox():
    plain = _run("plain")
    patched = _run("patched")
    assert patched.pop("patched") is True and plain.pop("patched") is False
    assert patched.keys() == plain.keys()
    for name, value in plain.items():
        if isinstance(value, float | list):
            assert json.dumps(patched[name]) == json.dumps(value) or _close(patched[name], value)
        else:
            assert patched[name] == value, name
    # The run-time checks really fired, as Equinox's own error type.
    assert plain["ode max_steps"] == "EquinoxRuntimeError"
    assert plain["linear singular"] == "EquinoxRuntimeError"
    assert plain["root diverges"] == "EquinoxRuntimeError"


def _close(a, b) -> bool:
    import numpy as np

    return bool(np.allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6))
