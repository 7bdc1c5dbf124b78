"""Every test runs once per available backend ("native", "python").

`FILTERJAX_REQUIRE_NATIVE=1` (set by .ci/run) turns a missing native module into an error
instead of silently testing only the Python twin. Tests marked `single_backend` do not
depend on the backend and run once.
"""

from __future__ import annotations

import os

import pytest
from jax_features import set_cpu_device_count

import filterjax._backend as _backend

# Eight fake CPU devices for the pmap and sharding tests.
set_cpu_device_count(8)


def _available_backends() -> list[str]:
    try:
        import filterjax._native  # noqa: F401
    except ImportError:
        if os.environ.get("FILTERJAX_REQUIRE_NATIVE") == "1":
            raise
        return ["python"]
    return ["native", "python"]


BACKENDS = _available_backends()


@pytest.fixture(autouse=True, params=BACKENDS)
def backend(request):
    """The core implementation this test runs against (switched for its duration)."""
    if request.node.get_closest_marker("single_backend") and request.param != BACKENDS[0]:
        pytest.skip("backend-independent test: run once")
    previous = _backend.backend()
    _backend.set_backend(request.param)
    yield request.param
    _backend.set_backend(previous)


def pytest_configure(config):
    # jax removes deprecated names release by release (`jax.core.*`, `jax.interpreters.*`):
    # a DeprecationWarning attributed to one of filterjax's own modules fails the test that
    # triggered it, so the suite on the newest jax sees a removal coming.
    config.addinivalue_line("filterwarnings", "error::DeprecationWarning:filterjax")
