"""A typed program using filterjax, checked by mypy in CI (`.ci/run`, stage "type check").

mypy checks this file against the *installed* package, so it also checks that `py.typed`
ships. Each `assert_type` below fails if a decorator stops carrying the wrapped function's
return type: a decorator typed as returning `Callable[..., Any]` (or left unannotated) makes
the call's result `Any`, and `assert_type(..., jax.Array)` rejects `Any`. The parameters are
checked by the negative twin, `usage_errors.py`, where mypy must report every call marked
`# expect-error`. Nothing here needs a `# type: ignore`.
"""

from __future__ import annotations

from typing import assert_type

import jax
import jax.numpy as jnp

import filterjax as fj

# --- filter_jit, bare and with options ---------------------------------------------------


@fj.filter_jit
def scale(x: jax.Array, factor: float, *, label: str = "") -> jax.Array:
    return x * factor


@fj.filter_jit(donate="all")
def split(x: jax.Array, n: int) -> tuple[jax.Array, int]:
    return x + n, n


x = jnp.ones(3)
assert_type(scale(x, 2.0), jax.Array)
assert_type(scale(x, 2.0, label="twice"), jax.Array)
assert_type(split(jnp.ones(3), 1), tuple[jax.Array, int])


# --- filter_jit on a method: the bound call keeps the signature too ---------------------


class Model:
    def __init__(self, weight: jax.Array) -> None:
        self.weight = weight

    @fj.filter_jit
    def apply(self, x: jax.Array) -> jax.Array:
        return self.weight * x


assert_type(Model(jnp.ones(3)).apply(x), jax.Array)


# --- autodiff: parameters kept; the value keeps its type, gradients are PyTrees -----------


def loss(w: jax.Array, scale: float) -> jax.Array:
    return jnp.sum(w * scale) ** 2


grad_loss = fj.filter_grad(loss)
grad_loss(x, 2.0)
value, grads = fj.filter_value_and_grad(loss)(x, 2.0)
assert_type(value, jax.Array)


@fj.filter_checkpoint
def block(x: jax.Array, depth: int) -> jax.Array:
    return jnp.sin(x) * depth


assert_type(block(x, 2), jax.Array)


# --- vectorising: the signature and the return type are kept ---------------------------


@fj.filter_vmap
def per_example(x: jax.Array, offset: float) -> jax.Array:
    return x + offset


@fj.filter_vmap(in_axes=(0, None))
def per_row(x: jax.Array, offset: float) -> jax.Array:
    return x + offset


assert_type(per_example(jnp.ones((2, 3)), 1.0), jax.Array)
assert_type(per_row(jnp.ones((2, 3)), 1.0), jax.Array)


# --- the filtering helpers -----------------------------------------------------------------

params, static = fj.partition({"w": x, "act": "relu"}, fj.is_array)
combined = fj.combine(params, static)
assert_type(fj.is_array(x), bool)
