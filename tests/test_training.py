"""End to end: train an MLP with optax, filter_jit, filter_value_and_grad and apply_updates,
and check the loss curve against the same training written with Equinox."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import filterjax as fj

STEPS = 300


def regression_problem():
    kx, km = jr.split(jr.PRNGKey(0))
    x = jr.uniform(kx, (128, 2), minval=-1.0, maxval=1.0)
    y = jnp.sin(2 * x[:, :1]) + 0.5 * x[:, 1:] ** 2
    model = eqx.nn.MLP(2, 1, 32, 2, activation=jnp.tanh, key=km)
    return model, x, y


def loss_fn(model, x, y):
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def train(lib) -> list[float]:
    model, x, y = regression_problem()
    optim = optax.adam(1e-2)
    opt_state = optim.init(lib.filter(model, lib.is_inexact_array))

    @lib.filter_jit
    def step(model, opt_state, x, y):
        loss, grads = lib.filter_value_and_grad(loss_fn)(model, x, y)
        updates, opt_state = optim.update(grads, opt_state, lib.filter(model, lib.is_inexact_array))
        return lib.apply_updates(model, updates), opt_state, loss

    losses = []
    for _ in range(STEPS):
        model, opt_state, loss = step(model, opt_state, x, y)
        losses.append(float(loss))
    return losses


@pytest.mark.slow
def test_training_loss_falls_and_matches_equinox_step_for_step():
    ours = np.array(train(fj))
    assert ours[0] / ours[-1] >= 100, (ours[0], ours[-1])
    reference = np.array(train(eqx))
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-7)


def test_training_without_jit_matches_equinox_for_a_few_steps():
    model, x, y = regression_problem()
    optim = optax.sgd(0.1)

    def run(lib, steps=3):
        m = model
        state = optim.init(lib.filter(m, lib.is_inexact_array))
        losses = []
        for _ in range(steps):
            loss, grads = lib.filter_value_and_grad(loss_fn)(m, x, y)
            updates, state = optim.update(grads, state)
            m = lib.apply_updates(m, updates)
            losses.append(float(loss))
        return losses

    np.testing.assert_allclose(run(fj), run(eqx), rtol=1e-5)
