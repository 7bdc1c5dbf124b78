"""An Equinox-based library program, run by Equinox and by filterjax (`patch_equinox`).

The program is a small ODE library written only against Equinox: an `eqx.Module` vector
field, a fixed-step RK4 integrator in `lax.while_loop`, and `eqx.error_if` to fail at run
time when the step budget is exhausted or the state stops being finite. Its entry point is
built with `eqx.filter_jit`, so under `filterjax.patch_equinox()` the same code compiles
with filterjax's `filter_jit`. Per-call time of one solve (interleaved rounds, medians).

    python benches/bench_equinox_program.py            # table (script mode)
    python -m pytest benches/bench_equinox_program.py  # pytest-benchmark
"""

from __future__ import annotations

import os

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from _timing import each_backend, measure

import filterjax

# --- the library (Equinox only) ----------------------------------------------------------


class Oscillator(eqx.Module):
    """dy/dt for a damped oscillator with a learnable stiffness matrix."""

    stiffness: jax.Array
    damping: float = 0.1

    def __call__(self, t, y):
        position, velocity = y
        return velocity, -self.stiffness @ position - self.damping * velocity


class RK4(eqx.Module):
    vector_field: eqx.Module
    max_steps: int = 1000

    def step(self, t, y, dt):
        f = self.vector_field
        add = lambda y, k, c: jax.tree.map(lambda a, b: a + c * b, y, k)  # noqa: E731
        k1 = f(t, y)
        k2 = f(t + dt / 2, add(y, k1, dt / 2))
        k3 = f(t + dt / 2, add(y, k2, dt / 2))
        k4 = f(t + dt, add(y, k3, dt))
        return jax.tree.map(
            lambda y, a, b, c, d: y + dt / 6 * (a + 2 * b + 2 * c + d), y, k1, k2, k3, k4
        )

    def solve(self, y0, t1, dt):
        def cond(carry):
            step, t, _ = carry
            return (t < t1) & (step < self.max_steps)

        def body(carry):
            step, t, y = carry
            return step + 1, t + dt, self.step(t, y, dt)

        steps, t, y = jax.lax.while_loop(cond, body, (0, jnp.zeros(()), y0))
        y = eqx.error_if(y, t < t1, "RK4: max_steps reached before t1")
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in y]))
        return eqx.error_if(y, ~finite, "RK4: the solution is not finite")


def make_solve():
    """The library's entry point: built with whatever `eqx.filter_jit` is at call time."""
    return eqx.filter_jit(lambda solver, y0, t1, dt: solver.solve(y0, t1, dt))


def problem(max_steps: int = 1000):
    stiffness = jnp.eye(4) + 0.1 * jax.random.normal(jax.random.key(0), (4, 4))
    solver = RK4(Oscillator(stiffness), max_steps=max_steps)
    y0 = (jnp.ones(4), jnp.zeros(4))
    return solver, y0


# --- timing ------------------------------------------------------------------------------


def contenders() -> dict:
    solver, y0 = problem()
    theirs = make_solve()
    with filterjax.patch_equinox():
        ours = make_solve()
    assert ours is not theirs and type(ours) is not type(theirs)
    return {
        "equinox": lambda: theirs(solver, y0, 1.0, 0.01),
        "filterjax (patch_equinox)": lambda: ours(solver, y0, 1.0, 0.01),
    }


@pytest.mark.parametrize("impl", ["equinox", "filterjax (patch_equinox)"])
def test_per_call(benchmark, impl):
    call = contenders()[impl]
    jax.block_until_ready(call())
    benchmark.group = "RK4 solve, 100 steps"
    benchmark(call)


def main() -> None:
    repeats = int(os.environ.get("BENCH_REPEATS", "15"))
    calls = max(2, int(200 * float(os.environ.get("BENCH_CALLS_SCALE", "1"))))
    rows = []
    for backend in each_backend():
        rows.append((backend, measure(contenders(), calls, repeats)))
    lines = [
        "| backend | equinox µs | filterjax (patch_equinox) µs | equinox / filterjax |",
        "|---|---|---|---|",
    ]
    for backend, t in rows:
        theirs, ours = t["equinox"], t["filterjax (patch_equinox)"]
        lines.append(f"| {backend} | {theirs:.1f} | {ours:.1f} | {theirs / ours:.2f} |")
    table = "\n".join(lines)
    print(table)
    out = os.path.join(os.path.dirname(__file__), "results", "equinox_program.md")
    with open(out, "w") as f:
        f.write(
            f"Per-call time of one RK4 solve (100 steps, `eqx.error_if` checks), median of "
            f"{repeats} interleaved rounds of {calls} calls, "
            "`python benches/bench_equinox_program.py`, "
            f"jax {jax.__version__}, equinox {eqx.__version__}.\n\n{table}\n"
        )


if __name__ == "__main__":
    main()
