"""The model and training step shared by test_distributed.py and its worker processes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

BATCH = 16
STEPS = 3


def init_model() -> dict:
    rng = np.random.default_rng(0)
    return {
        "w1": jnp.asarray(rng.normal(size=(4, 8)), jnp.float32),
        "b1": jnp.zeros(8, jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(8, 2)), jnp.float32),
        "activation": "tanh",  # a static leaf: filter_jit holds it static
    }


def make_batch() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(BATCH, 4)).astype(np.float32)
    y = rng.normal(size=(BATCH, 2)).astype(np.float32)
    return x, y


def _forward(model: dict, x):
    act = getattr(jnp, model["activation"])
    return act(x @ model["w1"] + model["b1"]) @ model["w2"]


def train_step(model: dict, x, y, lr: float = 0.1):
    static = {"activation": model["activation"]}
    params = {k: v for k, v in model.items() if k != "activation"}

    def loss_fn(params):
        pred = _forward({**params, **static}, x)
        return jnp.mean((pred - y) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
    return {**params, **static}, loss
