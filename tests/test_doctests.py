"""The examples in filterjax's docstrings run, and every public name is documented.

Every module of the package (the package itself and its private modules) gets one test that
runs all the `>>>` examples found in its docstrings with `doctest`, under each backend. Each
public name in `filterjax.__all__` gets one test that checks it has a docstring and, if it
is a function or a decorator class, an example.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import io
import pkgutil

import pytest

import filterjax

# Modules whose docstrings are not collected: the native extension (its docstrings are
# described by `_native.pyi`) and `python -m filterjax`'s entry point (importing it runs it).
_SKIPPED_MODULES = {"filterjax._native", "filterjax.__main__"}
_OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _package_modules() -> list[str]:
    names = ["filterjax"]
    for info in pkgutil.iter_modules(filterjax.__path__, prefix="filterjax."):
        if info.name not in _SKIPPED_MODULES:
            names.append(info.name)
    return sorted(names)


def _public_names() -> list[str]:
    return sorted(name for name in filterjax.__all__ if name != "__version__")


@pytest.mark.parametrize("module_name", _package_modules())
def test_docstring_examples_run(module_name):
    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    tests = [t for t in finder.find(module, module_name) if t.examples]
    output = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=_OPTIONFLAGS, verbose=False)
    for test in sorted(tests, key=lambda t: t.name):
        runner.run(test, out=output.write)
    assert runner.failures == 0, f"doctest failures in {module_name}:\n{output.getvalue()}"
    if module_name == "filterjax._filters":
        assert runner.tries > 0, "the filtering helpers' examples were not found"


def _needs_example(obj) -> bool:
    if inspect.isclass(obj):
        # Exceptions are documented by what they mean; decorator classes
        # (e.g. filter_custom_jvp) are used like functions and need an example.
        return not issubclass(obj, BaseException)
    return callable(obj)


@pytest.mark.single_backend
@pytest.mark.parametrize("name", _public_names())
def test_public_name_has_docstring_and_example(name):
    obj = getattr(filterjax, name)
    # `__doc__`, not `inspect.getdoc`: the latter falls back to a base class's docstring.
    doc = inspect.cleandoc(obj.__doc__ or "")
    assert doc.strip(), f"filterjax.{name} has no docstring of its own"
    if _needs_example(obj):
        examples = doctest.DocTestParser().get_examples(doc)
        assert examples, f"filterjax.{name}'s docstring has no `>>>` example"


@pytest.mark.single_backend
def test_every_module_is_collected():
    modules = _package_modules()
    assert "filterjax" in modules and "filterjax._filters" in modules
    assert not set(modules) & _SKIPPED_MODULES
