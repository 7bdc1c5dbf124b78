"""The transforms `filterjax` exports lazily: public name -> the private module that defines
it (imported on first access). Its own module so that `_equinox_patch` can read it without
importing the package's `__init__`."""

LAZY_EXPORTS = {
    "filter_jit": "._jit",
    "filter_grad": "._ad",
    "filter_value_and_grad": "._ad",
    "filter_jvp": "._ad",
    "filter_vjp": "._ad",
    "filter_jacfwd": "._ad",
    "filter_jacrev": "._ad",
    "filter_hessian": "._ad",
    "filter_custom_jvp": "._ad",
    "filter_custom_vjp": "._ad",
    "filter_checkpoint": "._ad",
    "filter_closure_convert": "._closure_convert",
    "filter_vmap": "._vmap_pmap",
    "filter_pmap": "._vmap_pmap",
    "filter_make_jaxpr": "._make_jaxpr",
    "filter_eval_shape": "._eval_shape",
    "filter_shard": "._sharding",
    "filter_pure_callback": "._callback",
    "patch_equinox": "._equinox_patch",
    "unpatch_equinox": "._equinox_patch",
    "explain_recompiles": "._explain",
}
