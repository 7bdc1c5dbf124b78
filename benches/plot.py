"""Per-call time against the number of leaves: the plot in the README (`docs/dispatch.png`).

Four contenders call the same function on a dict of N leaves (N = 1 ... 1000, about 10%
of them strings held static, the rest small arrays):

- `jax.jit`, hand-split: the arrays are split from the strings once, by hand, and the
  jitted function closes over the strings (the no-filtering baseline);
- `equinox.filter_jit`;
- `filterjax.filter_jit` with the native core;
- `filterjax.filter_jit` with the pure-Python core.

Everything runs in one process, in interleaved rounds (each round times every contender
at every N), and the plot shows per-call medians over the rounds. The raw numbers go to
`benches/results/plot.md`.

    python benches/plot.py                 # about 2 minutes on 2 cores (9 rounds)
    python benches/plot.py --rounds 3      # quicker, noisier

Needs matplotlib (`pip install matplotlib`).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxlib
from _timing import each_backend, per_call_us

import filterjax as fj
from filterjax import _backend

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
LEAF_COUNTS = (1, 3, 10, 30, 100, 300, 1000)
CONTENDERS = (
    "jax.jit (hand-split)",
    "equinox.filter_jit",
    "filterjax (native)",
    "filterjax (python)",
)
# Colours and markers per contender, chosen to stay distinguishable in greyscale too.
STYLE = {
    "jax.jit (hand-split)": dict(color="#222222", marker="o", linestyle="-"),
    "equinox.filter_jit": dict(color="#d95f02", marker="s", linestyle="--"),
    "filterjax (native)": dict(color="#1b9e77", marker="^", linestyle="-"),
    "filterjax (python)": dict(color="#7570b3", marker="v", linestyle=":"),
}


def make_tree(num_leaves: int) -> dict:
    """A dict of `num_leaves` leaves: every tenth one a string, the others (4,) arrays."""
    tree: dict = {}
    for i in range(num_leaves):
        if i % 10 == 9:
            tree[f"leaf{i:04d}"] = f"static-{i}"
        else:
            tree[f"leaf{i:04d}"] = jnp.full((4,), float(i))
    return tree


def summed(tree: dict):
    """The benchmarked function: cheap, and it reads every array."""
    return sum(jnp.sum(v) for v in tree.values() if not isinstance(v, str))


def hand_split(tree: dict) -> Callable[[], object]:
    arrays = {k: v for k, v in tree.items() if not isinstance(v, str)}
    statics = {k: v for k, v in tree.items() if isinstance(v, str)}
    jitted = jax.jit(lambda arrays: summed({**arrays, **statics}))
    return lambda: jitted(arrays)


def calls_for(call: Callable[[], object], block_seconds: float) -> int:
    """How many calls fill about `block_seconds`."""
    estimate = per_call_us(call, 5) * 1e-6
    return max(5, min(2000, int(block_seconds / max(estimate, 1e-7))))


def measure(rounds: int, block_seconds: float) -> dict[str, dict[int, list[float]]]:
    """samples[contender][num_leaves] = per-call µs, one per round."""
    trees = {n: make_tree(n) for n in LEAF_COUNTS}
    backends = list(each_backend())
    fixed = {
        "jax.jit (hand-split)": {n: hand_split(trees[n]) for n in LEAF_COUNTS},
        "equinox.filter_jit": {
            n: (lambda f, t: lambda: f(t))(eqx.filter_jit(summed), trees[n]) for n in LEAF_COUNTS
        },
    }
    samples: dict[str, dict[int, list[float]]] = {
        name: {n: [] for n in LEAF_COUNTS}
        for name in CONTENDERS
        if not name.startswith("filterjax") or name[11:-1] in backends
    }
    calls: dict[tuple[str, int], int] = {}
    for round_index in range(rounds):
        # Switching the core clears filterjax's caches, so each round compiles filterjax's
        # functions once per backend, before anything is timed. A function made by
        # `filter_jit` keeps the core it was made with, so they are made after the switch.
        for backend in backends:
            _backend.set_backend(backend)
            current = {
                **fixed,
                f"filterjax ({backend})": {
                    n: (lambda f, t: lambda: f(t))(fj.filter_jit(summed), trees[n])
                    for n in LEAF_COUNTS
                },
            }
            for by_n in current.values():
                for call in by_n.values():
                    jax.block_until_ready(call())
            # The baselines are timed next to each backend, so twice per round.
            order = list(current) if round_index % 2 == 0 else list(reversed(current))
            for n in LEAF_COUNTS:
                for name in order:
                    call = current[name][n]
                    if (name, n) not in calls:
                        calls[(name, n)] = calls_for(call, block_seconds)
                    samples[name][n].append(per_call_us(call, calls[(name, n)]))
        print(f"round {round_index + 1}/{rounds} done", file=sys.stderr)
    return samples


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, str]:
    return {
        "date": datetime.date.today().isoformat(),
        "cpu": f"{cpu_model()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "equinox": eqx.__version__,
        "filterjax": fj.__version__,
    }


def medians(samples: dict[str, dict[int, list[float]]]) -> dict[str, dict[int, float]]:
    return {
        name: {n: statistics.median(values) for n, values in by_n.items()}
        for name, by_n in samples.items()
    }


def write_plot(med: dict[str, dict[int, float]], env: dict[str, str], rounds: int, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.2), dpi=150)
    for name, by_n in med.items():
        xs = list(by_n)
        ax.plot(xs, [by_n[n] for n in xs], label=name, linewidth=1.8, markersize=6, **STYLE[name])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(LEAF_COUNTS)
    ax.set_xticklabels([str(n) for n in LEAF_COUNTS])
    ax.set_xlabel("leaves in the argument (dict of (4,) arrays, every 10th leaf a string)")
    ax.set_ylabel("per-call time (µs, median)")
    ax.set_title("Dispatch cost of a jitted call against the number of PyTree leaves")
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)
    ax.legend(loc="upper left", frameon=False)
    caption = (
        f"Measured {env['date']} on {env['cpu']} (JAX CPU backend).\n"
        f"python {env['python']}, jax {env['jax']}, jaxlib {env['jaxlib']}, "
        f"equinox {env['equinox']}, filterjax {env['filterjax']}.\n"
        f"One process, {rounds} interleaved rounds, medians; `python benches/plot.py`."
    )
    fig.text(0.5, 0.01, caption, ha="center", va="bottom", fontsize=7.5, color="#444444")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def markdown_table(med: dict[str, dict[int, float]], env: dict[str, str], rounds: int) -> str:
    names = list(med)
    header = "| leaves | arrays | statics | " + " | ".join(f"{n} µs" for n in names)
    ratios = [n for n in ("filterjax (native)", "filterjax (python)") if n in med]
    header += "".join(f" | {n} / jax.jit" for n in ratios)
    if "filterjax (native)" in med:
        header += " | equinox / filterjax (native)"
    lines = [header + " |", "|" + "---|" * (header.count("|"))]
    base = med["jax.jit (hand-split)"]
    for n in LEAF_COUNTS:
        statics = sum(1 for i in range(n) if i % 10 == 9)
        cells = [str(n), str(n - statics), str(statics)]
        cells += [f"{med[name][n]:.1f}" for name in names]
        cells += [f"{med[name][n] / base[n]:.2f}" for name in ratios]
        if "filterjax (native)" in med:
            cells.append(f"{med['equinox.filter_jit'][n] / med['filterjax (native)'][n]:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return (
        "# Per-call time against the number of leaves\n\n"
        f"Reproduce with `python benches/plot.py` (writes `docs/dispatch.png` and this file).\n"
        f"Measured {env['date']} on {env['cpu']} (CPU backend); python {env['python']}, "
        f"jax {env['jax']}, jaxlib {env['jaxlib']}, equinox {env['equinox']}, filterjax "
        f"{env['filterjax']}. One process, {rounds} interleaved rounds, per-call medians in "
        "µs; the argument is a dict of (4,) float32 arrays with every 10th leaf a string; the "
        "function sums the arrays. Hand-split `jax.jit` gets the arrays only and closes over "
        "the strings.\n\n" + "\n".join(lines) + "\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--block-ms", type=float, default=25.0, help="time per measurement")
    parser.add_argument("--png", default=os.path.join(REPO, "docs", "dispatch.png"))
    parser.add_argument("--table", default=os.path.join(HERE, "results", "plot.md"))
    args = parser.parse_args(argv)

    start = time.perf_counter()
    previous = _backend.backend()
    try:
        samples = measure(args.rounds, args.block_ms / 1000)
    finally:
        _backend.set_backend(previous)
    med = medians(samples)
    env = environment()
    write_plot(med, env, args.rounds, args.png)
    table = markdown_table(med, env, args.rounds)
    os.makedirs(os.path.dirname(args.table), exist_ok=True)
    with open(args.table, "w") as f:
        f.write(table)
    print(table)
    print(f"wrote {args.png} and {args.table} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
