"""Per-call cost of a Flax NNX training step: nnx.jit, flax's functional hand-split, filterjax.

The step (Linear -> BatchNorm -> Dropout -> Linear, `nnx.Optimizer` with Adam,
`nnx.value_and_grad` inside) changes the parameters, the batch statistics, the optimizer
state and the Dropout RNG count in place. Three ways to compile it:

- `nnx.jit(step)(model, optimizer, x, y)`: flax's lifted jit (graph mode, the default);
- the hand-split of flax's performance guide: `nnx.split` once, `jax.jit` over the state,
  the state carried by hand from call to call (the objects are not updated);
- `filter_jit(step)(model, optimizer, x, y)`: updates carried back to the objects.

    python benches/bench_nnx.py             # side-by-side table (medians, one process)
    python -m pytest benches/bench_nnx.py   # pytest-benchmark

Needs flax (`pip install filterjax[nnx]`); the newest flax needs Python >= 3.12.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import pytest

nnx = pytest.importorskip("flax.nnx")
optax = pytest.importorskip("optax")

from _timing import each_backend, measure  # noqa: E402

import filterjax as fj  # noqa: E402


class Net(nnx.Module):
    def __init__(self, rngs):
        self.linear1 = nnx.Linear(4, 8, rngs=rngs)
        self.norm = nnx.BatchNorm(8, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)
        self.linear2 = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.linear2(self.dropout(nnx.relu(self.norm(self.linear1(x)))))


def _loss(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(_loss)(model, x, y)
    optimizer.update(model, grads)
    return loss


def _setup():
    model = Net(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    return model, optimizer


X = jnp.ones((8, 4))
Y = jnp.zeros((8, 2))


def contenders() -> dict[str, Callable[[], object]]:
    flax_model, flax_optimizer = _setup()
    flax_step = nnx.jit(train_step)

    hand_model, hand_optimizer = _setup()
    graphdef, state = nnx.split((hand_model, hand_optimizer))

    @jax.jit
    def hand_step(graphdef, state, x, y):
        model, optimizer = nnx.merge(graphdef, state)
        loss = train_step(model, optimizer, x, y)
        return loss, nnx.state((model, optimizer))

    carried = [state]

    def hand_call():
        loss, carried[0] = hand_step(graphdef, carried[0], X, Y)
        return loss

    our_model, our_optimizer = _setup()
    our_step = fj.filter_jit(train_step)
    return {
        "nnx.jit": lambda: flax_step(flax_model, flax_optimizer, X, Y),
        "hand-split": hand_call,
        "filterjax": lambda: our_step(our_model, our_optimizer, X, Y),
    }


# --- pytest-benchmark -------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["nnx.jit", "hand-split", "filterjax"])
def test_train_step(benchmark, impl):
    call = contenders()[impl]
    jax.block_until_ready(call())
    benchmark.group = "nnx train step"
    benchmark(call)


# --- script mode -------------------------------------------------------------------------


def _table(rows: list) -> str:
    header = (
        "| backend | nnx.jit µs | hand-split µs | filterjax µs "
        "| filterjax / hand-split | nnx.jit / filterjax |"
    )
    lines = [header, "|" + "---|" * 6]
    for backend, t in rows:
        theirs, base, ours = t["nnx.jit"], t["hand-split"], t["filterjax"]
        lines.append(
            f"| {backend} | {theirs:.0f} | {base:.0f} | {ours:.0f} "
            f"| {ours / base:.2f} | {theirs / ours:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    import flax

    calls = int(os.environ.get("BENCH_CALLS", "100"))
    repeats = int(os.environ.get("BENCH_REPEATS", "15"))
    wall, cpu = [], []
    for backend in each_backend():
        calls_of = contenders()
        wall.append((backend, measure(calls_of, calls, repeats)))
        cpu.append((backend, measure(calls_of, calls, repeats, time.thread_time)))
    text = (
        "Per-call time of an NNX training step (Linear -> BatchNorm -> Dropout -> Linear, "
        "nnx.Optimizer(Adam), nnx.value_and_grad inside), median of "
        f"{repeats} interleaved rounds of {calls} calls (`python benches/bench_nnx.py`), "
        f"jax {jax.__version__}, flax {flax.__version__}.\n\n"
        f"**Wall time**\n\n{_table(wall)}\n\n"
        f"**CPU time of the calling thread** (the per-call overhead)\n\n{_table(cpu)}\n"
    )
    print(text)
    out = os.path.join(os.path.dirname(__file__), "results", "nnx.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
