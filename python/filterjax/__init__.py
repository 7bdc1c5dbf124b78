"""filterjax: filtered JAX transformations at the per-call cost of hand-written `jax.jit`.

Every JAX/NumPy array leaf of a PyTree is traced; everything else is held static. The
transforms are imported on first use, so `import filterjax` costs almost nothing on top
of `import jax`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._backend import backend
from ._caches import clear_caches
from ._errors import PyTreeCycleError, UnhashableStaticError
from ._exports import LAZY_EXPORTS
from ._filters import (
    apply_updates,
    combine,
    filter,
    if_array,
    is_array,
    is_array_like,
    is_inexact_array,
    is_inexact_array_like,
    partition,
)

__version__ = "0.1.0"

# public name -> the private module that defines it (imported on first access)
_LAZY = LAZY_EXPORTS

__all__ = [
    "__version__",
    "backend",
    "clear_caches",
    "PyTreeCycleError",
    "UnhashableStaticError",
    "apply_updates",
    "combine",
    "filter",
    "if_array",
    "is_array",
    "is_array_like",
    "is_inexact_array",
    "is_inexact_array_like",
    "partition",
    "filter_jit",
    "filter_grad",
    "filter_value_and_grad",
    "filter_jvp",
    "filter_vjp",
    "filter_jacfwd",
    "filter_jacrev",
    "filter_hessian",
    "filter_custom_jvp",
    "filter_custom_vjp",
    "filter_checkpoint",
    "filter_closure_convert",
    "filter_vmap",
    "filter_pmap",
    "filter_make_jaxpr",
    "filter_eval_shape",
    "filter_shard",
    "filter_pure_callback",
    "patch_equinox",
    "unpatch_equinox",
    "explain_recompiles",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'filterjax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:
    from ._ad import (
        filter_checkpoint,
        filter_custom_jvp,
        filter_custom_vjp,
        filter_grad,
        filter_hessian,
        filter_jacfwd,
        filter_jacrev,
        filter_jvp,
        filter_value_and_grad,
        filter_vjp,
    )
    from ._callback import filter_pure_callback
    from ._closure_convert import filter_closure_convert
    from ._equinox_patch import patch_equinox, unpatch_equinox
    from ._eval_shape import filter_eval_shape
    from ._explain import explain_recompiles
    from ._jit import filter_jit
    from ._make_jaxpr import filter_make_jaxpr
    from ._sharding import filter_shard
    from ._vmap_pmap import filter_pmap, filter_vmap
