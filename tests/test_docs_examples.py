"""Every ```python block of README.md and docs/ runs, so no example can rot.

The blocks of one file run in order in one namespace (later blocks may use what earlier
ones defined), as a reader would paste them. A block written with `>>>` prompts runs as a
doctest. A block followed directly by a ```text block must print (or log, on the
"filterjax" logger, formatted as `logging.basicConfig` does) exactly that text.

A block that cannot run here (it needs a cluster, say) starts with the visible line
`# not run: <why>`; it is still compiled, so its syntax cannot rot. Keep those rare.
"""

from __future__ import annotations

import contextlib
import doctest
import io
import logging
import re
from pathlib import Path

import pytest

import filterjax as fj

ROOT = Path(__file__).resolve().parent.parent
NOT_RUN = "# not run:"
# Optional packages a page may be about (docs/nnx.md): its blocks run where it is installed
# (the newest-Python stage of .ci/run) and the page is skipped elsewhere.
_OPTIONAL_PACKAGES = ("flax",)
_FENCE = re.compile(r"^```(\w*)\s*$")


def _documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _blocks(path: Path) -> list[tuple[int, str, str, str | None]]:
    """(line number, language, code, the ```text block right after it or None)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    fenced: list[tuple[int, int, str, str]] = []  # (start, end line index, language, body)
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        end = index + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        fenced.append((index, end, opening.group(1), "\n".join(lines[index + 1 : end])))
        index = end + 1
    found = []
    for position, (start, end, language, body) in enumerate(fenced):
        if language != "python":
            continue
        expected = None
        if position + 1 < len(fenced):
            next_start, _, next_language, next_body = fenced[position + 1]
            between = lines[end + 1 : next_start]
            if next_language == "text" and not any(line.strip() for line in between):
                expected = next_body
        found.append((start + 1, language, body, expected))
    return found


def _normalise(text: str) -> list[str]:
    # Where a lambda was defined depends on the file it is run from.
    text = re.sub(r"defined at \S+:\d+", "defined at <file>", text)
    return [line.rstrip() for line in text.strip().splitlines()]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter(logging.BASIC_FORMAT))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def _run_doctest(code: str, namespace: dict, where: str) -> None:
    parser = doctest.DocTestParser()
    test = parser.get_doctest(code, namespace, where, where, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    output = io.StringIO()
    runner.run(test, out=output.write, clear_globs=False)
    assert runner.failures == 0, f"{where}:\n{output.getvalue()}"


def _run(code: str, namespace: dict, where: str) -> str:
    """Run one block; what it printed and logged on the "filterjax" logger."""
    logger = logging.getLogger("filterjax")
    records = _Records()
    logger.addHandler(records)
    previous_level = logger.level
    logger.setLevel(logging.WARNING)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            exec(compile(code, where, "exec"), namespace)
    finally:
        logger.removeHandler(records)
        logger.setLevel(previous_level)
    return printed.getvalue() + "\n".join(records.lines)


def _document_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.single_backend
@pytest.mark.parametrize("path", _documents(), ids=_document_id)
def test_python_blocks_run(path):
    blocks = _blocks(path)
    for module in _OPTIONAL_PACKAGES:
        pattern = rf"^\s*(from|import)\s+{module}\b"
        if any(re.search(pattern, code, re.MULTILINE) for _, _, code, _ in blocks):
            pytest.importorskip(module, reason=f"{_document_id(path)} needs {module}")
    namespace: dict = {"__name__": "__main__"}
    try:
        for line, _, code, expected in blocks:
            where = f"{_document_id(path)}:{line}"
            if code.lstrip().startswith(NOT_RUN):
                compile(code, where, "exec")
                continue
            if code.lstrip().startswith(">>>"):
                _run_doctest(code, namespace, where)
                continue
            output = _run(code, namespace, where)
            if expected is not None:
                assert _normalise(output) == _normalise(expected), f"output of {where}"
    finally:
        fj.explain_recompiles(False)
        fj.unpatch_equinox()
        fj.clear_caches()


@pytest.mark.single_backend
def test_the_documents_have_blocks_and_few_are_not_run():
    blocks = [block for path in _documents() for block in _blocks(path)]
    assert len(blocks) >= 10
    not_run = [code for _, _, code, _ in blocks if code.lstrip().startswith(NOT_RUN)]
    assert len(not_run) <= 2, not_run
