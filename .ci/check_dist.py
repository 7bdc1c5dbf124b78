"""Check what the built wheel and sdist contain (run by .ci/run).

    python .ci/check_dist.py dist/filterjax-*.whl dist/filterjax-*.tar.gz

The wheel must hold exactly: the native module `filterjax/_native.abi3.so`, the Python
package's modules, `py.typed`, the `_native.pyi` stub and the `.dist-info` metadata; nothing
else of the repository (no tests/, benches/, rust/, docs/, typing/). The sdist must hold what
building from source needs: pyproject.toml, Cargo.toml, Cargo.lock, the Rust crate and the
Python package.
"""

from __future__ import annotations

import re
import sys
import tarfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "python" / "filterjax"


def check_wheel(path: Path) -> list[str]:
    problems = []
    if not re.search(r"-cp3\d+-abi3-", path.name):
        problems.append(f"wheel is not an abi3 wheel: {path.name}")
    names = zipfile.ZipFile(path).namelist()
    files = [n for n in names if not n.endswith("/")]
    metadata = [n for n in files if n.split("/")[0].endswith(".dist-info")]
    package = [n for n in files if n not in metadata]

    expected_py = {f"filterjax/{p.name}" for p in PACKAGE.glob("*.py")}
    required = expected_py | {
        "filterjax/_native.abi3.so",
        "filterjax/py.typed",
        "filterjax/_native.pyi",
    }
    for name in sorted(required - set(package)):
        problems.append(f"wheel is missing {name}")
    for name in sorted(set(package) - required):
        problems.append(f"wheel has an unexpected file {name}")
    if len(package) != len(set(package)):
        problems.append("wheel lists a file twice")
    print(f"wheel {path.name}: {len(package)} package files, {len(metadata)} metadata files")
    for name in sorted(package):
        print("   ", name)
    return problems


def check_sdist(path: Path) -> list[str]:
    problems = []
    with tarfile.open(path) as tar:
        names = tar.getnames()
    top = names[0].split("/")[0]
    relative = {n[len(top) + 1 :] for n in names if "/" in n}
    required = {
        "pyproject.toml",
        "Cargo.toml",
        "Cargo.lock",
        "PKG-INFO",
        "rust/lib.rs",
        "python/filterjax/__init__.py",
        "python/filterjax/py.typed",
        "python/filterjax/_native.pyi",
    }
    for name in sorted(required - relative):
        problems.append(f"sdist is missing {name}")
    print(f"sdist {path.name}: {len(relative)} entries")
    return problems


def main(argv: list[str]) -> int:
    problems = []
    for arg in argv:
        path = Path(arg)
        if path.suffix == ".whl":
            problems += check_wheel(path)
        elif path.name.endswith(".tar.gz"):
            problems += check_sdist(path)
        else:
            problems.append(f"don't know how to check {path}")
    for problem in problems:
        print("ERROR:", problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
