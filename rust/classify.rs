//! Process-wide Python objects the core needs, and the "is this leaf an array?" fast path.

use std::sync::atomic::AtomicUsize;

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyComplex, PyDict, PyFloat, PyInt, PyString, PyTuple, PyType};
use pyo3::{ffi, PyTypeInfo};

/// Python objects looked up once, on first use.
pub struct Globals {
    /// `jaxlib`'s concrete array type: the commonest dynamic leaf, checked first.
    pub array_impl: Py<PyType>,
    pub ndarray: Py<PyType>,
    pub ordered_dict: Py<PyType>,
    pub default_dict: Py<PyType>,
    /// `jax._src.tree_util._registry` (type -> `(to_iter, from_iter)`). Registrations made
    /// later land in this same dict, so it is read on every lookup, never copied.
    pub registry: Py<PyDict>,
    /// `(jax.Array, numpy.ndarray, numpy.generic)`, the `isinstance` test for unknown types.
    pub array_bases: Py<PyTuple>,
    /// type -> bool answers of that `isinstance` test. Holding the types as keys keeps them
    /// alive, so a type's address is never reused for another type while it is cached.
    pub array_types: Py<PyDict>,
    /// What `visit_other` (flatten.rs) found a type to be: `DataclassFields` for a
    /// `register_dataclass` type read natively, True for another registered type, False for
    /// one not in the registry. Emptied whenever the registry's size changes (a new
    /// registration) or it holds `NODE_KINDS_MAX` types.
    pub node_kinds: Py<PyDict>,
    /// The registry's size when `node_kinds` was last checked.
    pub node_kinds_registry_len: AtomicUsize,
    /// `PyTreeDef.from_node_data_and_children` and the default registry, for `__repr__`.
    pub treedef_from_node: Py<PyAny>,
    pub default_registry: Py<PyAny>,
}

static GLOBALS: PyOnceLock<Globals> = PyOnceLock::new();

pub fn globals(py: Python<'_>) -> PyResult<&'static Globals> {
    GLOBALS.get_or_try_init(py, || load_globals(py))
}

fn attr_of(py: Python<'_>, module: &str, name: &str) -> PyResult<Py<PyAny>> {
    Ok(py.import(module)?.getattr(name)?.unbind())
}

fn type_of(py: Python<'_>, module: &str, name: &str) -> PyResult<Py<PyType>> {
    Ok(py
        .import(module)?
        .getattr(name)?
        .cast_into::<PyType>()?
        .unbind())
}

fn load_globals(py: Python<'_>) -> PyResult<Globals> {
    let jax_array = attr_of(py, "jax", "Array")?;
    let ndarray = type_of(py, "numpy", "ndarray")?;
    let generic = attr_of(py, "numpy", "generic")?;
    let array_bases = PyTuple::new(py, [jax_array, ndarray.clone_ref(py).into_any(), generic])?;
    let registry = attr_of(py, "jax._src.tree_util", "_registry")?
        .into_bound(py)
        .cast_into::<PyDict>()?
        .unbind();
    let treedef = py.import("jax.tree_util")?.getattr("PyTreeDef")?;
    Ok(Globals {
        array_impl: type_of(py, "jax._src.array", "ArrayImpl")?,
        ndarray,
        ordered_dict: type_of(py, "collections", "OrderedDict")?,
        default_dict: type_of(py, "collections", "defaultdict")?,
        registry,
        array_bases: array_bases.unbind(),
        array_types: PyDict::new(py).unbind(),
        node_kinds: PyDict::new(py).unbind(),
        node_kinds_registry_len: AtomicUsize::new(0),
        // jaxlib renamed `make_from_node_data_and_children` in 0.8; take whichever it has.
        treedef_from_node: match treedef.getattr("from_node_data_and_children") {
            Ok(make) => make.unbind(),
            Err(_) => treedef
                .getattr("make_from_node_data_and_children")?
                .unbind(),
        },
        default_registry: attr_of(py, "jax._src.tree_util", "default_registry")?,
    })
}

/// Builtin scalar types: never arrays and never PyTree nodes.
#[inline]
pub fn is_builtin_scalar(py: Python<'_>, ty: *mut ffi::PyTypeObject) -> bool {
    ty == PyString::type_object_raw(py)
        || ty == PyInt::type_object_raw(py)
        || ty == PyFloat::type_object_raw(py)
        || ty == pyo3::types::PyBool::type_object_raw(py)
        || ty == PyComplex::type_object_raw(py)
}

/// Whether a leaf of exact type `ty` is an array, when that is known from the type alone:
/// true for jaxlib's and NumPy's array types, false for builtin scalars, None otherwise.
#[inline]
pub fn known_is_array(g: &Globals, py: Python<'_>, ty: *mut ffi::PyTypeObject) -> Option<bool> {
    if ty == g.array_impl.as_ptr().cast() || ty == g.ndarray.as_ptr().cast() {
        Some(true)
    } else if is_builtin_scalar(py, ty) {
        Some(false)
    } else {
        None
    }
}

/// True for JAX arrays (tracers included), NumPy arrays and NumPy scalars.
///
/// Answers the same as `isinstance(x, (jax.Array, np.ndarray, np.generic))`, and like the
/// Python twin remembers the answer per exact type.
#[inline]
pub fn is_array(g: &Globals, x: &Bound<'_, PyAny>) -> PyResult<bool> {
    if let Some(known) = known_is_array(g, x.py(), x.get_type_ptr()) {
        return Ok(known);
    }
    if x.is_none() {
        return Ok(false);
    }
    is_array_slow(g, x)
}

// Not cold: tracers take this path on every call while tracing.
#[inline(never)]
fn is_array_slow(g: &Globals, x: &Bound<'_, PyAny>) -> PyResult<bool> {
    let py = x.py();
    let cache = g.array_types.bind(py);
    let kind = x.get_type();
    if let Some(known) = cache.get_item(&kind)? {
        return known.is_truthy();
    }
    let answer = x.is_instance(g.array_bases.bind(py))?;
    cache.set_item(kind, answer)?;
    Ok(answer)
}
