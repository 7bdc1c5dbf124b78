"""Bad input to the core gets a clear Python exception, never a crash, and the same exception
type and message whichever backend is in use.

Each case is a function of a core module (`_backend`, `_pycore` or `_native`), so the same case
runs on the active backend, on both cores side by side, and (for the native core) in a child
process, where a segfault or abort fails the test instead of killing pytest.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import subprocess
import sys
import textwrap
from collections import namedtuple
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
from helpers import native_core

import filterjax
from filterjax import PyTreeCycleError, UnhashableStaticError, _backend, _pycore

# --------------------------------------------------------------------------------------------
# Misbehaving leaves and nodes
# --------------------------------------------------------------------------------------------


class BadHash:
    def __hash__(self):
        raise RuntimeError("no hash for you")


class MyList(list):
    """A list subclass: not registered, so a (mutable, unhashable) leaf."""


class EqRaises:
    def __hash__(self):
        return 7

    def __eq__(self, other):
        raise LookupError("cannot compare EqRaises")


class EqAmbiguous:
    """`==` returns an array, whose truth value is ambiguous."""

    def __hash__(self):
        return 8

    def __eq__(self, other):
        return np.array([True, False])


class FlattenRaises:
    pass


def _flatten_raises(node):
    raise OSError("flatten exploded")


jtu.register_pytree_node(FlattenRaises, _flatten_raises, lambda aux, children: FlattenRaises())


class NotAPair:
    pass


jtu.register_pytree_node(NotAPair, lambda node: [1, 2, 3], lambda aux, children: NotAPair())


class ThreeTuple:
    pass


jtu.register_pytree_node(
    ThreeTuple, lambda node: ((1,), None, 3), lambda aux, children: ThreeTuple()
)


class NotIterableChildren:
    pass


jtu.register_pytree_node(
    NotIterableChildren, lambda node: (5, None), lambda aux, children: NotIterableChildren()
)

Config = namedtuple("Config", ["lr", "schedule"])


def _nested_lists(depth: int):
    tree: list = []
    for _ in range(depth):
        tree = [tree]
    return tree


def _list_cycle():
    tree: list = [1, jnp.ones(1)]
    tree.append(tree)
    return tree


def _dict_cycle():
    tree: dict = {"self": None}
    tree["self"] = {"inner": [jnp.ones(1), tree]}
    return tree


def _dict_cycle_multi_key():
    # JAX's own flatten raises inside its recursion here and leaves the interpreter's
    # recursion counter short, so the Python core must find the cycle before JAX does.
    tree: dict = {"a": jnp.ones(1), "b": None}
    tree["b"] = tree
    return tree


def _is_plain_list(x):
    return type(x) is list


def _is_leaf_raises(x):
    if isinstance(x, int):
        raise KeyError("is_leaf saw an int")
    return False


def _predicate_raises(x):
    raise ZeroDivisionError("predicate failed")


def _compare_keys(core, a, b):
    _, key_a = core.flatten_split(a)
    _, key_b = core.flatten_split(b)
    return key_a == key_b


def _lookup_key(core, a, b):
    _, key_a = core.flatten_split(a)
    _, key_b = core.flatten_split(b)
    return {key_a: 1}[key_b]


def _hash_lazy_key(core):
    _, key = core.flatten_split([{1, 2}, jnp.ones(1)], hashed=False)
    return hash(key)


def _rebuild(core, dynamic, statics=None, tree=None):
    tree = [jnp.ones(1), "s", jnp.ones(2), 3] if tree is None else tree
    _, key = core.flatten_split(tree)
    return core.rebuild(key, dynamic, statics)


# --------------------------------------------------------------------------------------------
# The cases
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    run: Callable  # core module -> anything; must raise
    error: type[BaseException]
    fragments: tuple[str, ...] = ()  # in str(err) or its notes


CASES: dict[str, Case] = {
    "hash_raises": Case(
        lambda core: core.flatten_split([jnp.ones(1), {"cfg": BadHash()}]),
        UnhashableStaticError,
        ("tree[1]['cfg']", "BadHash", "RuntimeError: no hash for you"),
    ),
    "hash_raises_in_namedtuple": Case(
        lambda core: core.flatten_split({"opt": Config(0.1, BadHash())}),
        UnhashableStaticError,
        ("tree['opt'].schedule", "BadHash"),
    ),
    "set_leaf": Case(
        lambda core: core.flatten_split({"a": (jnp.ones(1), {1, 2})}),
        UnhashableStaticError,
        ("tree['a'][1]", "builtins.set"),
    ),
    "list_subclass_leaf": Case(
        lambda core: core.flatten_split({"x": [MyList([1])]}),
        UnhashableStaticError,
        ("tree['x'][0]", "MyList"),
    ),
    "list_leaf_via_is_leaf": Case(
        lambda core: core.flatten_split({"a": [1, 2], "b": jnp.ones(1)}, is_leaf=_is_plain_list),
        UnhashableStaticError,
        ("tree['a']", "builtins.list"),
    ),
    "hash_lazy_key": Case(_hash_lazy_key, TypeError, ("set",)),
    "eq_raises": Case(
        lambda core: _compare_keys(core, [EqRaises()], [EqRaises()]),
        LookupError,
        ("cannot compare EqRaises",),
    ),
    "eq_raises_dict_lookup": Case(
        lambda core: _lookup_key(core, {"k": EqRaises()}, {"k": EqRaises()}),
        LookupError,
        ("cannot compare EqRaises",),
    ),
    "eq_ambiguous": Case(
        lambda core: _compare_keys(core, (EqAmbiguous(), 1), (EqAmbiguous(), 1)),
        ValueError,
        ("ambiguous",),
    ),
    "flatten_raises": Case(
        lambda core: core.flatten_split([1, {"n": FlattenRaises()}]),
        OSError,
        ("flatten exploded", "FlattenRaises", "tree[1]['n']"),
    ),
    "flatten_not_a_pair": Case(
        lambda core: core.flatten_split([1, {"n": NotAPair()}]),
        ValueError,
        ("NotAPair", "tree[1]['n']", "(children, aux_data) pair"),
    ),
    "flatten_three_tuple": Case(
        lambda core: core.flatten_split((ThreeTuple(),)),
        ValueError,
        ("ThreeTuple", "tree[0]", "(children, aux_data) pair"),
    ),
    "flatten_children_not_iterable": Case(
        lambda core: core.flatten_split({"a": NotIterableChildren()}),
        ValueError,
        ("NotIterableChildren", "tree['a']", "not iterable"),
    ),
    "unsortable_dict_keys": Case(
        lambda core: core.flatten_split([0, {"a": {1: jnp.ones(1), "b": 3}}]),
        ValueError,
        ("tree[1]['a']", "sort"),
    ),
    "too_deep": Case(
        lambda core: core.flatten_split(_nested_lists(100_000)),
        RecursionError,
        ("recursion limit", "tree[0][0]"),
    ),
    "list_cycle": Case(
        lambda core: core.flatten_split(_list_cycle()),
        PyTreeCycleError,
        ("cycle", "list", "tree[2]"),
    ),
    "dict_cycle": Case(
        lambda core: core.flatten_split(_dict_cycle()),
        PyTreeCycleError,
        ("cycle", "dict", "tree['self']['inner'][1]"),
    ),
    "dict_cycle_multi_key": Case(
        lambda core: core.flatten_split(_dict_cycle_multi_key()),
        PyTreeCycleError,
        ("cycle", "dict"),
    ),
    "is_leaf_raises": Case(
        lambda core: core.flatten_split({"a": [1, 2]}, is_leaf=_is_leaf_raises),
        KeyError,
        ("is_leaf saw an int", "is_leaf", "tree['a'][0]"),
    ),
    "predicate_raises": Case(
        lambda core: core.flatten_split([1, 2], _predicate_raises),
        ZeroDivisionError,
        ("predicate failed",),
    ),
    "rebuild_too_few": Case(
        lambda core: _rebuild(core, [jnp.ones(1)]), ValueError, ("2 dynamic", "1 were given")
    ),
    "rebuild_too_many": Case(
        lambda core: _rebuild(core, [jnp.ones(1)] * 3), ValueError, ("2 dynamic", "3 were given")
    ),
    "rebuild_wrong_statics": Case(
        lambda core: _rebuild(core, [jnp.ones(1)] * 2, [None]),
        ValueError,
        ("2 static", "1 were given"),
    ),
    "rebuild_all_static_wrong_dynamic": Case(
        lambda core: _rebuild(core, [1], tree={"a": "x"}), ValueError, ("0 dynamic",)
    ),
    "rebuild_not_a_key": Case(
        lambda core: core.rebuild(("not", "a", "key"), []), TypeError, ("StaticKey",)
    ),
}


# Cases that may leave the interpreter unusable: run only in a child process.
IN_PROCESS = sorted(CASES)


def _message(err: BaseException) -> str:
    return "\n".join([str(err), *getattr(err, "__notes__", ())])


def _raise_case(name: str, core) -> BaseException:
    case = CASES[name]
    with pytest.raises(case.error) as info:
        case.run(core)
    return info.value


# --------------------------------------------------------------------------------------------
# Active backend
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", IN_PROCESS)
def test_bad_input_raises_a_clear_error(name):
    err = _raise_case(name, _backend)
    message = _message(err)
    for fragment in CASES[name].fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    # the core is still usable afterwards
    dynamic, key = _backend.flatten_split([1, jnp.ones(1)])
    assert len(dynamic) == 1 and key.statics == (1,)


def test_unhashable_static_error_carries_path_type_and_cause():
    err = _raise_case("hash_raises", _backend)
    assert isinstance(err, TypeError)
    assert err.path == (jtu.SequenceKey(1), jtu.DictKey("cfg"))
    assert err.leaf_type is BadHash
    assert isinstance(err.__cause__, RuntimeError)
    assert str(err).startswith("Static leaf at tree[1]['cfg'] of type ")


def test_flatten_error_keeps_the_original_exception_type():
    err = _raise_case("flatten_raises", _backend)
    assert type(err) is OSError and err.args == ("flatten exploded",)
    assert any("FlattenRaises" in note and "tree[1]['n']" in note for note in err.__notes__)


def test_unhashable_statics_are_fine_without_hashing():
    tree = [{1, 2}, jnp.ones(1)]
    dynamic, key = _backend.flatten_split(tree, hashed=False)
    rebuilt = _backend.rebuild(key, dynamic)
    assert rebuilt[0] is tree[0] and rebuilt[1] is tree[1]
    with pytest.raises(TypeError):
        hash(key)


def test_same_key_object_compares_equal_even_if_eq_raises():
    _, key = _backend.flatten_split([EqRaises()])
    assert key == key
    assert {key: 1}[key] == 1


def test_deep_but_legal_nesting_works():
    tree = _nested_lists(400)
    tree_leaf = tree
    for _ in range(400):
        tree_leaf = tree_leaf[0]
    tree_leaf.append(jnp.ones(1))
    dynamic, key = _backend.flatten_split(tree)
    assert len(dynamic) == 1 and dynamic[0] is tree_leaf[0]
    assert jtu.tree_structure(_backend.rebuild(key, dynamic)) == jtu.tree_structure(tree)


def test_filter_spec_errors_are_value_errors():
    with pytest.raises(ValueError, match="booleans and callables"):
        filterjax.filter([1, 2], ["x", True])


def _churn(core, tree, bad_trees, rounds: int) -> None:
    for _ in range(rounds):
        dynamic, key = core.flatten_split(tree)
        core.rebuild(key, dynamic)
        core.rebuild(key, dynamic, [None] * key.num_static)
        dynamic, key = core.flatten_split(tree, lambda x: True)
        assert key == core.flatten_split(tree, lambda x: True)[1]
        for bad in bad_trees:
            with pytest.raises(Exception):
                core.flatten_split(bad())
        with pytest.raises(ValueError):
            core.rebuild(key, dynamic[:1])


@pytest.mark.single_backend
@pytest.mark.parametrize("core_name", ["python", "native"])
def test_no_reference_leaks_on_success_or_error_paths(core_name):
    core = _pycore if core_name == "python" else native_core()
    static, array, bad, bad_node = "static-" + "x" * 8, jnp.ones(3), BadHash(), FlattenRaises()
    tree = {"a": [array, static, 1.5], "b": (array, static)}

    def cycle():
        loop = [static, array]
        loop.append(loop)
        return loop

    bad_trees = [lambda: [array, bad], lambda: [static, bad_node], cycle]
    watched = {"static": static, "array": array, "bad": bad, "bad_node": bad_node}
    _churn(core, tree, bad_trees, 5)  # warm any caches first
    gc.collect()
    before = {name: sys.getrefcount(obj) for name, obj in watched.items()}
    _churn(core, tree, bad_trees, 200)
    gc.collect()
    growth = {name: sys.getrefcount(obj) - before[name] for name, obj in watched.items()}
    assert all(g < 5 for g in growth.values()), growth


# --------------------------------------------------------------------------------------------
# Both cores side by side
# --------------------------------------------------------------------------------------------


@pytest.mark.single_backend
@pytest.mark.parametrize("name", IN_PROCESS)
def test_both_cores_raise_the_same_error(name):
    native = native_core()
    py_err = _raise_case(name, _pycore)
    nat_err = _raise_case(name, native)
    assert type(nat_err) is type(py_err)
    assert _message(nat_err) == _message(py_err)
    if isinstance(py_err, UnhashableStaticError):
        assert nat_err.path == py_err.path and nat_err.leaf_type is py_err.leaf_type
        assert type(nat_err.__cause__) is type(py_err.__cause__)


# --------------------------------------------------------------------------------------------
# Native core in a child process: a crash fails the test instead of killing pytest
# --------------------------------------------------------------------------------------------

_CHILD_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests_dir!r})
    import test_core_errors
    test_core_errors._child_main({names!r}, {core!r})
    """
)

# All cases run in one child (one JAX import instead of one per case); each case prints
# START, then RAISED <exception MRO> or NO ERROR, then HEALTHY once the core and the
# interpreter still work.
CHILD_ORDER = IN_PROCESS


def _core_named(name: str):
    if name == "python":
        return _pycore
    from filterjax import _native

    return _native


def _recurse(depth: int) -> int:
    return 0 if depth == 0 else 1 + _recurse(depth - 1)


def _child_main(names: list[str], core_name: str) -> None:
    core = _core_named(core_name)
    for name in names:
        print("START", name, flush=True)
        try:
            CASES[name].run(core)
        except BaseException as err:  # report whatever came out, the parent judges it
            print("RAISED", *(kind.__qualname__ for kind in type(err).__mro__), flush=True)
        else:
            print("NO ERROR", flush=True)
        dynamic, key = core.flatten_split([1, jnp.ones(1)])
        assert len(dynamic) == 1 and key.statics == (1,)
        assert _recurse(500) == 500
        print("HEALTHY", flush=True)


@dataclasses.dataclass
class ChildRun:
    result: subprocess.CompletedProcess
    lines: dict[str, list[str]]  # case name -> the lines it printed

    def assert_raised(self, name: str, expected: type) -> None:
        output = (
            f"exit status {self.result.returncode} (< 0: killed by a signal)\n"
            f"stdout: {self.result.stdout[-2000:]}\nstderr: {self.result.stderr[-4000:]}"
        )
        lines = self.lines.get(name)
        assert lines is not None, f"the child died before case {name!r}\n{output}"
        raised = [line.split()[1:] for line in lines if line.startswith("RAISED")]
        assert raised, f"case {name!r} raised nothing or crashed the child\n{output}"
        assert expected.__qualname__ in raised[0], output
        assert "HEALTHY" in lines, f"after case {name!r} the child was unusable\n{output}"


def _run_child(names: list[str], core_name: str) -> ChildRun:
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(filterjax.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([package_root, env.get("PYTHONPATH", "")])
    env.setdefault("JAX_PLATFORMS", "cpu")
    script = _CHILD_SCRIPT.format(
        tests_dir=os.path.dirname(os.path.abspath(__file__)), names=names, core=core_name
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env
    )
    lines: dict[str, list[str]] = {}
    current = None
    for line in result.stdout.splitlines():
        if line.startswith("START "):
            current = line.split(" ", 1)[1]
            lines[current] = []
        elif current is not None:
            lines[current].append(line)
    return ChildRun(result, lines)


@pytest.fixture(scope="module")
def native_child():
    native_core()
    return _run_child(CHILD_ORDER, "native")


@pytest.mark.single_backend
@pytest.mark.parametrize("name", CHILD_ORDER)
def test_native_bad_input_does_not_crash_the_process(native_child, name):
    native_child.assert_raised(name, CASES[name].error)


@pytest.mark.single_backend
def test_python_core_survives_the_worst_cases_in_a_child():
    names = ["too_deep", "list_cycle", "dict_cycle", "unsortable_dict_keys", "flatten_raises"]
    run = _run_child(names, "python")
    for name in names:
        run.assert_raised(name, CASES[name].error)


@pytest.mark.single_backend
def test_python_core_survives_a_multi_key_dict_cycle_in_a_child():
    _run_child(["dict_cycle_multi_key"], "python").assert_raised(
        "dict_cycle_multi_key", PyTreeCycleError
    )


class _Holder:
    def __init__(self, child):
        self.child = child


jtu.register_pytree_node(
    _Holder, lambda h: ((h.child, 1), None), lambda _, children: _Holder(children[0])
)


def _recurse(n: int) -> int:
    return 0 if n == 0 else 1 + _recurse(n - 1)


def _self_containing(kind: str):
    if kind == "dict":
        tree: Any = {"x": 1}
        tree["self"] = tree
    elif kind == "list":
        tree = [1]
        tree.append(tree)
    elif kind == "tuple":
        inner: list = [1]
        tree = (1, inner)
        inner.append(tree)
    else:
        inner = [1]
        tree = _Holder(inner)
        inner.append(tree)
    return tree


@pytest.mark.parametrize("kind", ["dict", "list", "tuple", "custom"])
def test_a_tree_containing_itself_raises_a_cycle_error_and_leaves_the_interpreter_healthy(kind):
    fj = filterjax
    for _ in range(3):
        with pytest.raises(PyTreeCycleError, match="contains itself"):
            fj.partition(_self_containing(kind), fj.is_array)
        with pytest.raises(PyTreeCycleError):
            _backend.flatten_split(_self_containing(kind))
        with pytest.raises(PyTreeCycleError):
            fj.filter_jit(lambda t: 0)(_self_containing(kind))
    # The recursion accounting is intact: nearly the whole limit is still usable.
    assert _recurse(sys.getrecursionlimit() - 100) == sys.getrecursionlimit() - 100


def test_key_comparison_error_carries_a_note_naming_the_static_leaf():
    _, first = _backend.flatten_split([1, EqRaises()])
    _, second = _backend.flatten_split([1, EqRaises()])
    with pytest.raises(LookupError) as info:
        first == second  # noqa: B015
    assert any("static leaf #1" in note and "EqRaises" in note for note in info.value.__notes__)
