"""Flax NNX objects through filter_jit / filter_pmap: the in-place updates come back.

Reference: `nnx.jit` (graph mode, flax's default). Needs flax (the `nnx` extra); the
newest flax needs Python >= 3.12, so elsewhere this module is skipped as a whole.
"""

from __future__ import annotations

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import filterjax as fj
from filterjax import _nnx

nnx = pytest.importorskip("flax.nnx")
optax = pytest.importorskip("optax")


class Net(nnx.Module):
    def __init__(self, rngs, din=3, dhidden=8, dout=2):
        self.linear1 = nnx.Linear(din, dhidden, rngs=rngs)
        self.norm = nnx.BatchNorm(dhidden, rngs=rngs)
        self.dropout = nnx.Dropout(0.3, rngs=rngs)
        self.linear2 = nnx.Linear(dhidden, dout, rngs=rngs)

    def __call__(self, x, rngs=None):
        h = nnx.relu(self.norm(self.linear1(x)))
        return self.linear2(self.dropout(h, rngs=rngs))


class Counter(nnx.Module):
    def __init__(self):
        self.count = nnx.BatchStat(jnp.zeros((), jnp.int32))
        self.weight = nnx.Param(jnp.arange(3.0))


def make(seed=0, din=3, dhidden=8):
    model = Net(nnx.Rngs(seed), din=din, dhidden=dhidden)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    return model, optimizer


def loss_fn(model, x, y, rngs=None):
    return jnp.mean((model(x, rngs=rngs) - y) ** 2)


def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    return loss


def train_step_grad(model, optimizer, x, y):
    grads = nnx.grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    return loss_fn(model, x, y)


def train_step_rngs(model, optimizer, rngs, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y, rngs)
    optimizer.update(model, grads)
    return loss


X = jax.random.normal(jax.random.key(1), (16, 3))
Y = jax.random.normal(jax.random.key(2), (16, 2))


def plain(leaf):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(leaf))
    return np.asarray(leaf)


def assert_same_state(a, b):
    """Bit-for-bit equal NNX state: every Variable (params, batch stats, optimizer state,
    RNG counts and keys), same paths, same dtypes."""
    (paths_a, leaves_a), (paths_b, leaves_b) = (
        zip(*jax.tree_util.tree_flatten_with_path(nnx.state(obj))[0], strict=True) for obj in (a, b)
    )
    assert paths_a == paths_b
    for path, x, y in zip(paths_a, leaves_a, leaves_b, strict=True):
        assert x.dtype == y.dtype, path
        np.testing.assert_array_equal(plain(x), plain(y), err_msg=str(path))


def run_both(step, steps=5, eval_mode=False, with_rngs=False, **options):
    """`steps` calls of `step` through nnx.jit and through filter_jit, on equal models."""
    results = []
    for jit in (nnx.jit, lambda f: fj.filter_jit(f, **options)):
        model, optimizer = make()
        if eval_mode:
            model.eval()
        rngs = nnx.Rngs(dropout=7)
        args = (model, optimizer, rngs) if with_rngs else (model, optimizer)
        stepped = jit(step)
        losses = [np.asarray(stepped(*args, X, Y)) for _ in range(steps)]
        results.append((losses, args))
    (theirs, their_args), (ours, our_args) = results
    np.testing.assert_array_equal(np.array(theirs), np.array(ours))
    assert_same_state(their_args, our_args)
    return ours


# ---------------------------------------------------------------------------------------
# Same results as nnx.jit


def test_training_matches_nnx_jit_bit_for_bit():
    traces = []

    def counted(*args):
        traces.append(None)
        return train_step(*args)

    losses = run_both(counted)
    assert len(set(map(float, losses))) == 5  # the model trains: every loss differs
    assert len(traces) == 2  # one trace under nnx.jit, one under filter_jit


def test_eval_mode_matches_nnx_jit():
    losses = run_both(train_step, eval_mode=True)
    assert len(set(map(float, losses))) == 5


def test_explicit_rngs_match_nnx_jit():
    run_both(train_step_rngs, with_rngs=True)


def test_nnx_grad_inside_matches_nnx_jit():
    run_both(train_step_grad)


def test_filter_grad_differentiates_batch_stats_too():
    model, _ = make()
    grads = fj.filter_jit(lambda m: fj.filter_grad(lambda m: loss_fn(m, X, Y))(m))(model)
    assert grads.norm.mean.get_raw_value() is not None  # not only nnx.Param
    assert grads.dropout.rngs.count.get_raw_value() is None  # integers are not differentiated


def test_filter_grad_over_params_matches_nnx_value_and_grad():
    """The pattern docs/nnx.md shows: split the Params out and differentiate only them."""

    @fj.filter_jit
    def step(model, optimizer, x, y):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss_of(params, rest):
            return loss_fn(nnx.merge(graphdef, params, rest), x, y)

        loss, grads = fj.filter_value_and_grad(loss_of)(params, rest)
        optimizer.update(model, grads)
        return loss

    theirs, ours = make(), make()
    for model, _ in (theirs, ours):
        model.eval()
    reference = nnx.jit(train_step)
    for _ in range(3):
        np.testing.assert_array_equal(reference(*theirs, X, Y), step(*ours, X, Y))
    assert_same_state(theirs, ours)


@pytest.mark.parametrize("donate", ["all", "all-except-first"])
def test_donation_matches_nnx_jit_and_leaves_no_deleted_buffer(donate):
    run_both(train_step, steps=3, donate=donate)
    model, optimizer = make()
    fj.filter_jit(train_step, donate=donate)(model, optimizer, X, Y)
    for leaf in jax.tree.leaves(nnx.state((model, optimizer))):
        assert not leaf.is_deleted()


def test_updates_come_back_and_the_step_compiles_once():
    traces = []

    @fj.filter_jit
    def bump(counter, scale):
        traces.append(None)
        counter.count[...] += 1
        return counter.weight[...] * scale

    counter = Counter()
    weight = counter.weight.get_raw_value()
    for expected in (1, 2, 3):
        out = bump(counter, jnp.float32(2.0))
        assert int(counter.count[...]) == expected
    np.testing.assert_array_equal(out, 2 * np.arange(3.0))
    assert counter.weight.get_raw_value() is weight  # unchanged Variables are left alone
    assert len(traces) == 1
    bump(counter, scale=jnp.float32(1.0))  # another call shape, same program
    assert int(counter.count[...]) == 4
    assert len(traces) == 1


def test_method_decorated_in_the_class_carries_updates():
    class Model(nnx.Module):
        def __init__(self):
            self.count = nnx.BatchStat(jnp.zeros(()))

        @fj.filter_jit
        def __call__(self, x):
            self.count[...] += 1
            return x * 2

    model = Model()
    model(jnp.ones(2))
    model(jnp.ones(2))
    assert float(model.count[...]) == 2


def test_keyword_arguments_and_nested_containers():
    @fj.filter_jit
    def step(models, *, by):
        for counter in models["counters"]:
            counter.count[...] += by
        return None

    counters = [Counter(), Counter()]
    step({"counters": counters}, by=jnp.int32(3))
    step({"counters": counters}, by=jnp.int32(3))
    assert [int(c.count[...]) for c in counters] == [6, 6]


def test_non_nnx_calls_keep_the_fast_path(monkeypatch):
    calls = []
    original = _nnx.call
    monkeypatch.setattr(_nnx, "call", lambda *a: calls.append(None) or original(*a))

    @fj.filter_jit
    def f(x, y):
        return x + y

    for _ in range(3):
        f(jnp.ones(2), jnp.ones(2))
    assert not calls
    assert not f._program.routes_nnx
    counter = Counter()
    f(counter.weight, jnp.ones(3))  # a Variable: the NNX path, for this call shape
    assert calls
    calls.clear()
    f(jnp.ones(2), y=jnp.ones(2))  # another call shape without NNX objects
    assert not calls


def test_plain_arguments_through_an_nnx_call_shape():
    @fj.filter_jit
    def f(a, b):
        return a * 2, b

    counter = Counter()
    out, back = f(counter.weight, 5)
    np.testing.assert_array_equal(out, 2 * np.arange(3.0))
    assert back == 5
    out, back = f(jnp.ones(2), "static")  # same shape, no NNX object now
    np.testing.assert_array_equal(out, [2.0, 2.0])
    assert back == "static"


def test_returned_module_is_a_copy_with_the_new_values():
    @fj.filter_jit
    def bump(counter):
        counter.count[...] += 1
        return counter

    counter = Counter()
    returned = bump(counter)
    assert returned is not counter
    assert int(returned.count[...]) == int(counter.count[...]) == 1


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    hidden=st.integers(1, 6),
    batch=st.integers(2, 5),
    steps=st.integers(1, 3),
    bump=st.lists(st.booleans(), min_size=1, max_size=4),
)
def test_property_any_network_and_updates_match_nnx_jit(hidden, batch, steps, bump):
    x = jnp.linspace(-1.0, 1.0, batch * 3).reshape(batch, 3)
    y = jnp.zeros((batch, 2))

    def step(model, optimizer, counters, x, y):
        for counter, on in zip(counters, bump, strict=True):
            if on:
                counter.count[...] += 1
        return train_step(model, optimizer, x, y)

    finals = []
    for jit in (nnx.jit, fj.filter_jit):
        model, optimizer = make(din=3, dhidden=hidden)
        counters = [Counter() for _ in bump]
        stepped = jit(step)
        losses = [np.asarray(stepped(model, optimizer, counters, x, y)) for _ in range(steps)]
        finals.append((losses, (model, optimizer, counters)))
    np.testing.assert_array_equal(np.array(finals[0][0]), np.array(finals[1][0]))
    assert_same_state(finals[0][1], finals[1][1])
    assert [int(c.count[...]) for c in finals[1][1][2]] == [steps * on for on in bump]


# ---------------------------------------------------------------------------------------
# What is refused, with what to do


def test_same_variable_through_two_arguments_is_refused():
    counter = Counter()

    @fj.filter_jit
    def f(a, b):
        a.count[...] += 1
        return None

    with pytest.raises(ValueError, match=r"args\[0\]\.count.*args\[1\]\.count|nnx.jit"):
        f(counter, counter)
    assert int(counter.count[...]) == 0


def test_tied_variable_inside_one_module_is_refused():
    class Tied(nnx.Module):
        def __init__(self):
            self.a = Counter()
            self.b = Counter()
            self.b.count = self.a.count

    @fj.filter_jit
    def f(model):
        model.a.count[...] += 1

    with pytest.raises(ValueError, match="Pass each Variable once"):
        f(Tied())


def test_attribute_added_inside_is_refused():
    @fj.filter_jit
    def f(counter):
        counter.extra = nnx.BatchStat(jnp.ones(()))

    with pytest.raises(ValueError, match="changed the structure"):
        f(Counter())


def test_variable_replaced_inside_is_refused():
    @fj.filter_jit
    def f(counter):
        counter.count = nnx.BatchStat(counter.count[...] + 1)

    with pytest.raises(ValueError, match=r"args\[0\]\.count was replaced"):
        f(Counter())


def test_mode_switch_inside_is_refused():
    @fj.filter_jit
    def f(model, x):
        model.eval()
        return model(x)

    model, _ = make()
    with pytest.raises(ValueError, match=r"model.train\(\) / model.eval\(\)"):
        f(model, X)


def test_module_as_the_function_is_refused():
    model, _ = make()
    with pytest.raises(TypeError, match="Pass the Module as an argument"):
        fj.filter_jit(model)(X)
    with pytest.raises(TypeError, match="Pass the Module as an argument"):
        fj.filter_jit(functools.partial(loss_fn, model))(X, Y)


def test_non_pytree_nnx_object_is_refused():
    class Plain(nnx.Object):
        def __init__(self):
            self.count = nnx.BatchStat(jnp.zeros(()))

    @fj.filter_jit
    def f(obj, x):
        return x

    with pytest.raises(TypeError, match="not a JAX PyTree"):
        f(Plain(), jnp.ones(2))


def test_reference_variables_are_refused():
    class Refs(nnx.Module):
        def __init__(self):
            self.weight = nnx.Param(jnp.ones(2), ref=True)

    with pytest.raises(TypeError, match="ref=True"):
        fj.filter_jit(lambda m: m.weight[...] * 2)(Refs())


def test_lower_with_nnx_arguments_is_refused():
    @fj.filter_jit
    def f(counter):
        counter.count[...] += 1

    with pytest.raises(TypeError, match=r"lower\(\.\.\.\)"):
        f.lower(Counter())
    counter = Counter()
    f(counter)  # still callable afterwards
    assert int(counter.count[...]) == 1


def test_variable_from_outside_an_enclosing_trace_is_refused():
    counter = Counter()

    @fj.filter_jit
    def bump(c):
        c.count[...] += 1

    with pytest.raises(Exception, match="different trace level"):
        jax.jit(lambda: bump(counter))()


# ---------------------------------------------------------------------------------------
# Flax's transforms inside and around filterjax's


def test_filter_jit_inside_nnx_jit():
    inner = fj.filter_jit(train_step)
    model_a, optimizer_a = make()
    model_b, optimizer_b = make()
    outer = nnx.jit(lambda m, o, x, y: inner(m, o, x, y))
    reference = nnx.jit(train_step)
    for _ in range(3):
        np.testing.assert_array_equal(
            outer(model_a, optimizer_a, X, Y), reference(model_b, optimizer_b, X, Y)
        )
    assert_same_state((model_a, optimizer_a), (model_b, optimizer_b))


def test_nnx_jit_and_nnx_vmap_inside_filter_jit():
    @fj.filter_jit
    def step(model, optimizer, counter, xs):
        loss = nnx.jit(train_step)(model, optimizer, X, Y)
        bump = nnx.vmap(lambda c, x: x * c.weight[...], in_axes=(None, 0))
        counter.count[...] += 1
        return loss, bump(counter, xs)

    model, optimizer = make()
    reference_model, reference_optimizer = make()
    counter = Counter()
    xs = jnp.ones((4, 3))
    loss, scaled = step(model, optimizer, counter, xs)
    reference = nnx.jit(train_step)(reference_model, reference_optimizer, X, Y)
    np.testing.assert_array_equal(loss, reference)
    np.testing.assert_array_equal(scaled, np.tile(np.arange(3.0), (4, 1)))
    assert int(counter.count[...]) == 1
    assert_same_state((model, optimizer), (reference_model, reference_optimizer))


# ---------------------------------------------------------------------------------------
# filter_pmap


def _replicated(tree, n):
    return jax.tree.map(lambda a: jnp.stack([a] * n), tree)


def test_filter_pmap_carries_updates_back():
    n = 4
    counter = _replicated(Counter(), n)
    bump = fj.filter_pmap(lambda c, x: (c.count.__setitem__(..., c.count[...] + 1), x * 2)[1])
    for expected in (1, 2):
        out = bump(counter, jnp.ones((n, 2)))
        np.testing.assert_array_equal(counter.count[...], [expected] * n)
    np.testing.assert_array_equal(out, np.full((n, 2), 2.0))


def test_filter_pmap_batch_statistics_match_nnx_pmap():
    n = 2

    def forward(model, x):
        return model(x)

    results = []
    for pmap in (nnx.pmap, fj.filter_pmap):
        model = _replicated(Net(nnx.Rngs(0)), n)
        model.dropout.deterministic = True
        stepped = pmap(forward)
        outs = [np.asarray(stepped(model, jnp.stack([X] * n))) for _ in range(2)]
        results.append((outs, model))
    np.testing.assert_array_equal(np.array(results[0][0]), np.array(results[1][0]))
    np.testing.assert_array_equal(results[0][1].norm.mean[...], results[1][1].norm.mean[...])
    assert not np.all(results[1][1].norm.mean[...] == 0)


def test_filter_pmap_refuses_shared_variables():
    counter = _replicated(Counter(), 2)
    with pytest.raises(ValueError, match="Pass each Variable once"):
        fj.filter_pmap(lambda a, b: a.weight[...])(counter, counter)


# ---------------------------------------------------------------------------------------
# Programs without NNX objects pay nothing


@pytest.mark.single_backend
def test_filterjax_never_imports_flax():
    code = (
        "import sys, jax.numpy as jnp, filterjax as fj\n"
        "f = fj.filter_jit(lambda x, n: x * n)\n"
        "f(jnp.ones(2), 3); f(jnp.ones(2), 3)\n"
        "fj.filter_pmap(lambda x: x + 1)(jnp.ones((1, 2)))\n"
        "assert not any(m == 'flax' or m.startswith('flax.') for m in sys.modules), "
        "[m for m in sys.modules if m.startswith('flax')]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
