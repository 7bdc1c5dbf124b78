"""Per-call cost of the core: partition-with-key and rebuild, and the public filtering helpers
(`filterjax.partition`, `filter`, `combine`), against `jax.tree_util` and Equinox.

Two modes:

- `pytest benches/bench_partition.py` (pytest-benchmark), one group per tree and size.
- `python benches/bench_partition.py` measures everything side by side in one process
  (interleaved repeats, median per call), prints a markdown table and writes it to
  `benches/results/partition.md`.

Trees, for 10, 100 and 1000 leaves: a flat dict of small arrays with ~19% string/int statics,
and an `equinox.nn.MLP` whose depth is chosen to give that many leaves.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import platform
import statistics
import sys
import time
import timeit
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

import filterjax as fj
from filterjax import _backend, _pycore

try:
    from filterjax import _native
except ImportError:
    _native = None

SIZES = (10, 100, 1000)
TREE_KINDS = ("dict", "mlp")


def dict_tree(num_leaves: int) -> dict:
    """Arrays, with a string at every 8th key and an int at every 16th (~19% statics)."""
    tree = {}
    for i in range(num_leaves):
        if i % 8 == 3:
            tree[f"p{i:04d}"] = f"act{i}"
        elif i % 16 == 7:
            tree[f"p{i:04d}"] = i
        else:
            tree[f"p{i:04d}"] = jnp.full((4,), float(i))
    return tree


def mlp_tree(num_leaves: int) -> eqx.nn.MLP:
    """An MLP with `num_leaves` leaves: a weight and a bias per layer plus two activations."""
    depth = max(num_leaves // 2 - 2, 0)
    return eqx.nn.MLP(2, 2, width_size=4, depth=depth, key=jax.random.PRNGKey(0))


def make_tree(kind: str, num_leaves: int):
    return dict_tree(num_leaves) if kind == "dict" else mlp_tree(num_leaves)


def operations(tree) -> dict[str, Callable[[], object]]:
    """Name -> zero-argument callable doing one call of that operation on `tree`."""
    leaves, treedef = jtu.tree_flatten(tree)
    py_dynamic, py_key = _pycore.flatten_split(tree)
    eqx_dynamic, eqx_static = eqx.partition(tree, eqx.is_array)
    ops = {
        "tree_flatten": lambda: jtu.tree_flatten(tree),
        "unflatten": lambda: treedef.unflatten(leaves),
    }
    if _native is not None:
        nat_dynamic, nat_key = _native.flatten_split(tree)
        ops["native partition"] = lambda: _native.flatten_split(tree)
        ops["native rebuild"] = lambda: _native.rebuild(nat_key, nat_dynamic)
    ops["python partition"] = lambda: _pycore.flatten_split(tree)
    ops["python rebuild"] = lambda: _pycore.rebuild(py_key, py_dynamic)
    ops["eqx.partition"] = lambda: eqx.partition(tree, eqx.is_array)
    ops["eqx.combine"] = lambda: eqx.combine(eqx_dynamic, eqx_static)
    return ops


def filter_operations(tree) -> dict[str, Callable[[], object]]:
    """The public helpers on the current backend, the Python twin and Equinox, and the floor:
    `tree_flatten` + `tree_unflatten` of the same tree."""
    dynamic, static = eqx.partition(tree, eqx.is_array)

    def flatten_unflatten():
        leaves, treedef = jtu.tree_flatten(tree)
        return treedef.unflatten(leaves)

    return {
        "flatten+unflatten": flatten_unflatten,
        "fj.partition": lambda: fj.partition(tree, fj.is_array),
        "twin partition": lambda: _pycore.tree_partition(tree, fj.is_array),
        "eqx.partition": lambda: eqx.partition(tree, eqx.is_array),
        "fj.filter": lambda: fj.filter(tree, fj.is_array),
        "twin filter": lambda: _pycore.tree_filter(tree, fj.is_array),
        "eqx.filter": lambda: eqx.filter(tree, eqx.is_array),
        "fj.combine": lambda: fj.combine(dynamic, static),
        "twin combine": lambda: _pycore.tree_combine((dynamic, static)),
        "eqx.combine": lambda: eqx.combine(dynamic, static),
    }


# --------------------------------------------------------------------------------------------
# One node of each kind: the cost of the core against `tree_flatten` per node kind
# --------------------------------------------------------------------------------------------

LayerNT = collections.namedtuple("LayerNT", ["w", "b", "n", "act"])


@jtu.register_dataclass
@dataclasses.dataclass
class LayerDC:
    """`register_dataclass`: two arrays (data), an int and a str (meta)."""

    w: jax.Array
    b: jax.Array
    n: int = dataclasses.field(metadata={"static": True})
    act: str = dataclasses.field(metadata={"static": True})


@jtu.register_dataclass
@dataclasses.dataclass
class MlpDC:
    """Three `LayerDC`s in a `register_dataclass` node."""

    layers: tuple
    name: str = dataclasses.field(metadata={"static": True})


class LayerNode:
    """`register_pytree_node`: all four fields are children."""

    def __init__(self, w, b, n, act):
        self.w, self.b, self.n, self.act = w, b, n, act


jtu.register_pytree_node(
    LayerNode, lambda x: ((x.w, x.b, x.n, x.act), None), lambda _, c: LayerNode(*c)
)


class LayerKeys(LayerNode):
    """`register_pytree_with_keys`: all four fields are children, with keys."""


jtu.register_pytree_with_keys(
    LayerKeys,
    lambda x: (tuple((jtu.GetAttrKey(k), getattr(x, k)) for k in ("w", "b", "n", "act")), None),
    lambda _, c: LayerKeys(*c),
    lambda x: ((x.w, x.b, x.n, x.act), None),
)


class LayerEqx(eqx.Module):
    w: jax.Array
    b: jax.Array
    n: int
    act: str


class MlpEqx(eqx.Module):
    layers: tuple
    name: str


def node_kind_trees() -> dict[str, object]:
    """Per node kind, one node holding two small arrays, an int and a str (and nested
    trees for the node types people build models of)."""
    w, b = jnp.ones((4, 4)), jnp.zeros(4)
    fields = {"w": w, "b": b, "n": 3, "act": "relu"}
    trees: dict[str, object] = {
        "tuple": (w, b, 3, "relu"),
        "list": [w, b, 3, "relu"],
        "dict": dict(fields),
        "namedtuple": LayerNT(w, b, 3, "relu"),
        "OrderedDict": collections.OrderedDict(fields),
        "defaultdict": collections.defaultdict(list, fields),
        "None (in a tuple)": (w, None, b, None),
        "register_dataclass": LayerDC(w, b, 3, "relu"),
        "register_dataclass, nested (3 in 1)": MlpDC(
            tuple(LayerDC(w, b, i, "relu") for i in range(3)), "mlp"
        ),
        "register_pytree_node": LayerNode(w, b, 3, "relu"),
        "register_pytree_with_keys": LayerKeys(w, b, 3, "relu"),
        "Equinox Module": LayerEqx(w, b, 3, "relu"),
        "Equinox Module, nested (3 in 1)": MlpEqx(
            tuple(LayerEqx(w, b, i, "relu") for i in range(3)), "mlp"
        ),
    }
    try:
        from flax import struct
    except ImportError:
        return trees

    @struct.dataclass
    class LayerFlax:
        w: jax.Array
        b: jax.Array
        n: int = struct.field(pytree_node=False)
        act: str = struct.field(pytree_node=False)

    trees["flax.struct dataclass"] = LayerFlax(w, b, 3, "relu")
    return trees


# Node kinds `jax.tree_util` flattens in C++ (the others call registered Python functions).
CPP_KINDS = frozenset(
    {
        "tuple",
        "list",
        "dict",
        "namedtuple",
        "None (in a tuple)",
        "register_dataclass",
        "register_dataclass, nested (3 in 1)",
        "flax.struct dataclass",
    }
)


def node_kind_operations(tree) -> dict[str, Callable[[], object]]:
    """The core's partition (native, and the Python twin) and the public helpers on the
    current backend, against `tree_flatten`."""
    dynamic, static = fj.partition(tree, fj.is_array)
    leaves, treedef = jtu.tree_flatten(tree)
    ops: dict[str, Callable[[], object]] = {
        "tree_flatten": lambda: jtu.tree_flatten(tree),
        "unflatten": lambda: treedef.unflatten(leaves),
    }
    if _native is not None:
        ops["native partition"] = lambda: _native.flatten_split(tree)
    ops["python partition"] = lambda: _pycore.flatten_split(tree)
    ops["fj.partition"] = lambda: fj.partition(tree, fj.is_array)
    ops["fj.filter"] = lambda: fj.filter(tree, fj.is_array)
    ops["fj.combine"] = lambda: fj.combine(dynamic, static)
    return ops


def build_node_kind_table(results: dict) -> str:
    names = list(next(iter(results.values())).keys())
    core = "native partition" if "native partition" in names else "python partition"
    ratios = [
        (core, "≤1.0 where C++"),
        ("python partition", ""),
        ("fj.partition", "≤3"),
        ("fj.filter", "≤3"),
        ("fj.combine", "≤3"),
    ]
    header = ["node kind", "jax flattens in", *[f"{n} (µs)" for n in names]]
    header += [f"{name} / tree_flatten" + (f" ({goal})" if goal else "") for name, goal in ratios]
    # What jax.tree_util itself needs for the same outputs: one flatten plus one unflatten
    # per tree built (partition builds two).
    header += ["fj.partition / (flatten + 2 unflatten)", "fj.filter / (flatten + unflatten)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for kind, times in results.items():
        row = [kind, "C++" if kind in CPP_KINDS else "Python", *[_fmt(times[n]) for n in names]]
        row += [f"{times[name] / times['tree_flatten']:.2f}" for name, _ in ratios]
        flatten, unflatten = times["tree_flatten"], times["unflatten"]
        row.append(f"{times['fj.partition'] / (flatten + 2 * unflatten):.2f}")
        row.append(f"{times['fj.filter'] / (flatten + unflatten):.2f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# pytest-benchmark mode
# --------------------------------------------------------------------------------------------

try:
    import pytest
except ImportError:  # script mode does not need pytest
    pytest = None

if pytest is not None:
    _OPS = (
        "tree_flatten",
        "unflatten",
        "native partition",
        "native rebuild",
        "python partition",
        "python rebuild",
        "eqx.partition",
        "eqx.combine",
    )
    _TREES: dict[tuple[str, int], object] = {}

    def _cached_tree(kind: str, size: int):
        if (kind, size) not in _TREES:
            _TREES[kind, size] = make_tree(kind, size)
        return _TREES[kind, size]

    @pytest.mark.parametrize("op", _OPS)
    @pytest.mark.parametrize("size", SIZES)
    @pytest.mark.parametrize("kind", TREE_KINDS)
    def test_partition(benchmark, kind, size, op):
        if op.startswith("native") and _native is None:
            pytest.skip("filterjax._native is not built")
        tree = _cached_tree(kind, size)
        assert len(jtu.tree_leaves(tree)) == size
        benchmark.group = f"{kind}-{size}"
        benchmark(operations(tree)[op])

    _FILTER_OPS = tuple(filter_operations({"a": 1}))

    @pytest.mark.parametrize("op", _FILTER_OPS)
    @pytest.mark.parametrize("size", SIZES)
    @pytest.mark.parametrize("kind", TREE_KINDS)
    def test_filters(benchmark, kind, size, op):
        """`fj.*` run on the native core when it is built (else on the Python twin)."""
        tree = _cached_tree(kind, size)
        benchmark.group = f"filters-{kind}-{size}"
        benchmark(filter_operations(tree)[op])

    _NODE_TREES = node_kind_trees()

    @pytest.mark.parametrize("op", tuple(node_kind_operations((1,))))
    @pytest.mark.parametrize("kind", tuple(_NODE_TREES))
    def test_node_kinds(benchmark, kind, op):
        ops = node_kind_operations(_NODE_TREES[kind])
        if op not in ops:
            pytest.skip("filterjax._native is not built")
        benchmark.group = f"node-{kind}"
        benchmark(ops[op])


# --------------------------------------------------------------------------------------------
# Script mode
# --------------------------------------------------------------------------------------------


def _calls_per_sample(fn: Callable[[], object], target_seconds: float) -> int:
    number = 1
    while True:
        elapsed = timeit.timeit(fn, number=number)
        if elapsed >= target_seconds or number >= 1_000_000:
            return number
        number *= 2 if elapsed > target_seconds / 10 else 10


def measure(ops: dict[str, Callable[[], object]], repeats: int, target: float) -> dict:
    """Median seconds per call of each op; the ops are interleaved within every repeat so that
    machine noise hits them alike."""
    numbers = {name: _calls_per_sample(fn, target) for name, fn in ops.items()}
    samples: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(repeats):
        for name, fn in ops.items():
            samples[name].append(timeit.timeit(fn, number=numbers[name]) / numbers[name])
    return {name: statistics.median(values) for name, values in samples.items()}


def _fmt(seconds: float) -> str:
    micros = seconds * 1e6
    return f"{micros:.2f}" if micros < 10 else f"{micros:.1f}" if micros < 100 else f"{micros:.0f}"


def build_table(results: dict) -> str:
    names = list(next(iter(results.values())).keys())
    header = ["tree", "leaves", *[f"{n} (µs)" for n in names]]
    if "native partition" in names:
        header += [
            "native partition / tree_flatten (≤1.5)",
            "eqx.partition / native partition (≥5)",
        ]
    header += ["python partition / tree_flatten", "eqx.partition / python partition"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (kind, size), times in results.items():
        row = [kind, str(size), *[_fmt(times[n]) for n in names]]
        if "native partition" in names:
            row.append(f"{times['native partition'] / times['tree_flatten']:.2f}")
            row.append(f"{times['eqx.partition'] / times['native partition']:.1f}")
        row.append(f"{times['python partition'] / times['tree_flatten']:.2f}")
        row.append(f"{times['eqx.partition'] / times['python partition']:.1f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def build_filter_table(results: dict) -> str:
    names = list(next(iter(results.values())).keys())
    ratios = [
        ("eqx.partition", "fj.partition", "≥5"),
        ("eqx.filter", "fj.filter", "≥5"),
        ("eqx.combine", "fj.combine", "≥2"),
        ("fj.partition", "flatten+unflatten", ""),
        ("fj.filter", "flatten+unflatten", ""),
        ("fj.combine", "flatten+unflatten", ""),
    ]
    header = ["tree", "leaves", *[f"{n} (µs)" for n in names]]
    header += [f"{a} / {b}" + (f" ({goal})" if goal else "") for a, b, goal in ratios]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (kind, size), times in results.items():
        row = [kind, str(size), *[_fmt(times[n]) for n in names]]
        row += [f"{times[a] / times[b]:.1f}" for a, b, _ in ratios]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=41, help="interleaved samples per op")
    parser.add_argument("--target", type=float, default=0.01, help="seconds per sample")
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "partition.md"),
    )
    parser.add_argument(
        "--node-kinds-only", action="store_true", help="only the per-node-kind table, printed"
    )
    args = parser.parse_args(argv)

    if _native is not None:
        _backend.set_backend("native")
    node_results = {}
    for kind, tree in node_kind_trees().items():
        node_results[kind] = measure(node_kind_operations(tree), args.repeats, args.target)
        print(f"measured {kind}", file=sys.stderr, flush=True)
    if args.node_kinds_only:
        print(build_node_kind_table(node_results))
        return
    results = {}
    filter_results = {}
    for kind in TREE_KINDS:
        for size in SIZES:
            tree = make_tree(kind, size)
            assert len(jtu.tree_leaves(tree)) == size
            results[kind, size] = measure(operations(tree), args.repeats, args.target)
            filter_results[kind, size] = measure(filter_operations(tree), args.repeats, args.target)
            print(f"measured {kind}-{size}", file=sys.stderr, flush=True)

    table = build_table(results)
    filter_table = build_filter_table(filter_results)
    command = (
        f"PYTHONPATH=python python benches/bench_partition.py --repeats {args.repeats} "
        f"--target {args.target}"
    )
    native_note = (
        "" if _native is not None else " **native module not built: native columns absent.**"
    )
    report = "\n".join(
        [
            "# Partition / rebuild per-call cost",
            "",
            "Median per-call time over interleaved repeats, all operations measured side by side "
            "in one process. `native partition` / `python partition` are "
            "`_native.flatten_split(tree)` / `_pycore.flatten_split(tree)` (array predicate, "
            "hashed key); rebuild is `rebuild(key, dynamic)`. Equinox: `eqx.partition(tree, "
            f"eqx.is_array)` and `eqx.combine(dynamic, static)`.{native_note}",
            "",
            f"Reproduce: `{command}`",
            "",
            f"Machine: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"jax {jax.__version__}, equinox {eqx.__version__}, "
            f"{time.strftime('%Y-%m-%d %H:%M')} (shared, noisy machine: compare ratios, not "
            "absolute times).",
            "",
            table,
            "",
            "## Per node kind",
            "",
            "One node of each kind holding two small arrays, an int and a str (the int and the "
            "str are meta fields of the dataclasses, plain children elsewhere), and nested "
            "models (three such nodes in one). `native partition` / `python partition` as "
            f"above; `fj.*` on the {_backend.backend()} core, filter `fj.is_array`, combine of "
            "the two halves. Ratios against `jax.tree_util.tree_flatten` of the same tree.",
            "",
            build_node_kind_table(node_results),
            "",
            "## The public filtering helpers",
            "",
            f"`fj.*` on the {_backend.backend()} core; `twin *` are the Python twin's "
            "`_pycore.tree_partition/tree_filter/tree_combine`. Filter `is_array` (filterjax's "
            "for ours, Equinox's for Equinox); combine of the two halves of "
            "`eqx.partition(tree, eqx.is_array)`. `flatten+unflatten` is `tree_flatten` then "
            "`unflatten` of the same tree: the floor for building one new tree.",
            "",
            filter_table,
            "",
        ]
    )
    print(report)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(report)


if __name__ == "__main__":
    main()
