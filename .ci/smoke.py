"""Smoke test of an installed filterjax (a wheel or an sdist build), run by .ci/run and by
.github/workflows/wheels.yml on each platform's wheel.

    python .ci/smoke.py                # import, native backend, partition/combine, filter_jit
    python .ci/smoke.py --native-only  # only load the native module (no jax needed)

`--native-only` is for platforms where jaxlib has no wheel (musllinux): it loads
`filterjax._native` from the installed package without importing filterjax, which imports
jax.
"""

from __future__ import annotations

import importlib.util
import sys
import sysconfig
from pathlib import Path


def _site_dirs() -> set[Path]:
    return {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}


def _check_installed(package_dir: Path) -> None:
    assert package_dir.resolve().parent in _site_dirs(), (
        f"testing {package_dir}, not an installed copy in {_site_dirs()}"
    )


def native_only() -> None:
    spec = importlib.util.find_spec("filterjax")  # finds the package without importing it
    assert spec is not None and spec.submodule_search_locations, "filterjax is not installed"
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    _check_installed(package_dir)
    candidates = [
        p for p in package_dir.iterdir() if p.name.startswith("_native.") and p.suffix != ".pyi"
    ]
    assert len(candidates) == 1, f"expected one native module, found {candidates}"
    native_spec = importlib.util.spec_from_file_location("filterjax._native", candidates[0])
    assert native_spec is not None and native_spec.loader is not None, candidates[0]
    native = importlib.util.module_from_spec(native_spec)
    native_spec.loader.exec_module(native)
    assert native.BACKEND == "native", native.BACKEND
    for name in ("partition", "rebuild", "is_array", "StaticKey"):
        assert hasattr(native, name), f"the native module has no {name}"
    print("native module loads:", candidates[0])


def full() -> None:
    import jax.numpy as jnp

    import filterjax as fj

    _check_installed(Path(fj.__file__).parent)
    assert fj.backend() == "native", fj.backend()
    tree = {"w": jnp.ones(3), "act": "relu"}
    params, static = fj.partition(tree, fj.is_array)
    assert fj.combine(params, static)["act"] == "relu"

    @fj.filter_jit
    def f(x, act):
        return x * 2 if act == "relu" else x

    out = f(jnp.arange(3.0), "relu")
    assert out.tolist() == [0.0, 2.0, 4.0], out
    print("smoke test passed:", fj.__version__, fj.backend(), fj.__file__)


if __name__ == "__main__":
    if sys.argv[1:] == ["--native-only"]:
        native_only()
    elif sys.argv[1:]:
        sys.exit(f"usage: python {sys.argv[0]} [--native-only]")
    else:
        full()
