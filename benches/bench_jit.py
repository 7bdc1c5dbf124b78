"""Per-call cost of filter_jit against hand-split jax.jit and equinox.filter_jit.

Hand-split means what a careful user writes without filtering: partition the arguments
once by hand, pass only the arrays to `jax.jit`, close over the static parts.

    python benches/bench_jit.py             # side-by-side table (medians, one process)
    python -m pytest benches/bench_jit.py   # pytest-benchmark, grouped by case
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from _timing import each_backend, measure_rounds, median_ratio

import filterjax as fj


def _sum_arrays(tree):
    return sum(jnp.sum(leaf) for leaf in jax.tree_util.tree_leaves(tree) if eqx.is_array(leaf))


def _scale(x, n):
    return x * n


def _dict_fn(d):
    return d["w"] * 2 if d["act"] == "double" else d["w"]


def _mlp_fn(model, x):
    return model(x)


def _many_fn(tree):
    return _sum_arrays(tree)


def _tree_of(num_arrays: int, num_statics: int) -> dict:
    tree = {f"a{i:04d}": jnp.full((4,), float(i)) for i in range(num_arrays)}
    tree.update({f"s{i:04d}": f"static-{i}" if i % 2 else i for i in range(num_statics)})
    return tree


def cases() -> dict[str, tuple[Callable, tuple]]:
    """name -> (function, arguments)."""
    mlp = eqx.nn.MLP(8, 8, 32, 2, key=jax.random.key(0))
    return {
        "a: array + int": (_scale, (jnp.ones(8), 3)),
        "b: dict 1 array + 1 static": (_dict_fn, ({"w": jnp.ones(8), "act": "double"},)),
        "c: MLP(8, 8, 32, 2)": (_mlp_fn, (mlp, jnp.ones(8))),
        "d: 100 arrays + 20 statics": (_many_fn, (_tree_of(100, 20),)),
        "e: 1000 arrays + 50 statics": (_many_fn, (_tree_of(1000, 50),)),
    }


def hand_split(fun: Callable, args: tuple) -> Callable[[], object]:
    """`jax.jit` on the arrays only, statics closed over: the no-filtering baseline."""
    dynamic, static = eqx.partition(args, eqx.is_array)
    jitted = jax.jit(lambda dynamic: fun(*eqx.combine(dynamic, static)))
    return lambda: jitted(dynamic)


def contenders(fun: Callable, args: tuple) -> dict[str, Callable[[], object]]:
    fj_jitted = fj.filter_jit(fun)
    eqx_jitted = eqx.filter_jit(fun)
    return {
        "jax.jit (hand-split)": hand_split(fun, args),
        "filterjax": lambda: fj_jitted(*args),
        "equinox.filter_jit": lambda: eqx_jitted(*args),
    }


def _keyword_fn(x, y, scale=1.0):
    return (x + y) * scale


def keyword_contenders() -> dict[str, Callable[[], object]]:
    """One filter_jit function called positionally and by keyword (diffrax-style)."""
    f = fj.filter_jit(_keyword_fn)
    x, y = jnp.ones(8), jnp.ones(8)
    return {
        "f(x, y, 2.0)": lambda: f(x, y, 2.0),
        "f(x, y=y, scale=2.0)": lambda: f(x, y=y, scale=2.0),
        "f(x=x, y=y, scale=2.0)": lambda: f(x=x, y=y, scale=2.0),
    }


def fresh_wrapper_contenders() -> dict[str, Callable[[], object]]:
    """`filter_jit(model)(x)` with a new wrapper on every call, as Equinox programs do."""
    mlp = eqx.nn.MLP(8, 8, 32, 2, key=jax.random.key(0))
    x = jnp.ones(8)
    kept = fj.filter_jit(mlp)
    return {
        "filterjax, wrapper kept": lambda: kept(x),
        "filterjax, fresh wrapper": lambda: fj.filter_jit(mlp)(x),
        "equinox, fresh wrapper": lambda: eqx.filter_jit(mlp)(x),
    }


# --- pytest-benchmark -------------------------------------------------------------------

_CASES = cases()


@pytest.mark.parametrize("case", list(_CASES))
@pytest.mark.parametrize("impl", ["jax.jit (hand-split)", "filterjax", "equinox.filter_jit"])
def test_per_call(benchmark, case, impl):
    fun, args = _CASES[case]
    call = contenders(fun, args)[impl]
    jax.block_until_ready(call())
    benchmark.group = case
    benchmark(call)


@pytest.mark.parametrize("impl", list(keyword_contenders()))
def test_keyword_calls(benchmark, impl):
    call = keyword_contenders()[impl]
    jax.block_until_ready(call())
    benchmark.group = "keyword calls"
    benchmark(call)


@pytest.mark.parametrize("impl", list(fresh_wrapper_contenders()))
def test_fresh_wrappers(benchmark, impl):
    call = fresh_wrapper_contenders()[impl]
    jax.block_until_ready(call())
    benchmark.group = "fresh wrapper per call"
    benchmark(call)


# --- script mode -------------------------------------------------------------------------


def _relative_table(title: str, rows: list[tuple[str, dict[str, list[float]]]]) -> str:
    """One row per backend: each contender's median µs and the median of its per-round
    ratios to the first contender."""
    names = list(rows[0][1])
    header = f"| backend | {' | '.join(f'{n} µs' for n in names)} | "
    header += " | ".join(f"{n} / {names[0]}" for n in names[1:]) + " |"
    lines = [f"**{title}**", "", header, "|" + "---|" * (1 + 2 * len(names) - 1)]
    for backend, t in rows:
        base = t[names[0]]
        cells = " | ".join(f"{statistics.median(t[n]):.1f}" for n in names)
        ratios = " | ".join(f"{median_ratio(t[n], base):.2f}" for n in names[1:])
        lines.append(f"| {backend} | {cells} | {ratios} |")
    return "\n".join(lines)


def main() -> None:
    calls = int(os.environ.get("BENCH_CALLS", "300"))
    repeats = int(os.environ.get("BENCH_REPEATS", "15"))
    rows = []
    for backend in each_backend():
        for case, (fun, args) in cases().items():
            rounds = measure_rounds(contenders(fun, args), calls, repeats)
            rows.append((backend, case, rounds))
    header = (
        "| backend | case | jax.jit hand-split µs | filterjax µs | equinox µs "
        "| filterjax / jax.jit | equinox / filterjax |"
    )
    lines = [header, "|" + "---|" * 7]
    for backend, case, t in rows:
        base, ours, eqx_t = t["jax.jit (hand-split)"], t["filterjax"], t["equinox.filter_jit"]
        median = statistics.median
        lines.append(
            f"| {backend} | {case} | {median(base):.1f} | {median(ours):.1f} "
            f"| {median(eqx_t):.1f} | {median_ratio(ours, base):.2f} "
            f"| {median_ratio(eqx_t, ours):.1f} |"
        )
    keyword_rows, fresh_rows = [], []
    for backend in each_backend():
        keyword_rows.append((backend, measure_rounds(keyword_contenders(), calls, repeats)))
        fresh_rows.append(
            (backend, measure_rounds(fresh_wrapper_contenders(), calls // 3, repeats))
        )
    table = "\n\n".join(
        [
            "\n".join(lines),
            _relative_table("Keyword calls (one filter_jit function)", keyword_rows),
            _relative_table("A fresh wrapper on every call: MLP(8, 8, 32, 2)", fresh_rows),
        ]
    )
    print(table)
    out = os.path.join(os.path.dirname(__file__), "results", "jit.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(
            "Per-call time, median of "
            f"{repeats} interleaved rounds of {calls} calls; ratios are medians of the "
            "per-round ratios "
            "(`python benches/bench_jit.py`), jax "
            f"{jax.__version__}, equinox {eqx.__version__}.\n\n{table}\n"
        )


if __name__ == "__main__":
    main()
