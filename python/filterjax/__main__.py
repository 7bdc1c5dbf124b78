"""`python -m filterjax`: a short demo of what filterjax is for.

Calls a small MLP (a PyTree of arrays plus a static activation function) repeatedly
through `filter_jit` and through a hand-split `jax.jit`, and prints the per-call cost of
each, their ratio, and the backend in use. Also times the core partition on its own.
Runs in a few seconds on a laptop CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import jax.tree_util as jtu

import filterjax as fj
from filterjax import _backend


@dataclasses.dataclass(frozen=True)
class Layer:
    weight: jax.Array
    bias: jax.Array


@dataclasses.dataclass(frozen=True)
class MLP:
    layers: tuple[Layer, ...]
    activation: Callable  # static: a function, not an array


jtu.register_dataclass(Layer, data_fields=["weight", "bias"], meta_fields=[])
jtu.register_dataclass(MLP, data_fields=["layers", "activation"], meta_fields=[])


def make_mlp(key: jax.Array, sizes: tuple[int, ...]) -> MLP:
    layers = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        key, wkey = jax.random.split(key)
        weight = jax.random.normal(wkey, (fan_out, fan_in)) / jnp.sqrt(fan_in)
        layers.append(Layer(weight, jnp.zeros(fan_out)))
    return MLP(tuple(layers), jax.nn.relu)


def forward(model: MLP, x: jax.Array) -> jax.Array:
    for layer in model.layers[:-1]:
        x = model.activation(layer.weight @ x + layer.bias)
    last = model.layers[-1]
    return last.weight @ x + last.bias


def _per_call_us(call: Callable[[], object], calls: int, repeats: int) -> float:
    jax.block_until_ready(call())
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = call()
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def _interleaved(
    calls_by_name: dict[str, Callable[[], object]], calls: int, repeats: int
) -> dict[str, list[float]]:
    """Per-call µs of each contender in each round, the contenders' rounds interleaved so
    that the machine's noise falls on all of them alike."""
    samples: dict[str, list[float]] = {name: [] for name in calls_by_name}
    for _ in range(repeats):
        for name, call in calls_by_name.items():
            samples[name].append(_per_call_us(call, calls, 1))
    return samples


def _median_ratio(ours: list[float], base: list[float]) -> float:
    """The median of the per-round ratios: steadier than a ratio of medians, since each
    round's pair ran back to back under the same load."""
    return statistics.median(o / b for o, b in zip(ours, base, strict=True))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m filterjax", description=__doc__)
    parser.add_argument("--calls", type=int, default=500, help="calls per timing round")
    parser.add_argument("--repeats", type=int, default=31, help="timing rounds (median)")
    options = parser.parse_args(argv)

    print(f"filterjax {fj.__version__} | backend: {fj.backend()} | jax {jax.__version__}")
    model = make_mlp(jax.random.key(0), (8, 32, 32, 2))
    x = jnp.ones(8)

    jitted = fj.filter_jit(forward)
    params, activation = fj.partition(model, fj.is_array)  # the hand split, done once
    hand_jitted = jax.jit(lambda params, x: forward(fj.combine(params, activation), x))
    assert jnp.allclose(jitted(model, x), hand_jitted(params, x))

    times = _interleaved(
        {
            "jax.jit (hand-split)": lambda: hand_jitted(params, x),
            "filterjax.filter_jit": lambda: jitted(model, x),
        },
        options.calls,
        options.repeats,
    )
    base = times["jax.jit (hand-split)"]
    ours = times["filterjax.filter_jit"]
    print(f"\nMLP 8-32-32-2 forward, per call (median of {options.repeats} interleaved rounds):")
    print(f"  jax.jit, arguments split by hand : {statistics.median(base):8.2f} us")
    print(f"  filterjax.filter_jit             : {statistics.median(ours):8.2f} us")
    print(f"  ratio filter_jit / jax.jit       : {_median_ratio(ours, base):8.2f}")

    tree: dict[str, object] = {f"w{i:03d}": jnp.ones(4) for i in range(100)}
    tree.update({f"s{i:03d}": f"static-{i}" for i in range(20)})
    core = _interleaved(
        {
            "jax.tree_util.tree_flatten": lambda: jtu.tree_flatten(tree),
            "filterjax partition + key": lambda: _backend.flatten_split(tree),
        },
        options.calls,
        options.repeats,
    )
    flat = core["jax.tree_util.tree_flatten"]
    part = core["filterjax partition + key"]
    print("\nCore, a dict of 100 arrays + 20 strings, per call:")
    print(f"  jax.tree_util.tree_flatten       : {statistics.median(flat):8.2f} us")
    print(
        f"  filterjax partition + static key : {statistics.median(part):8.2f} us"
        f"  ({_median_ratio(part, flat):.2f}x)"
    )


if __name__ == "__main__":
    main()
