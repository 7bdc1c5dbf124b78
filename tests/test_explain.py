"""explain_recompiles: one WARNING per new program after a function's first, saying which
leaf (by path in the call's own names) made it compile again."""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import BACKENDS
from jax_features import make_mesh, needs_axis_types

import filterjax as fj
import filterjax._backend as _backend
from filterjax import _explain


@pytest.fixture(autouse=True)
def _restore_switch():
    previous = _explain.enabled
    yield
    _explain.enabled = previous


@pytest.fixture
def logged(caplog):
    """The messages logged to the "filterjax" logger so far (WARNING and above)."""
    caplog.set_level(logging.WARNING, logger="filterjax")

    def messages() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "filterjax"]

    return messages


def _only(messages: list[str]) -> str:
    assert len(messages) == 1, messages
    return messages[0]


# --- the switch ----------------------------------------------------------------------------


def test_off_logs_nothing(logged):
    fj.explain_recompiles(False)

    @fj.filter_jit
    def f(x, n):
        return x * n

    for n in (1, 2, 3):
        f(jnp.ones(3), n)
    f(jnp.ones(4), 1)
    assert logged() == []


def test_first_compile_and_cache_hits_log_nothing(logged):
    @fj.filter_jit
    def f(x, n):
        return x * n

    with fj.explain_recompiles():
        for _ in range(3):
            f(jnp.ones(3), 2)
            f(x=jnp.ones(3), n=2)  # binds to the same program
    assert logged() == []


def test_cache_hits_never_reach_the_explainer(monkeypatch):
    seen = []
    monkeypatch.setattr(_explain, "on_trace", lambda *args: seen.append(args[1]))

    @fj.filter_jit
    def f(x, n):
        return x * n

    with fj.explain_recompiles():
        f(jnp.ones(3), 1)
        f(jnp.ones(3), 2)
        assert seen == ["filter_jit", "filter_jit"]  # one per trace
        for _ in range(5):
            f(jnp.ones(3), 1)
            f(jnp.ones(3), n=2)
    assert len(seen) == 2


def test_context_manager_restores_and_plain_call_sets(logged):
    @fj.filter_jit
    def f(x, n):
        return x * n

    fj.explain_recompiles(False)
    with fj.explain_recompiles():
        assert _explain.enabled
        f(jnp.ones(3), 1)
        f(jnp.ones(3), 2)
    assert not _explain.enabled
    f(jnp.ones(3), 3)
    assert len(logged()) == 1
    fj.explain_recompiles(True)
    f(jnp.ones(3), 4)
    assert len(logged()) == 2
    fj.explain_recompiles(False)
    f(jnp.ones(3), 5)
    assert len(logged()) == 2


def test_record_is_one_warning_on_the_filterjax_logger(caplog):
    caplog.set_level(logging.DEBUG, logger="filterjax")

    @fj.filter_jit
    def f(x, n):
        return x * n

    with fj.explain_recompiles():
        f(jnp.ones(3), 1)
        f(jnp.ones(3), 2)
    records = [r for r in caplog.records if r.name == "filterjax"]
    assert len(records) == 1
    assert records[0].levelno == logging.WARNING


# --- static leaves ---------------------------------------------------------------------------


def test_changing_python_number_names_path_values_and_advice(logged):
    @fj.filter_jit
    def step(x, opts):
        return x * opts["scale"]

    with fj.explain_recompiles():
        step(jnp.ones(3), {"scale": 0.1})
        step(jnp.ones(3), {"scale": 0.1})
        step(jnp.ones(3), {"scale": 0.2})
    message = _only(logged())
    assert "test_changing_python_number_names_path_values_and_advice.<locals>.step" in message
    assert "2 programs" in message
    assert "args[1]['scale']" in message
    assert "0.1" in message and "0.2" in message
    assert "jnp.asarray" in message


def test_keyword_only_argument_attribute_path(logged):
    class Cfg(eqx.Module):
        act: str
        w: jax.Array

    @fj.filter_jit
    def f(x, *, cfg):
        return x * cfg.w

    with fj.explain_recompiles():
        f(jnp.ones(2), cfg=Cfg("relu", jnp.ones(2)))
        f(jnp.ones(2), cfg=Cfg("tanh", jnp.ones(2)))
    message = _only(logged())
    assert "kwargs['cfg'].act" in message
    assert "'relu'" in message and "'tanh'" in message
    assert ".w" not in message  # the array leaf did not change


def test_nearest_earlier_signature_is_compared(logged):
    @fj.filter_jit
    def f(x, mode, n):
        return x * n

    with fj.explain_recompiles():
        f(jnp.ones(2), "a", 1)
        f(jnp.ones(2), "b", 1)
        f(jnp.ones(2), "a", 2)
    first, second = logged()
    assert "args[1]" in first and "'a'" in first and "'b'" in first
    assert "3 programs" in second
    assert "program #1" in second  # ("a", 1) is nearer than ("b", 1)
    assert "args[2]" in second
    assert "args[1]" not in second


def test_new_lambda_each_call_as_static_argument(logged):
    @fj.filter_jit
    def apply(fn, x):
        return fn(x)

    with fj.explain_recompiles():
        for _ in range(2):
            apply(lambda y: y + 1, jnp.ones(2))
    message = _only(logged())
    assert "args[0]" in message
    assert "new function object" in message
    assert "identity" in message
    assert "<lambda>" in message
    assert "hoist" in message.lower()


def test_new_jax_jit_object_each_call(logged):
    def g(y):
        return y * 2

    @fj.filter_jit
    def apply(x, fn):
        return fn(x)

    with fj.explain_recompiles():
        for _ in range(2):
            apply(jnp.ones(2), jax.jit(g))
    message = _only(logged())
    assert "args[1]" in message
    assert "jax.jit" in message
    assert "identity" in message
    assert "hoist" in message.lower()


def test_object_comparing_by_identity(logged):
    class Settings:
        pass

    @fj.filter_jit
    def f(x, settings):
        return x

    with fj.explain_recompiles():
        f(jnp.ones(2), Settings())
        f(jnp.ones(2), Settings())
    message = _only(logged())
    assert "args[1]" in message
    assert "Settings" in message
    assert "identity" in message


def test_static_type_change(logged):
    @fj.filter_jit
    def f(x, n):
        return x * n

    with fj.explain_recompiles():
        f(jnp.ones(2), 1)
        f(jnp.ones(2), 1.0)
    message = _only(logged())
    assert "args[1]" in message
    assert "int" in message and "float" in message


# --- array leaves -----------------------------------------------------------------------------


def test_array_shape_change(logged):
    @fj.filter_jit
    def f(x):
        return x + 1

    with fj.explain_recompiles():
        f(jnp.ones(3))
        f(jnp.ones(3))
        f(jnp.ones(4))
    message = _only(logged())
    assert "args[0]" in message
    assert "shape" in message
    assert "(3,)" in message and "(4,)" in message


def test_array_dtype_change(logged):
    @fj.filter_jit
    def f(tree):
        return tree["w"] + 1

    with fj.explain_recompiles():
        f({"w": jnp.ones(3)})
        f({"w": jnp.ones(3, jnp.int32)})
    message = _only(logged())
    assert "args[0]['w']" in message
    assert "dtype" in message
    assert "float32" in message and "int32" in message


def test_weak_type_change_has_advice(logged):
    @fj.filter_jit
    def f(x):
        return x + 1

    with fj.explain_recompiles():
        f(jnp.asarray(1.0))
        f(jnp.asarray(1.0, jnp.float32))
    message = _only(logged())
    assert "args[0]" in message
    assert "weak" in message
    assert "dtype=" in message  # the advice: give it an explicit dtype


@needs_axis_types  # before explicit axes, a sharding is not part of the traced type
def test_array_sharding_change(logged):
    mesh = make_mesh((8,), ("d",), "explicit")
    x = jnp.arange(8.0)
    split = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d")))
    whole = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

    @fj.filter_jit
    def f(x):
        return x * 2

    with fj.explain_recompiles():
        f(split)
        f(whole)
    message = _only(logged())
    assert "args[0]" in message
    assert "sharding" in message
    assert "'d'" in message


def test_array_to_static(logged):
    @fj.filter_jit
    def f(x, n):
        return x * n

    with fj.explain_recompiles():
        f(jnp.ones(2), jnp.asarray(2.0))
        f(jnp.ones(2), 3.0)
    message = _only(logged())
    assert "args[1]" in message
    assert "array" in message and "static" in message


def test_function_own_arrays_are_compared(logged):
    class Scale(eqx.Module):
        w: jax.Array

        def __call__(self, x):
            return self.w * x

    with fj.explain_recompiles():
        fj.filter_jit(Scale(jnp.ones(2)))(jnp.ones(2))
        fj.filter_jit(Scale(jnp.ones(3)))(jnp.ones(3))
    message = _only(logged())
    assert "fun.w" in message
    assert "(2,)" in message and "(3,)" in message


# --- structure and call shape -----------------------------------------------------------------


def test_dict_keys_change(logged):
    @fj.filter_jit
    def f(params):
        return params["w"]

    with fj.explain_recompiles():
        f({"w": jnp.ones(2)})
        f({"w": jnp.ones(2), "b": jnp.ones(2)})
    message = _only(logged())
    assert "args[0]" in message
    assert "'b'" in message
    assert "added" in message


def test_node_type_change(logged):
    @fj.filter_jit
    def f(xs):
        return xs[0]

    with fj.explain_recompiles():
        f((jnp.ones(2),))
        f([jnp.ones(2)])
    message = _only(logged())
    assert "args[0]" in message
    assert "tuple" in message and "list" in message


def test_positional_versus_keyword_call_shape(logged):
    @fj.filter_jit
    def f(*args, **kwargs):
        return args[0]

    with fj.explain_recompiles():
        f(jnp.ones(2), jnp.ones(2))
        f(jnp.ones(2), y=jnp.ones(2))
    message = _only(logged())
    assert "call shape" in message
    assert "positional" in message and "keyword" in message
    assert "y" in message


# --- the function itself ------------------------------------------------------------------------


def test_new_lambda_each_time_as_the_jitted_function(logged):
    with fj.explain_recompiles():
        for _ in range(3):
            fj.filter_jit(lambda x: x + 1)(jnp.ones(2))
    first, second = logged()
    assert "<lambda>" in first
    assert "fun:" in first
    assert "new function object" in first
    assert "hoist" in first.lower()
    assert "3 programs" in second


def test_module_static_field_of_the_function(logged):
    class Layer(eqx.Module):
        activation: str
        w: jax.Array

        def __call__(self, x):
            return self.w * x

    class Net(eqx.Module):
        layers: list

        def __call__(self, x):
            return self.layers[0](x)

    with fj.explain_recompiles():
        fj.filter_jit(Net([Layer("relu", jnp.ones(2))]))(jnp.ones(2))
        fj.filter_jit(Net([Layer("gelu", jnp.ones(2))]))(jnp.ones(2))
    message = _only(logged())
    assert "fun.layers[0].activation" in message
    assert "'relu'" in message and "'gelu'" in message


# --- filter_pmap and the other paths ----------------------------------------------------------


def test_filter_pmap(logged):
    @fj.filter_pmap
    def f(x, n):
        return x * n

    xs = jnp.ones((2, 3))
    with fj.explain_recompiles():
        f(xs, 1)
        f(xs, 1)
        f(xs, 2)
    message = _only(logged())
    assert "filter_pmap" in message
    assert "args[1]" in message
    assert "2 programs" in message


def test_donate_all_except_first_names_arguments(logged):
    @fj.filter_jit(donate="all-except-first")
    def f(x, y, n):
        return x.sum() + y * n

    with fj.explain_recompiles():
        f(jnp.ones(2), jnp.ones(2), 1)
        f(jnp.ones(2), jnp.ones(2), 2)
        f(jnp.ones(2), jnp.ones(3), 2)
    first, second = logged()
    assert "args[2]" in first
    assert "args[1]" in second and "(3,)" in second


def test_lower_of_new_signature_is_reported(logged):
    @fj.filter_jit
    def f(x, n):
        return x * n

    with fj.explain_recompiles():
        f(jnp.ones(2), 1)
        f.lower(jnp.ones(2), 2)
    assert "args[1]" in _only(logged())


def test_clear_caches_forgets_signatures(logged):
    @fj.filter_jit
    def f(x, n):
        return x * n

    with fj.explain_recompiles():
        f(jnp.ones(2), 1)
        fj.clear_caches()
        f(jnp.ones(2), 2)
    assert logged() == []


@dataclasses.dataclass(frozen=True)
class _Opts:
    scale: float


# A node whose only field is node data (no children).
jax.tree_util.register_dataclass(_Opts, data_fields=[], meta_fields=["scale"])


def _shared_step(x, opts, fn):
    return jax.tree.map(lambda leaf: fn(leaf) * opts.scale, x)


@pytest.mark.single_backend
def test_same_messages_on_both_backends(caplog):
    caplog.set_level(logging.WARNING, logger="filterjax")
    double = jax.jit(lambda y: y * 2)
    previous = _backend.backend()
    seen = {}
    try:
        for name in BACKENDS:
            _backend.set_backend(name)
            caplog.clear()
            f = fj.filter_jit(_shared_step)
            with fj.explain_recompiles():
                f(jnp.ones(2), _Opts(0.1), double)
                f(jnp.ones(2), _Opts(0.2), double)
                f(jnp.ones(3), _Opts(0.2), double)
                f(np.ones(3, np.int32), _Opts(0.2), double)
                f({"a": jnp.ones(3)}, _Opts(0.2), double)
            seen[name] = [r.getMessage() for r in caplog.records if r.name == "filterjax"]
    finally:
        _backend.set_backend(previous)
    messages = next(iter(seen.values()))
    assert len(messages) == 4
    assert "args[1].scale: static value 0.1 -> 0.2" in messages[0]
    assert all(other == messages for other in seen.values())


@pytest.mark.single_backend
@pytest.mark.parametrize("value, expected", [("1", True), ("0", False), ("", False)])
def test_environment_variable_read_at_import(value, expected):
    code = (
        "import jax.numpy as jnp, filterjax as fj\n"
        "f = fj.filter_jit(lambda x, n: x * n)\n"
        "f(jnp.ones(2), 1); f(jnp.ones(2), 2)\n"
    )
    env = {**os.environ, "FILTERJAX_EXPLAIN_RECOMPILES": value}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    # With no handler configured, logging prints WARNING records to stderr.
    assert ("args[1]" in result.stderr) is expected, result.stderr


def test_switched_on_mid_run_explains_against_programs_compiled_while_off(logged):
    @fj.filter_jit
    def f(x, cfg):
        return x * cfg["scale"]

    fj.explain_recompiles(False)
    f(jnp.ones(2), {"scale": 2})
    f(jnp.ones(2), {"scale": 2})  # a cache hit: no new program
    assert logged() == []
    with fj.explain_recompiles():
        f(jnp.ones(2), {"scale": 3})  # the first recompile after switching on
        message = _only(logged())
        assert "it now has 2 programs" in message
        assert "program #1" in message
        assert "args[1]['scale']: static value 2 -> 3" in message
        f(jnp.ones(5), {"scale": 3})
        assert len(logged()) == 2
        assert "it now has 3 programs" in logged()[1]
        assert "shape (2,) -> (5,)" in logged()[1]


def test_signatures_recorded_while_off_are_bounded(monkeypatch, logged):
    monkeypatch.setattr(_explain, "MAX_SIGNATURES", 4)

    @fj.filter_jit
    def f(x, n):
        return x * n

    fj.explain_recompiles(False)
    for n in range(10):
        f(jnp.ones(2), n)
    assert len(f._program.records) == 4
    assert _explain._families[_explain._family_key("filter_jit", f.__wrapped__)].count == 10
    with fj.explain_recompiles():
        f(jnp.ones(2), 10)
    message = _only(logged())
    assert "it now has 11 programs" in message and "static value 9 -> 10" in message
