"""The package's structure: which module may import which, and the core contract.

- No import cycles among `python/filterjax/` modules, counting imports inside functions
  and under `TYPE_CHECKING`.
- The cores (`_pycore`, the native module) import nothing from the public layer.
- No transform imports another transform, and no module another's private names; shared
  compile plumbing lives in `_compile_utils`.
- `filter_jit` and the other transforms never load the other core.
- Both cores export the same names with the same signatures.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BACKENDS
from helpers import native_core

import filterjax
from filterjax import _backend, _pycore

_PACKAGE = Path(filterjax.__file__).parent
_RUST = Path(__file__).parent.parent / "rust"
_MODULES = sorted(path.stem for path in _PACKAGE.glob("*.py"))
_KNOWN = {*_MODULES, "_native"}  # the native core is an extension module

# Modules the cores may use: error messages and diagnosis, argument plans, how dataclass
# nodes are rebuilt. Everything else is the public layer (transforms, filtering helpers,
# caches, ...).
_CORE_SIDE = {"_pycore", "_diagnose", "_errors", "_plans", "_dataclass_init"}
# One module per transform family; each may import the shared plumbing, never another.
_TRANSFORMS = {
    "_ad",
    "_callback",
    "_closure_convert",
    "_eval_shape",
    "_jit",
    "_make_jaxpr",
    "_sharding",
    "_vmap_pmap",
}

once = pytest.mark.single_backend


def _resolve(module: str, level: int, name: str | None) -> str | None:
    """The package module an import names, or None for one outside the package."""
    if level == 0:
        parts = module.split(".")
        if parts[0] != "filterjax":
            return None
        rest = parts[1:] + ([name] if name else [])
    else:
        rest = (module.split(".") if module else []) + ([name] if name else [])
    if rest and rest[0] in _KNOWN and rest[0] != "__init__":
        return rest[0]
    return "__init__"


def _imports(stem: str) -> dict[str, set[str]]:
    """Package modules `stem` imports (anywhere in its source) -> the names imported."""
    tree = ast.parse((_PACKAGE / f"{stem}.py").read_text(), filename=f"{stem}.py")
    found: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _resolve(alias.name, 0, None)
                if target is not None:
                    found.setdefault(target, set())
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                target = _resolve(node.module or "", node.level, alias.name)
                if target is None:
                    continue
                names = found.setdefault(target, set())
                if target != alias.name:  # `from .x import name`, not `from . import x`
                    names.add(alias.name)
    found.pop(stem, None)
    return found


_GRAPH = {stem: _imports(stem) for stem in _MODULES}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph`, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for succ in sorted(graph.get(node, ())):
            if state.get(succ) == 1:
                return path[path.index(succ) :] + [succ]
            if succ not in state:
                found = visit(succ)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        for succ in _GRAPH.get(node, {}):
            if succ not in seen:
                seen.add(succ)
                todo.append(succ)
    return seen


@once
def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


@once
def test_the_import_graph_sees_imports_inside_functions():
    # `_backend` imports both cores only inside `_load`.
    assert {"_native", "_pycore"} <= set(_GRAPH["_backend"])


@once
def test_no_import_cycles():
    graph = {stem: set(targets) for stem, targets in _GRAPH.items()}
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph) or [])}"


@once
def test_the_python_core_imports_nothing_from_the_public_layer():
    reached = _reachable("_pycore")
    assert reached <= _CORE_SIDE, sorted(reached - _CORE_SIDE)


@once
def test_the_native_core_imports_nothing_from_the_public_layer():
    imported = set()
    for path in _RUST.glob("*.rs"):
        imported.update(re.findall(r"import\(\s*\"filterjax\.(\w+)", path.read_text()))
    assert imported, "expected the native core to import its error helpers"
    reached = set(imported)
    for stem in imported:
        reached |= _reachable(stem)
    assert reached <= _CORE_SIDE, sorted(reached - _CORE_SIDE)


@once
def test_no_transform_imports_another_transform():
    for stem in sorted(_TRANSFORMS):
        others = (set(_GRAPH[stem]) & _TRANSFORMS) - {stem}
        assert not others, f"{stem} imports {sorted(others)}"


@once
def test_no_private_names_cross_modules():
    """A name imported from another package module is one of its public names (no leading
    underscore): what modules share is named as shared."""
    crossing = {
        (stem, target, name)
        for stem, targets in _GRAPH.items()
        for target, names in targets.items()
        for name in names
        if name.startswith("_") and not name.startswith("__")
    }
    assert not crossing, sorted(crossing)


@once
def test_jit_pmap_eval_shape_and_make_jaxpr_share_the_compile_plumbing():
    for stem in ("_jit", "_vmap_pmap", "_eval_shape", "_make_jaxpr"):
        assert "_compile_utils" in _GRAPH[stem], stem


@once
@pytest.mark.parametrize("core", BACKENDS)
def test_transforms_load_only_the_core_in_use(core):
    other = {"native": "filterjax._pycore", "python": "filterjax._native"}[core]
    script = f"""
import sys
import jax.numpy as jnp
import filterjax as fj

x = jnp.ones(2)
fj.filter_jit(lambda a, n: a * n)(x, 2)
fj.filter_vmap(lambda a: a + 1)(x)
fj.filter_grad(lambda a: (a**2).sum())(x)
fj.filter_eval_shape(lambda a: a, x)
fj.filter_make_jaxpr(lambda a: a)(x)
fj.filter_pmap(lambda a: a)(x[:1])
fj.partition({{"a": x, "b": 1}}, fj.is_array)
assert fj.backend() == {core!r}, fj.backend()
print({other!r} in sys.modules)
"""
    env = {**os.environ, "FILTERJAX_BACKEND": core}
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False", f"{other} was imported"


# ---------------------------------------------------------------------------------------
# The core contract


def _parameters(fun) -> list[tuple[str, object, object]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fun).parameters.values()]


_PY_CORE_FUNCTIONS = sorted(
    n for n in _pycore.__all__ if callable(getattr(_pycore, n)) and n[0].islower()
)


@once
def test_both_cores_export_the_same_names():
    native = native_core()
    assert {name for name in dir(native) if not name.startswith("_")} == set(_pycore.__all__)


@once
@pytest.mark.parametrize("name", _PY_CORE_FUNCTIONS)
def test_both_cores_functions_have_the_same_signature(name):
    native = native_core()
    assert _parameters(getattr(native, name)) == _parameters(getattr(_pycore, name))


@once
def test_both_dispatchers_take_the_same_arguments_and_have_the_same_members():
    native = native_core()
    assert _parameters(native.Dispatcher) == _parameters(_pycore.Dispatcher)
    for cls in ("Dispatcher", "StaticKey"):
        native_members = {m for m in dir(getattr(native, cls)) if not m.startswith("_")}
        python_members = {m for m in dir(getattr(_pycore, cls)) if not m.startswith("_")}
        assert native_members == python_members, cls


def _stub_functions() -> dict[str, list[tuple[str, str | None]]]:
    """`_native.pyi`'s functions: name -> [(parameter, default as source text)]."""
    # The installed stub; the pure-Python wheel ships none, so then the checkout's.
    path = _PACKAGE / "_native.pyi"
    if not path.exists():
        path = Path(__file__).resolve().parent.parent / "python" / "filterjax" / "_native.pyi"
    stub = ast.parse(path.read_text())
    functions = {}
    for node in stub.body:
        if isinstance(node, ast.FunctionDef):
            args = node.args
            params = args.posonlyargs + args.args
            defaults = [None] * (len(params) - len(args.defaults)) + [
                ast.unparse(d) for d in args.defaults
            ]
            functions[node.name] = [(p.arg, d) for p, d in zip(params, defaults, strict=True)]
    return functions


@once
def test_python_core_matches_the_native_stub():
    stub = _stub_functions()
    assert set(stub) == set(_PY_CORE_FUNCTIONS)
    for name, params in stub.items():
        ours = [
            (p.name, None if p.default is inspect.Parameter.empty else repr(p.default))
            for p in inspect.signature(getattr(_pycore, name)).parameters.values()
        ]
        assert ours == params, name


@once
def test_the_core_contract_names_every_core_function():
    declared = {
        name
        for name, _ in inspect.getmembers(_backend.Core)
        if not name.startswith("_") and name != "BACKEND"
    } | {"BACKEND"}
    assert declared == set(_pycore.__all__)


def test_registered_array_predicate_runs_in_the_core(backend):
    calls = []

    def counting(leaf):
        calls.append(leaf)
        return filterjax.is_array(leaf)

    import jax.numpy as jnp

    tree = {"a": jnp.ones(2), "b": 1}
    core = _backend._core
    assert core.tree_partition(tree, filterjax.is_array)[0]["b"] is None
    core.tree_partition(tree, counting)
    assert len(calls) == 2  # an unregistered predicate is called per leaf
    with pytest.raises(TypeError, match="callable"):
        core.register_array_predicate(3)
