"""The negative twin of `usage.py`: every line marked `# expect-error` must be reported by
mypy, and no other line may be (checked by `check_errors.py`, run in `.ci/run`). A decorator
that loses the wrapped function's signature lets these calls through, so CI fails.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import filterjax as fj


@fj.filter_jit
def scale(x: jax.Array, factor: float, *, label: str = "") -> jax.Array:
    return x * factor


@fj.filter_jit(donate="all")
def split(x: jax.Array, n: int) -> tuple[jax.Array, int]:
    return x + n, n


x = jnp.ones(3)
scale("not an array", 2.0)  # expect-error
scale(x)  # expect-error
scale(x, 2.0, colour="red")  # expect-error
scale(x, 2.0, label=3)  # expect-error
as_text: str = scale(x, 2.0)  # expect-error
split(x, "one")  # expect-error
as_float: float = split(x, 1)  # expect-error


class Model:
    def __init__(self, weight: jax.Array) -> None:
        self.weight = weight

    @fj.filter_jit
    def apply(self, x: jax.Array) -> jax.Array:
        return self.weight * x


Model(x).apply("not an array")  # expect-error
Model(x).apply(x, x)  # expect-error

fj.filter_jit(donate="sometimes")  # expect-error


def loss(w: jax.Array, scale: float) -> jax.Array:
    return jnp.sum(w * scale) ** 2


fj.filter_grad(loss)("not an array", 2.0)  # expect-error
fj.filter_grad(loss)(x)  # expect-error
fj.filter_value_and_grad(loss)(x, "two")  # expect-error
value_text: tuple[str, object] = fj.filter_value_and_grad(loss)(x, 2.0)  # expect-error


@fj.filter_checkpoint
def block(x: jax.Array, depth: int) -> jax.Array:
    return jnp.sin(x) * depth


block(x, "deep")  # expect-error
block_text: str = block(x, 2)  # expect-error


@fj.filter_vmap
def per_example(x: jax.Array, offset: float) -> jax.Array:
    return x + offset


per_example(x, "one")  # expect-error
per_example_text: str = per_example(x, 1.0)  # expect-error
