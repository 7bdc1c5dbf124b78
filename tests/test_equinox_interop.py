"""filterjax's transforms on Equinox's objects, other PyTree dataclasses, and patch_equinox.

Each transform is checked against Equinox's own version of it (or against plain JAX on
hand-split arguments), and recompilation is checked by counting traces.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest

import filterjax as fj
from filterjax import _backend, _equinox_patch


def _allclose(a, b, **kwargs) -> bool:
    leaves_a, tree_a = jtu.tree_flatten(a)
    leaves_b, tree_b = jtu.tree_flatten(b)
    assert tree_a == tree_b, (tree_a, tree_b)
    return all(np.allclose(x, y, **kwargs) for x, y in zip(leaves_a, leaves_b, strict=True))


class _Counter:
    def __init__(self):
        self.n = 0

    def __call__(self):
        self.n += 1


@pytest.fixture(autouse=True)
def _never_leave_equinox_patched():
    yield
    fj.unpatch_equinox()


# ---------------------------------------------------------------------------------------
# Modules and their methods


class Affine(eqx.Module):
    weight: jax.Array
    bias: jax.Array
    activation: object  # a function: static
    scale: float = eqx.field(static=True, default=1.0)

    def __call__(self, x):
        return self.activation(self.weight @ x + self.bias) * self.scale

    def shifted(self, x, shift):
        return self(x) + shift


def _affine(seed=0, activation=jnp.tanh, scale=1.0, n=3):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return Affine(jax.random.normal(k1, (n, n)), jax.random.normal(k2, (n,)), activation, scale)


def test_jit_of_module_traces_its_arrays():
    traces = _Counter()

    def apply(model, x):
        traces()
        return model(x)

    f = fj.filter_jit(apply)
    x = jnp.arange(3.0)
    for seed in range(3):  # new weights, same structure: one trace
        model = _affine(seed)
        assert _allclose(f(model, x), model(x), rtol=1e-6)
    assert traces.n == 1
    model = _affine(0, activation=jax.nn.relu)  # a new static leaf: traced again
    assert _allclose(f(model, x), model(x), rtol=1e-6)
    assert traces.n == 2


def test_module_itself_as_the_jitted_function():
    x = jnp.arange(3.0)
    for seed in range(2):
        model = _affine(seed, scale=2.0)
        assert _allclose(fj.filter_jit(model)(x), model(x), rtol=1e-6)


def test_bound_method_of_module():
    model = _affine(1)
    x = jnp.arange(3.0)
    shifted = fj.filter_jit(model.shifted)
    assert _allclose(shifted(x, 1.5), model.shifted(x, 1.5), rtol=1e-6)
    assert _allclose(shifted(x, jnp.array(2.0)), model.shifted(x, 2.0), rtol=1e-6)
    # Equinox's bound methods are Modules: the weights are leaves of the method.
    assert any(leaf is model.weight for leaf in jtu.tree_leaves(model.shifted))


def test_jit_decorating_a_module_method():
    traces = _Counter()

    class Scaler(eqx.Module):
        w: jax.Array

        @fj.filter_jit
        def __call__(self, x):
            traces()
            return self.w * x

    x = jnp.arange(2.0)
    assert _allclose(Scaler(jnp.array(2.0))(x), 2.0 * x)
    assert _allclose(Scaler(jnp.array(3.0))(x), 3.0 * x)
    assert traces.n == 1


def test_grad_of_module_matches_equinox():
    filter_grad = fj.filter_grad
    filter_value_and_grad = fj.filter_value_and_grad
    model = _affine(2)
    x = jnp.arange(3.0)

    def loss(model, x):
        return jnp.sum(model(x) ** 2)

    expected = eqx.filter_grad(loss)(model, x)
    got = filter_grad(loss)(model, x)
    assert got.activation is None and got.scale == 1.0  # non-arrays get None / keep statics
    assert _allclose(got, expected, rtol=1e-5)
    value, grads = fj.filter_jit(filter_value_and_grad(loss))(model, x)
    assert np.allclose(value, loss(model, x), rtol=1e-6)
    assert _allclose(grads, expected, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# eqx.nn layers


def test_nn_mlp_and_conv():
    key = jax.random.PRNGKey(0)
    mlp = eqx.nn.MLP(4, 2, 8, 2, key=key)
    conv = eqx.nn.Conv2d(2, 3, kernel_size=3, padding=1, key=key)
    x = jnp.linspace(-1, 1, 4)
    image = jnp.ones((2, 5, 5))
    assert _allclose(fj.filter_jit(mlp)(x), mlp(x), rtol=1e-5)
    assert _allclose(fj.filter_jit(lambda m, y: m(y))(conv, image), conv(image), rtol=1e-5)


def test_nn_sequential_with_dropout_key_and_inference_flag():
    key = jax.random.PRNGKey(1)
    model = eqx.nn.Sequential(
        [eqx.nn.Linear(4, 16, key=key), eqx.nn.Lambda(jax.nn.relu), eqx.nn.Dropout(0.5)]
    )
    traces = _Counter()

    @fj.filter_jit
    def run(model, x, key):
        traces()
        return model(x, key=key)

    x = jnp.ones(4)
    dropout_key = jax.random.PRNGKey(7)
    assert _allclose(run(model, x, dropout_key), model(x, key=dropout_key))
    inference = eqx.nn.inference_mode(model)  # flips a static bool: traced again
    assert _allclose(run(inference, x, None), inference(x))
    assert traces.n == 2


@pytest.mark.filterwarnings("ignore:When `eqx.nn.BatchNorm")
def test_stateful_batchnorm_in_jit_of_vmap_matches_equinox():
    filter_vmap = fj.filter_vmap
    model, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, axis_name="batch")

    def step(transforms):
        jit, vmap = transforms

        @jit
        def forward(model, state, xs):
            batched = vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
            return batched(xs, state)

        return forward

    ours = step((fj.filter_jit, filter_vmap))
    theirs = step((eqx.filter_jit, eqx.filter_vmap))
    our_state = their_state = state
    for seed in range(3):
        xs = jax.random.normal(jax.random.PRNGKey(seed), (8, 3)) * (seed + 1)
        our_out, our_state = ours(model, our_state, xs)
        their_out, their_state = theirs(model, their_state, xs)
        assert _allclose(our_out, their_out, rtol=1e-5, atol=1e-6)
        assert type(our_state) is eqx.nn.State
        assert _allclose(our_state, their_state, rtol=1e-5, atol=1e-6)
    # The running statistics moved away from their initial values.
    running_mean, _ = our_state.get(model.ema_state_index)
    assert not np.allclose(running_mean, 0.0)


def test_stateful_layer_state_roundtrip_in_jit():
    class Counter(eqx.Module):
        index: eqx.nn.StateIndex

        def __init__(self):
            self.index = eqx.nn.StateIndex(jnp.array(0))

        def __call__(self, x, state):
            count = state.get(self.index) + 1
            return x * count, state.set(self.index, count)

    model, state = eqx.nn.make_with_state(Counter)()
    run = fj.filter_jit(lambda m, x, s: m(x, s))
    for expected in (1, 2, 3):
        out, state = run(model, jnp.array(2.0), state)
        assert int(out) == 2 * expected
    assert int(state.get(model.index)) == 3


# ---------------------------------------------------------------------------------------
# eqx.tree_at


def test_models_edited_with_tree_at():
    traces = _Counter()

    @fj.filter_jit
    def apply(model, x):
        traces()
        return model(x)

    model = _affine(3)
    x = jnp.arange(3.0)
    assert _allclose(apply(model, x), model(x), rtol=1e-6)

    # (an explicit dtype: a weakly typed array would be a new signature for jax.jit too)
    same_shape = eqx.tree_at(lambda m: m.bias, model, jnp.full(3, 5.0, dtype=jnp.float32))
    assert _allclose(apply(same_shape, x), same_shape(x), rtol=1e-6)
    assert traces.n == 1

    new_static = eqx.tree_at(lambda m: m.activation, model, jax.nn.sigmoid)
    assert _allclose(apply(new_static, x), new_static(x), rtol=1e-6)
    assert traces.n == 2

    new_shape = eqx.tree_at(lambda m: (m.weight, m.bias), model, (jnp.ones((3, 4)), jnp.zeros(3)))
    x4 = jnp.arange(4.0)
    assert _allclose(apply(new_shape, x4), new_shape(x4), rtol=1e-6)
    assert traces.n == 3

    # A node replaced by a plain Python number becomes static.
    frozen = eqx.tree_at(lambda m: m.bias, model, 0.5, is_leaf=lambda v: v is None)
    assert _allclose(apply(frozen, x), frozen(x), rtol=1e-6)
    assert traces.n == 4


# ---------------------------------------------------------------------------------------
# Dataclasses registered with jax.tree_util and Flax-style structs


@jtu.register_dataclass
@dataclasses.dataclass
class Params:
    w: jax.Array
    b: jax.Array
    name: str = dataclasses.field(metadata=dict(static=True), default="p")


@dataclasses.dataclass(frozen=True)
class _Struct:
    """A Flax-`struct`-like dataclass: meta fields are part of the treedef."""

    w: jax.Array
    depth: int


jtu.register_dataclass(_Struct, data_fields=["w"], meta_fields=["depth"])


def test_register_dataclass_fields_and_statics():
    traces = _Counter()

    @fj.filter_jit
    def f(p: Params, x):
        traces()
        return p.w * x + p.b, p.name

    p = Params(jnp.array(2.0), jnp.array(1.0))
    out, name = f(p, jnp.array(3.0))
    assert float(out) == 7.0 and name == "p"
    out, name = f(Params(jnp.array(1.0), jnp.array(0.0)), jnp.array(3.0))
    assert float(out) == 3.0 and traces.n == 1
    out, name = f(Params(jnp.array(1.0), jnp.array(0.0), name="q"), jnp.array(3.0))
    assert name == "q" and traces.n == 2
    # A data field holding a non-array is held static, like any other leaf.
    out, _ = f(Params(2.0, jnp.array(0.0)), jnp.array(3.0))
    assert float(out) == 6.0 and traces.n == 3


def test_register_dataclass_meta_fields_and_grad():
    filter_grad = fj.filter_grad
    traces = _Counter()

    @fj.filter_jit
    def f(s: _Struct):
        traces()
        return s.w * s.depth

    assert float(f(_Struct(jnp.array(2.0), 3))) == 6.0
    assert float(f(_Struct(jnp.array(4.0), 3))) == 12.0
    assert float(f(_Struct(jnp.array(4.0), 2))) == 8.0
    assert traces.n == 2
    grads = filter_grad(lambda s: jnp.sum(s.w**2) * s.depth)(_Struct(jnp.array([1.0, 2.0]), 2))
    assert type(grads) is _Struct and grads.depth == 2
    assert np.allclose(grads.w, [4.0, 8.0])


def test_register_dataclass_under_vmap():
    filter_vmap = fj.filter_vmap
    p = Params(jnp.arange(4.0), jnp.ones(4), name="batched")
    out = filter_vmap(lambda p, x: (p.w * x + p.b, p.name), in_axes=(0, None))(p, 2.0)
    assert np.allclose(out[0], jnp.arange(4.0) * 2 + 1) and out[1] == "batched"


def test_flax_struct_dataclass():
    struct = pytest.importorskip("flax.struct")

    @struct.dataclass
    class State:
        w: jax.Array
        tag: str = struct.field(pytree_node=False, default="a")

    traces = _Counter()

    @fj.filter_jit
    def f(s):
        traces()
        return s.replace(w=s.w + 1)

    out = f(State(jnp.array(1.0)))
    assert type(out) is State and float(out.w) == 2.0 and out.tag == "a"
    f(State(jnp.array(5.0)))
    assert traces.n == 1
    assert f(State(jnp.array(5.0), tag="b")).tag == "b" and traces.n == 2


# ---------------------------------------------------------------------------------------
# patch_equinox


def _equinox_filter_names() -> dict:
    return {name: obj for name, obj in vars(eqx).items() if name.startswith("filter_")}


@pytest.mark.single_backend
def test_patch_replaces_names_and_unpatch_restores_them_exactly():
    before = _equinox_filter_names()
    patch = fj.patch_equinox()
    try:
        assert "filter_jit" in patch.names
        assert eqx.filter_jit is fj.filter_jit
        for name in patch.names:
            assert getattr(eqx, name) is getattr(fj, name)
            assert before[name] is not getattr(fj, name)
        # Names filterjax does not provide (yet) stay Equinox's.
        for name in set(before) - set(patch.names):
            assert getattr(eqx, name) is before[name]
        assert set(patch.names) <= set(_equinox_patch.PATCHABLE_NAMES)
        # Idempotent: a second call changes nothing and does not forget the originals.
        again = fj.patch_equinox()
        assert again.names == patch.names
        assert eqx.filter_jit is fj.filter_jit
    finally:
        fj.unpatch_equinox()
    after = _equinox_filter_names()
    assert after.keys() == before.keys()
    assert all(after[name] is before[name] for name in before)
    fj.unpatch_equinox()  # unpatching twice is harmless
    assert eqx.filter_jit is before["filter_jit"]


@pytest.mark.single_backend
def test_patch_every_transform():
    names = _equinox_patch.PATCHABLE_NAMES
    assert all(callable(getattr(fj, name)) for name in names)
    with fj.patch_equinox() as patch:
        assert sorted(patch.names) == sorted(n for n in names if n in vars(eqx))


@pytest.mark.single_backend
def test_patch_as_context_manager():
    original = eqx.filter_jit
    with fj.patch_equinox():
        assert eqx.filter_jit is fj.filter_jit
    assert eqx.filter_jit is original
    # Nested in an already patched program, leaving the block keeps the outer patch.
    fj.patch_equinox()
    with fj.patch_equinox():
        assert eqx.filter_jit is fj.filter_jit
    assert eqx.filter_jit is fj.filter_jit
    fj.unpatch_equinox()
    assert eqx.filter_jit is original
    # An exception in the block still undoes the patch.
    with pytest.raises(RuntimeError), fj.patch_equinox():
        raise RuntimeError
    assert eqx.filter_jit is original


@pytest.mark.single_backend
def test_importing_filterjax_does_not_import_equinox():
    code = textwrap.dedent(
        """
        import sys
        import filterjax
        filterjax.patch_equinox  # resolving the name imports the module, not equinox
        filterjax.filter_jit
        assert "equinox" not in sys.modules, sorted(m for m in sys.modules if "equinox" in m)
        filterjax.patch_equinox()
        assert "equinox" in sys.modules
        """
    )
    # The child imports the same filterjax source tree as this process.
    package_parent = os.path.dirname(os.path.dirname(fj.__file__))
    env = {**os.environ, "PYTHONPATH": package_parent, "JAX_PLATFORMS": "cpu"}
    env["FILTERJAX_BACKEND"] = _backend.backend()
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr


def _train_with_equinox_api(steps: int = 25) -> tuple[list[float], type]:
    """A small Equinox training script. It looks `eqx.filter_*` up when run, as scripts do."""
    import optax

    key = jax.random.PRNGKey(0)
    data_key, model_key = jax.random.split(key)
    xs = jax.random.uniform(data_key, (64, 1), minval=-2.0, maxval=2.0)
    ys = jnp.sin(2.0 * xs) + 0.1 * xs**2
    model = eqx.nn.MLP(1, 1, 16, 2, activation=jax.nn.tanh, key=model_key)
    optimiser = optax.adam(1e-2)
    opt_state = optimiser.init(eqx.filter(model, eqx.is_inexact_array))

    def loss_fn(model, xs, ys):
        return jnp.mean((jax.vmap(model)(xs) - ys) ** 2)

    @eqx.filter_jit
    def step(model, opt_state, xs, ys):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model, xs, ys)
        updates, opt_state = optimiser.update(grads, opt_state, model)
        model = eqx.apply_updates(model, updates)
        return model, opt_state, loss

    losses = []
    for _ in range(steps):
        model, opt_state, loss = step(model, opt_state, xs, ys)
        losses.append(float(loss))
    return losses, type(step)


def test_equinox_training_script_same_losses_when_patched():
    original_jit = eqx.filter_jit
    original_vag = eqx.filter_value_and_grad
    plain, plain_type = _train_with_equinox_api()
    with fj.patch_equinox() as patch:
        assert eqx.filter_jit is fj.filter_jit
        assert eqx.filter_jit is not original_jit
        patched, patched_type = _train_with_equinox_api()
    assert "filter_jit" in patch.names
    assert plain_type.__module__.startswith("equinox")
    assert patched_type.__module__.startswith("filterjax")
    assert eqx.filter_jit is original_jit
    assert eqx.filter_value_and_grad is original_vag
    assert plain[-1] < 0.8 * plain[0]  # it does train (by how much depends on jax's RNG)
    np.testing.assert_allclose(patched, plain, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------
# The deliberate differences from Equinox that docs/migrating.md lists


def test_equal_statics_of_different_types_trace_apart_unlike_equinox():
    traces = {"eqx": 0, "fj": 0, "jax": 0}

    def body(name):
        def f(x, static):
            traces[name] += 1
            return static

        return f

    values = (1, 1.0, True)
    eqx_f = eqx.filter_jit(body("eqx"))
    fj_f = fj.filter_jit(body("fj"))
    jax_f = jax.jit(body("jax"), static_argnums=1)
    assert [type(eqx_f(jnp.ones(1), v)) for v in values] == [int, int, int]
    assert [type(fj_f(jnp.ones(1), v)) for v in values] == [int, float, bool]
    for v in values:
        jax_f(jnp.ones(1), v)
    assert traces == {"eqx": 1, "fj": 3, "jax": 3}


def test_static_object_mutated_in_place_retraces_unlike_equinox():
    class Config:
        def __init__(self, scale):
            self.scale = scale

        def __eq__(self, other):
            return type(other) is Config and other.scale == self.scale

        def __hash__(self):
            return hash(self.scale)

    def scaled(x, cfg):
        return x * cfg.scale

    results = {}
    for name, jit in (("eqx", eqx.filter_jit), ("fj", fj.filter_jit)):
        f = jit(scaled)
        cfg = Config(1.0)
        first = float(f(jnp.ones(()), cfg))
        cfg.scale = 5.0
        results[name] = (first, float(f(jnp.ones(()), cfg)))
    assert results["fj"] == (1.0, 5.0)
    # Equinox's second answer depends on the jax under it: stale (1.0) where jax's C++
    # cache matches the mutated object to its first call (jax 0.10), fresh on others.
    assert results["eqx"][0] == 1.0 and results["eqx"][1] in (1.0, 5.0)


def test_identity_filter_vmap_returns_numpy_input_unchanged_like_jax_vmap():
    x = np.arange(6.0).reshape(2, 3)
    assert fj.filter_vmap(lambda t: t)(x) is x
    assert type(jax.vmap(lambda t: t)(x)) is np.ndarray
    assert isinstance(eqx.filter_vmap(lambda t: t)(x), jax.Array)
    out = fj.filter_vmap(lambda t: t * 2)(x)  # computed outputs are JAX arrays
    assert isinstance(out, jax.Array)
    np.testing.assert_allclose(out, 2 * x)


class _Policy(eqx.Module):
    weight: jax.Array
    act: str = eqx.field(static=True)

    def __call__(self, obs, *, scale=1.0):
        out = self.weight @ obs * scale
        return jnp.tanh(out) if self.act == "tanh" else out


class _Agent(eqx.Module):
    # Jitted functions stored in a Module, called as fields, with keyword arguments: one
    # taking the policy Module, one taking only arrays and a float (a repeated call of
    # that one is matched argument by argument, its keyword values by position).
    policy: _Policy
    step: object
    value: object

    def act(self, obs, scale):
        return self.step(self.policy, obs=obs, scale=scale)

    def evaluate(self, obs, scale):
        return self.value(self.policy.weight, scale, obs=obs, bias=obs * 2)


def _step(policy, obs, scale):
    return policy(obs, scale=scale)


def _value(weight, scale, obs, bias):
    return jnp.sum(weight @ obs + bias) * scale


@pytest.mark.parametrize("fresh", [False, True])
def test_repeated_keyword_calls_of_a_stored_wrapper_match_equinox(fresh):
    # An RL-style loop as Equinox programs write it: the jitted step stored in a Module
    # (or made afresh each step), called with keyword arguments, the model replaced by
    # `eqx.tree_at` and deep-copied between steps, a static flag flipping now and then.
    # Every output must be equinox.filter_jit's.
    import copy

    traces = _Counter()

    def counted(policy, obs, scale):
        traces()
        return _step(policy, obs, scale)

    def counted_value(weight, scale, obs, bias):
        traces()
        return _value(weight, scale, obs, bias)

    key = jax.random.PRNGKey(0)
    policy = _Policy(jax.random.normal(key, (3, 3)), "tanh")
    ours = _Agent(policy, fj.filter_jit(counted), fj.filter_jit(counted_value))
    theirs = _Agent(policy, eqx.filter_jit(_step), eqx.filter_jit(_value))
    for step in range(12):
        obs = jnp.arange(3.0) + step
        scale = 2.0 if step % 4 else 0.5
        if fresh:
            ours = eqx.tree_at(
                lambda a: (a.step, a.value),
                ours,
                (fj.filter_jit(counted), fj.filter_jit(counted_value)),
            )
        for _ in range(2):
            np.testing.assert_allclose(ours.act(obs, scale), theirs.act(obs, scale), rtol=1e-6)
            np.testing.assert_allclose(
                ours.evaluate(obs, scale), theirs.evaluate(obs, scale), rtol=1e-6
            )
        new_weight = ours.policy.weight * 0.9 + step
        ours = copy.deepcopy(eqx.tree_at(lambda a: a.policy.weight, ours, new_weight))
        theirs = eqx.tree_at(lambda a: a.policy.weight, theirs, new_weight)
    # One program per function and static signature: scale 2.0 and 0.5.
    assert traces.n == 4


def test_error_if_raises_at_its_call_on_repeated_keyword_calls():
    f = fj.filter_jit(lambda x, bound: eqx.error_if(x, x > bound, "over the bound") * 2)
    for value in [1.0, 2.0, 5.0, 1.0, 7.0, 0.0]:
        x = jnp.array(value)
        if value > 3.0:
            with pytest.raises(eqx.EquinoxRuntimeError, match="over the bound"):
                f(x, bound=3.0)
        else:
            np.testing.assert_allclose(f(x, bound=3.0), 2 * value)
