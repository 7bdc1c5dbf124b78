"""Make the pure-Python wheel (`py3-none-any`) from the built native wheel.

    python .ci/pure_wheel.py dist/filterjax-*-abi3-*.whl   # writes filterjax-*-py3-none-any.whl

The pure wheel is the same package without the native module: filterjax then runs on its
Python core (`filterjax.backend() == "python"`). pip prefers a platform wheel wherever one
matches the interpreter and takes this one everywhere else (free-threaded CPython, which the
abi3 wheel cannot serve; platforms without a native wheel), instead of falling back to the
sdist, which needs a Rust toolchain. Deriving it from the native wheel keeps the metadata
(version, dependencies, README) identical.
"""

from __future__ import annotations

import base64
import hashlib
import re
import sys
import zipfile
from pathlib import Path

# Files of the native wheel that the pure one leaves out: the extension module, its stub, and
# the software bill of materials of the Rust crate it was built from.
_NATIVE_ONLY = re.compile(r"^(filterjax/_native(\..*)?\.(so|pyd|pyi)|[^/]+\.dist-info/sboms/.*)$")


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _pure_wheel_metadata(text: str) -> str:
    replaced = ("Tag:", "Root-Is-Purelib:")
    lines = [line for line in text.splitlines() if not line.startswith(replaced)]
    lines += ["Root-Is-Purelib: true", "Tag: py3-none-any"]
    return "\n".join(lines) + "\n"


def make_pure_wheel(native: Path) -> Path:
    name, version = native.name.split("-")[:2]
    out = native.with_name(f"{name}-{version}-py3-none-any.whl")
    dist_info = f"{name}-{version}.dist-info"
    records = []
    with zipfile.ZipFile(native) as source, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as sink:
        for info in source.infolist():
            if info.is_dir() or _NATIVE_ONLY.match(info.filename):
                continue
            if info.filename == f"{dist_info}/RECORD":
                continue
            data = source.read(info)
            if info.filename == f"{dist_info}/WHEEL":
                data = _pure_wheel_metadata(data.decode()).encode()
            sink.writestr(info.filename, data)
            records.append(_record_line(info.filename, data))
        records.append(f"{dist_info}/RECORD,,")
        sink.writestr(f"{dist_info}/RECORD", "\n".join(records) + "\n")
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    out = make_pure_wheel(Path(argv[0]))
    with zipfile.ZipFile(out) as wheel:
        native = [n for n in wheel.namelist() if _NATIVE_ONLY.match(n)]
    if native:
        print(f"{out.name} still holds {native}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
