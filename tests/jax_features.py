"""What the running jax offers, for the tests of features newer than filterjax's jax floor."""

from __future__ import annotations

import contextlib
import os

import jax
import pytest

JAX_VERSION = tuple(
    int("".join(c for c in part if c.isdigit()) or 0) for part in jax.__version__.split(".")[:3]
)

# Mesh axis types (explicit sharding) and `jax.set_mesh` are newer than jax 0.4.38: before
# them every mesh axis behaves as what later releases call "auto".
HAS_AXIS_TYPES = hasattr(jax.sharding, "AxisType")

needs_axis_types = pytest.mark.skipif(
    not HAS_AXIS_TYPES, reason=f"explicit mesh axes are newer than jax {jax.__version__}"
)


def make_mesh(shape: tuple[int, ...], names: tuple[str, ...], kind: str = "auto"):
    """`jax.make_mesh` with every axis of `kind` ("auto" or "explicit")."""
    if not HAS_AXIS_TYPES:
        assert kind == "auto", "explicit axes need a newer jax (mark the test needs_axis_types)"
        return jax.make_mesh(shape, names)
    axis_type = jax.sharding.AxisType.Explicit if kind == "explicit" else jax.sharding.AxisType.Auto
    return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(shape))


def mesh_context(mesh):
    """`jax.set_mesh(mesh)` where jax has it; older releases need no mesh for auto axes."""
    set_mesh = getattr(jax, "set_mesh", None) or getattr(jax.sharding, "use_mesh", None)
    return set_mesh(mesh) if set_mesh is not None else contextlib.nullcontext()


def set_cpu_device_count(count: int) -> None:
    """Fake `count` CPU devices; call before the CPU backend starts.

    `jax_num_cpu_devices` is newer than jax 0.4.38: older releases read XLA's flag instead.
    """
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except AttributeError:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}"


# Before jax 0.6, a host callback that raises inside a pmap'd program (a failed
# `eqx.error_if`) leaves the devices broken for the rest of the process: every later pmap
# call fails or returns garbage, with plain `jax.pmap` and Equinox alike. Tests that make a
# pmap'd program fail run only where jax recovers.
PMAP_RECOVERS_FROM_CALLBACK_ERRORS = JAX_VERSION >= (0, 6)

needs_pmap_error_recovery = pytest.mark.skipif(
    not PMAP_RECOVERS_FROM_CALLBACK_ERRORS,
    reason=f"jax {jax.__version__} breaks later pmap calls after a failed callback in a pmap",
)
