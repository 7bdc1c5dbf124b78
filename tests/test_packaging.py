"""Backend selection, what the installed package ships, and what `import filterjax` imports.

Backend selection happens at import time, so those tests run a fresh interpreter each
(`sys.executable`, importing the same filterjax as this process).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

import filterjax

pytestmark = pytest.mark.single_backend

_PACKAGE_DIR = Path(filterjax.__file__).resolve().parent
_NATIVE_BUILT = importlib.util.find_spec("filterjax._native") is not None

# Installed in a child interpreter before filterjax is imported: makes `filterjax._native`
# unimportable, as on a machine where the Rust extension was never built.
_BLOCK_NATIVE = textwrap.dedent(
    """
    import sys

    class _NoNative:
        def find_spec(self, name, path=None, target=None):
            if name == "filterjax._native":
                raise ImportError("No module named 'filterjax._native' (blocked by the test)")
            return None

    sys.meta_path.insert(0, _NoNative())
    """
)


def _run(code: str, *, backend: str | None = None, block_native: bool = False):
    """Run `code` in a fresh interpreter that imports this process's filterjax."""
    env = {k: v for k, v in os.environ.items() if k != "FILTERJAX_BACKEND"}
    if backend is not None:
        env["FILTERJAX_BACKEND"] = backend
    env["PYTHONPATH"] = os.pathsep.join(
        [str(_PACKAGE_DIR.parent), *filter(None, [env.get("PYTHONPATH")])]
    )
    env["JAX_PLATFORMS"] = "cpu"
    source = (_BLOCK_NATIVE if block_native else "") + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", source], env=env, capture_output=True, text=True, timeout=120
    )


def _require_native():
    if not _NATIVE_BUILT:
        if os.environ.get("FILTERJAX_REQUIRE_NATIVE") == "1":
            pytest.fail("filterjax._native is not built but FILTERJAX_REQUIRE_NATIVE=1")
        pytest.skip("filterjax._native is not built")


_PRINT_BACKEND = "import filterjax; print(filterjax.backend())"


def test_forcing_python_uses_the_python_core():
    run = _run(_PRINT_BACKEND, backend="python")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "python"


def test_forcing_native_uses_the_native_core():
    _require_native()
    run = _run(_PRINT_BACKEND, backend="native")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "native"


def test_backend_value_is_case_and_space_insensitive():
    run = _run(_PRINT_BACKEND, backend=" Python ")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "python"


def test_default_is_native_when_it_imports():
    _require_native()
    run = _run(_PRINT_BACKEND)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "native"


def test_default_falls_back_to_python_without_native_module():
    run = _run(_PRINT_BACKEND, block_native=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "python"


def test_forcing_missing_native_raises_import_error_with_build_hint():
    code = """
        try:
            import filterjax
        except ImportError as err:
            print(type(err).__name__)
            print(err)
        else:
            print("imported with backend", filterjax.backend())
    """
    run = _run(code, backend="native", block_native=True)
    assert run.returncode == 0, run.stderr
    kind, _, message = run.stdout.partition("\n")
    assert kind == "ImportError", run.stdout
    # The message says how to build the module, and how to do without it.
    assert "pip install" in message
    assert "maturin" in message
    assert "FILTERJAX_BACKEND=python" in message


def test_invalid_backend_raises_value_error():
    code = """
        try:
            import filterjax
        except ValueError as err:
            print("ValueError:", err)
        else:
            print("imported with backend", filterjax.backend())
    """
    run = _run(code, backend="fortran")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("ValueError:"), run.stdout
    assert "'fortran'" in run.stdout and "native" in run.stdout and "python" in run.stdout


def test_backend_reports_the_core_in_use(backend):
    assert filterjax.backend() in ("native", "python")
    assert filterjax.backend() == backend


def test_set_backend_switches_and_rejects_unknown_names():
    from filterjax import _backend

    before = _backend.backend()
    try:
        _backend.set_backend("python")
        assert filterjax.backend() == "python"
        if _NATIVE_BUILT:
            _backend.set_backend("native")
            assert filterjax.backend() == "native"
        with pytest.raises(ValueError, match="'gpu'"):
            _backend.set_backend("gpu")
        assert filterjax.backend() in ("native", "python")
    finally:
        _backend.set_backend(before)


@pytest.mark.parametrize("name", ["py.typed", "_native.pyi"])
def test_typing_files_ship_with_the_package(name):
    path = _PACKAGE_DIR / name
    if name == "_native.pyi" and not _NATIVE_BUILT:
        pytest.skip("no native module here (the pure-Python wheel ships no stub for one)")
    assert path.is_file(), f"{name} missing from {_PACKAGE_DIR}"
    if name == "_native.pyi":
        stub = path.read_text()
        for function in ("flatten_split", "rebuild"):
            assert f"def {function}" in stub, f"_native.pyi does not describe {function}"


def test_native_module_is_the_abi3_extension():
    _require_native()
    origin = importlib.util.find_spec("filterjax._native").origin
    assert origin is not None and Path(origin).parent == _PACKAGE_DIR
    if os.environ.get("FILTERJAX_EXPECT_INSTALLED") == "1":
        assert Path(origin).name == "_native.abi3.so", origin


def test_suite_runs_against_the_installed_package():
    """`.ci/run` sets FILTERJAX_EXPECT_INSTALLED=1 when it tests the built wheel."""
    if os.environ.get("FILTERJAX_EXPECT_INSTALLED") != "1":
        pytest.skip("not testing an installed wheel (FILTERJAX_EXPECT_INSTALLED unset)")
    site_dirs = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    assert _PACKAGE_DIR.parent in site_dirs, f"testing {_PACKAGE_DIR}, not an installed copy"


# Heavy or optional packages `import filterjax` must not pull in: it adds little to
# `import jax` and never imports Equinox (except through the opt-in patch_equinox()).
_MUST_NOT_IMPORT = ("equinox", "scipy", "optax", "flax", "hypothesis", "pytest", "jaxtyping")


def test_import_is_light_and_lazy():
    code = """
        import json, sys
        import filterjax
        print(json.dumps({"modules": sorted(sys.modules), "lazy": sorted(set(
            "filterjax" + m for m in filterjax._LAZY.values()))}))
    """
    run = _run(code)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    modules = set(report["modules"])
    heavy = sorted(m for m in modules if m.split(".")[0] in _MUST_NOT_IMPORT)
    assert not heavy, f"`import filterjax` imported {heavy}"
    eager = sorted(modules & set(report["lazy"]))
    assert not eager, f"`import filterjax` imported the lazily loaded transforms {eager}"
