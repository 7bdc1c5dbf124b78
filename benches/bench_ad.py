"""Per-call cost of the autodiff transforms.

- training step: `filter_jit(filter_value_and_grad(loss))(model, x, y)` against the
  hand-split `jax.jit(jax.value_and_grad(...))` (the model partitioned once by hand with
  `eqx.partition`, arrays passed, statics closed over) and against Equinox.
- eager gradient: un-jitted `filter_grad(loss)(model, x, y)` against `equinox.filter_grad`
  (and hand-split `jax.grad` for reference).

    python benches/bench_ad.py             # side-by-side table (medians, one process)
    python -m pytest benches/bench_ad.py   # pytest-benchmark, grouped by case
"""

from __future__ import annotations

import os
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from _timing import each_backend, measure

import filterjax as fj


def _loss(model, x, y):
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def problem():
    key_m, key_x, key_y = jax.random.split(jax.random.key(0), 3)
    model = eqx.nn.MLP(8, 8, 32, 2, key=key_m)
    x = jax.random.normal(key_x, (16, 8))
    y = jax.random.normal(key_y, (16, 8))
    return model, x, y


def training_step_contenders() -> dict[str, Callable[[], object]]:
    model, x, y = problem()
    params, static = eqx.partition(model, eqx.is_array)
    hand = jax.jit(jax.value_and_grad(lambda p, x, y: _loss(eqx.combine(p, static), x, y)))
    ours = fj.filter_jit(fj.filter_value_and_grad(_loss))
    theirs = eqx.filter_jit(eqx.filter_value_and_grad(_loss))
    return {
        "jax (hand-split)": lambda: hand(params, x, y),
        "filterjax": lambda: ours(model, x, y),
        "equinox": lambda: theirs(model, x, y),
    }


def eager_grad_contenders() -> dict[str, Callable[[], object]]:
    model, x, y = problem()
    params, static = eqx.partition(model, eqx.is_inexact_array)
    hand = jax.grad(lambda p, x, y: _loss(eqx.combine(p, static), x, y))
    ours = fj.filter_grad(_loss)
    theirs = eqx.filter_grad(_loss)
    return {
        "jax (hand-split)": lambda: hand(params, x, y),
        "filterjax": lambda: ours(model, x, y),
        "equinox": lambda: theirs(model, x, y),
    }


def _small_loss(tree, scale):
    return jnp.sum(tree["w"] ** 2) * scale + jnp.sum(tree["b"])


def eager_small_grad_contenders() -> dict[str, Callable[[], object]]:
    """A cheap function, so that the per-call work around JAX's own AD is visible."""
    tree = {"w": jnp.ones(3), "b": jnp.ones(2), "n": 3, "act": "relu", "i": jnp.arange(2)}
    params, static = eqx.partition(tree, eqx.is_inexact_array)
    hand = jax.grad(lambda p, s: _small_loss(eqx.combine(p, static), s))
    ours = fj.filter_grad(_small_loss)
    theirs = eqx.filter_grad(_small_loss)
    return {
        "jax (hand-split)": lambda: hand(params, 2.0),
        "filterjax": lambda: ours(tree, 2.0),
        "equinox": lambda: theirs(tree, 2.0),
    }


# name -> (contenders, calls per timed batch; 1 = time single calls, interleaved)
CASES = {
    "training step (jit, MLP(8, 8, 32, 2))": (training_step_contenders, 300),
    "eager filter_grad (MLP(8, 8, 32, 2))": (eager_grad_contenders, 1),
    "eager filter_grad (dict: 2 float arrays + 3 others)": (eager_small_grad_contenders, 1),
}


# --- pytest-benchmark -------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", ["jax (hand-split)", "filterjax", "equinox"])
def test_per_call(benchmark, case, impl):
    make, _ = CASES[case]
    call = make()[impl]
    jax.block_until_ready(call())
    benchmark.group = case
    benchmark(call)


# --- script mode -------------------------------------------------------------------------


def main() -> None:
    repeats = int(os.environ.get("BENCH_REPEATS", "15"))
    scale = float(os.environ.get("BENCH_CALLS_SCALE", "1"))
    single_call_repeats = int(os.environ.get("BENCH_SINGLE_CALL_REPEATS", "300"))
    rows = []
    for backend in each_backend():
        for case, (make, calls) in CASES.items():
            if calls == 1:
                times = measure(make(), 1, single_call_repeats)
            else:
                times = measure(make(), max(2, int(calls * scale)), repeats)
            rows.append((backend, case, times))
    header = (
        "| backend | case | jax hand-split µs | filterjax µs | equinox µs "
        "| filterjax / jax | equinox / filterjax |"
    )
    lines = [header, "|" + "---|" * 7]
    for backend, case, t in rows:
        base, ours, theirs = t["jax (hand-split)"], t["filterjax"], t["equinox"]
        lines.append(
            f"| {backend} | {case} | {base:.1f} | {ours:.1f} | {theirs:.1f} "
            f"| {ours / base:.2f} | {theirs / ours:.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    out = os.path.join(os.path.dirname(__file__), "results", "ad.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(
            f"Per-call time, median of {repeats} interleaved rounds of {300 * scale:.0f} "
            f"calls (jit case) or of {single_call_repeats} interleaved single calls (eager "
            "cases), `python benches/bench_ad.py`, "
            f"jax {jax.__version__}, equinox {eqx.__version__}. Targets: training step "
            "filterjax / jax <= 1.25; eager filter_grad no slower than Equinox "
            "(equinox / filterjax >= 1).\n\n"
            f"{table}\n"
        )


if __name__ == "__main__":
    main()
