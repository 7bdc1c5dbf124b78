"""Run mypy on a file that must fail to type-check, exactly on its `# expect-error` lines.

    python check_errors.py usage_errors.py

Exit status 0 when mypy reports an error on every marked line and on no other line.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

MARK = "# expect-error"


def main(path: str) -> int:
    source = Path(path).read_text().splitlines()
    expected = {n for n, line in enumerate(source, 1) if line.rstrip().endswith(MARK)}
    config = Path(__file__).resolve().parent.parent / "pyproject.toml"
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(config), "--no-error-summary", path],
        capture_output=True,
        text=True,
    )
    print(run.stdout, end="")
    print(run.stderr, end="", file=sys.stderr)
    pattern = re.compile(rf"^{re.escape(path)}:(\d+): error:")
    reported = {int(m.group(1)) for m in map(pattern.match, run.stdout.splitlines()) if m}
    problems = []
    if run.returncode != 1:
        problems.append(f"mypy should exit 1 (type errors found), exited {run.returncode}")
    for n in sorted(expected - reported):
        problems.append(f"line {n} should be a type error but mypy accepts it: {source[n - 1]}")
    for n in sorted(reported - expected):
        problems.append(f"line {n} is an unexpected type error: {source[n - 1]}")
    for problem in problems:
        print("ERROR:", problem, file=sys.stderr)
    if not problems:
        print(f"{path}: mypy rejects exactly the {len(expected)} lines marked {MARK!r}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
