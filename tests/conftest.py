"""Every test runs once per available backend ("native", "python").

`FILTERJAX_REQUIRE_NATIVE=1` (set by .ci/run) turns a missing native module into an error
instead of silently testing only the Python twin. Tests marked `single_backend` do not
depend on the backend and run once.
"""

from __future__ import annotations

import os

import jax
import pytest

import filterjax._backend as _backend

# Eight fake CPU devices for the pmap/sharding tests. `jax_num_cpu_devices` is new in jax
# 0.4.38's successors; older releases read the XLA flag instead, which must be set before
# the CPU backend starts (nothing has run on it yet at this point).
try:
    jax.config.update("jax_num_cpu_devices", 8)
except AttributeError:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()


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
