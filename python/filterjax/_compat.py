"""The few places where jax's API differs across the versions filterjax supports.

filterjax supports every jax from 0.4.38 (Equinox's floor) to the newest release. Each name
here takes the public API where the running jax has it and falls back to the older
spelling otherwise, so the rest of the package never tests versions itself.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.core

__all__ = ["JAX_VERSION", "typeof", "explicit_axis_type", "requires_jax"]


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


JAX_VERSION: tuple[int, ...] = _version_tuple(jax.__version__)

# `jax.typeof` (public from jax 0.5/0.6 on); older releases spell it `jax.core.get_aval`.
typeof: Any = getattr(jax, "typeof", None) or getattr(jax.core, "get_aval")  # noqa: B009

# `jax.sharding.AxisType.Explicit` exists from jax 0.5 on; before it, every mesh axis is
# what later releases call "auto", so nothing can be explicit.
_axis_type = getattr(jax.sharding, "AxisType", None)
explicit_axis_type: Any = None if _axis_type is None else _axis_type.Explicit


def requires_jax(version: str, feature: str) -> None:
    """Raise a clear error if the running jax is older than `version` (for `feature`)."""
    if JAX_VERSION < _version_tuple(version):
        raise RuntimeError(
            f"{feature} needs jax >= {version}; this is jax {jax.__version__}. "
            f"Upgrade with `pip install -U 'jax>={version}'`."
        )
