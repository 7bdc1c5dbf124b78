"""Per-call cost of filter_pmap (8 CPU devices, and one device) and eager filter_vmap.

filter_pmap is compared with hand-split `jax.pmap` (arrays passed by hand, statics closed
over) and equinox.filter_pmap; eager filter_vmap with equinox.filter_vmap and hand-split
`jax.vmap`. pmap inputs are laid out over the devices once beforehand, so the numbers are
the per-call overhead rather than host-to-device copies.

    python benches/bench_vmap_pmap.py             # side-by-side table (medians, one process)
    python -m pytest benches/bench_vmap_pmap.py   # pytest-benchmark, grouped by case
"""

from __future__ import annotations

import jax

jax.config.update("jax_num_cpu_devices", 8)

import os  # noqa: E402
from collections.abc import Callable  # noqa: E402

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402
from _timing import each_backend, measure  # noqa: E402

import filterjax as fj  # noqa: E402

N = 8


def _mlp_fn(model, x):
    return model(x)


def _many_fn(tree):
    return {k: v * 2 for k, v in tree.items() if eqx.is_array(v)}


def _scale(x, n):
    return x * n


def _tree_of(num_arrays: int, num_statics: int, lead: tuple) -> dict:
    tree = {f"a{i:04d}": jnp.full((*lead, 4), float(i)) for i in range(num_arrays)}
    tree.update({f"s{i:04d}": f"static-{i}" if i % 2 else i for i in range(num_statics)})
    return tree


def _on_devices(tree):
    """Lay the arrays of `tree` out over the devices along axis 0 (as a pmap output is)."""
    dynamic, static = eqx.partition(tree, eqx.is_array)
    return eqx.combine(jax.pmap(lambda d: d)(dynamic), static)


def pmap_cases() -> dict[str, tuple[Callable, tuple]]:
    keys = jax.random.split(jax.random.key(0), N)
    ensemble = eqx.filter_vmap(lambda k: eqx.nn.MLP(8, 8, 32, 2, key=k))(keys)
    return {
        "pmap: MLP(8, 8, 32, 2) per device": (
            _mlp_fn,
            (_on_devices(ensemble), _on_devices(jnp.ones((N, 8)))),
        ),
        "pmap: 100 arrays + 20 statics": (_many_fn, (_on_devices(_tree_of(100, 20, (N,))),)),
    }


def one_device_cases() -> dict[str, tuple[Callable, tuple]]:
    """Calls where JAX's own per-call cost is least, so ours shows most."""
    return {
        "pmap 1 device: array + int": (_scale, (jnp.ones((1, 8)), 3)),
        "pmap 1 device: 100 arrays + 20 statics": (_many_fn, (_tree_of(100, 20, (1,)),)),
    }


def vmap_cases() -> dict[str, tuple[Callable, tuple]]:
    keys = jax.random.split(jax.random.key(0), N)
    ensemble = eqx.filter_vmap(lambda k: eqx.nn.MLP(8, 8, 32, 2, key=k))(keys)
    return {
        "vmap: array + int": (_scale, (jnp.ones((N, 8)), 3)),
        "vmap: MLP(8, 8, 32, 2) ensemble": (_mlp_fn, (ensemble, jnp.ones((N, 8)))),
        "vmap: 100 arrays + 20 statics": (_many_fn, (_tree_of(100, 20, (N,)),)),
    }


def pmap_contenders(fun: Callable, args: tuple, **kwargs) -> dict[str, Callable[[], object]]:
    dynamic, static = eqx.partition(args, eqx.is_array)
    hand = jax.pmap(lambda dynamic: fun(*eqx.combine(dynamic, static)), **kwargs)
    ours = fj.filter_pmap(fun, **kwargs)
    theirs = eqx.filter_pmap(fun, **kwargs)
    return {
        "hand-split": lambda: hand(dynamic),
        "filterjax": lambda: ours(*args),
        "equinox": lambda: theirs(*args),
    }


def one_device_contenders(fun: Callable, args: tuple) -> dict[str, Callable[[], object]]:
    return pmap_contenders(fun, args, devices=jax.devices()[:1])


def vmap_contenders(fun: Callable, args: tuple) -> dict[str, Callable[[], object]]:
    dynamic, static = eqx.partition(args, eqx.is_array)
    hand = jax.vmap(lambda dynamic: fun(*eqx.combine(dynamic, static)))
    ours = fj.filter_vmap(fun)
    theirs = eqx.filter_vmap(fun)
    return {
        "hand-split": lambda: hand(dynamic),
        "filterjax": lambda: ours(*args),
        "equinox": lambda: theirs(*args),
    }


# --- pytest-benchmark -------------------------------------------------------------------

_ALL = {
    **{k: (v, pmap_contenders) for k, v in pmap_cases().items()},
    **{k: (v, one_device_contenders) for k, v in one_device_cases().items()},
    **{k: (v, vmap_contenders) for k, v in vmap_cases().items()},
}


@pytest.mark.parametrize("case", list(_ALL))
@pytest.mark.parametrize("impl", ["hand-split", "filterjax", "equinox"])
def test_per_call(benchmark, case, impl):
    (fun, args), make = _ALL[case]
    call = make(fun, args)[impl]
    jax.block_until_ready(call())
    benchmark.group = case
    benchmark(call)


# --- script mode -------------------------------------------------------------------------


def main() -> None:
    calls = int(os.environ.get("BENCH_CALLS", "50"))
    repeats = int(os.environ.get("BENCH_REPEATS", "9"))
    rows = []
    for backend in each_backend():
        for case, ((fun, args), make) in _ALL.items():
            rows.append((backend, case, measure(make(fun, args), calls, repeats)))
    header = (
        "| backend | case | hand-split jax µs | filterjax µs | equinox µs "
        "| filterjax / hand-split | equinox / filterjax |"
    )
    lines = [header, "|" + "---|" * 7]
    for backend, case, t in rows:
        base, ours, theirs = t["hand-split"], t["filterjax"], t["equinox"]
        lines.append(
            f"| {backend} | {case} | {base:.1f} | {ours:.1f} | {theirs:.1f} "
            f"| {ours / base:.2f} | {theirs / ours:.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    out = os.path.join(os.path.dirname(__file__), "results", "vmap_pmap.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(
            f"Per-call time on {N} CPU devices (`jax_num_cpu_devices`), median of {repeats} "
            f"interleaved rounds of {calls} calls (`python benches/bench_vmap_pmap.py`), "
            f"jax {jax.__version__}, equinox {eqx.__version__}. pmap inputs are already laid "
            "out over the devices; vmap is eager (not under jit).\n\n"
            f"{table}\n"
        )


if __name__ == "__main__":
    main()
