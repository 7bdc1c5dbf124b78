//! `filterjax._native`: the per-call PyTree work of filterjax, in Rust.
//!
//! A drop-in twin of `python/filterjax/_pycore.py`: same functions, same results, same
//! errors. `flatten_split` flattens a PyTree with `jax.tree_util` semantics and splits the
//! leaves into dynamic and static in one pass; `rebuild` is its inverse; `StaticKey` is
//! the hashable description of everything but the dynamic leaves.
//!
//! Unit tests (`cargo test`) link against libpython and run Python inside the test binary,
//! so they need the interpreter that has jax installed, its shared library and the source
//! tree on `PYTHONPATH`. `.ci/cargo-test` sets all that up from the active virtual
//! environment and passes its arguments on to `cargo test`:
//!
//! ```text
//! . .venv/bin/activate && bash .ci/cargo-test
//! ```

use pyo3::prelude::*;

mod classify;
mod dataclass;
mod dispatch;
mod errors;
mod filters;
mod flatten;
mod key;
mod rebuild;
mod shallow;

#[cfg(test)]
mod tests;

pub use key::StaticKey;

/// A flag argument tested for truth, like the Python twin's `if hashed:`.
struct Truthy(bool);

impl<'a, 'py> FromPyObject<'a, 'py> for Truthy {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        Ok(Truthy(obj.is_truthy()?))
    }
}

/// True for JAX arrays (tracers included), NumPy arrays and NumPy scalars.
#[pyfunction]
fn is_array(py: Python<'_>, x: &Bound<'_, PyAny>) -> PyResult<bool> {
    let globals = classify::globals(py)?;
    classify::is_array(globals, x)
}

/// Flatten `tree` and split its leaves into dynamic and static.
#[pyfunction]
#[pyo3(
    signature = (tree, predicate=None, is_leaf=None, hashed=Truthy(true)),
    text_signature = "(tree, predicate=None, is_leaf=None, hashed=True)"
)]
fn flatten_split<'py>(
    py: Python<'py>,
    tree: &Bound<'py, PyAny>,
    predicate: Option<&Bound<'py, PyAny>>,
    is_leaf: Option<&Bound<'py, PyAny>>,
    hashed: Truthy,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, StaticKey>)> {
    let predicate = predicate.filter(|p| !p.is_none());
    let is_leaf = is_leaf.filter(|f| !f.is_none());
    flatten::flatten_split(py, tree, predicate, is_leaf, hashed.0)
}

/// Inverse of `flatten_split`: the tree with `dynamic` at the dynamic positions.
#[pyfunction(name = "rebuild")]
#[pyo3(signature = (key, dynamic, statics=None))]
fn rebuild_tree<'py>(
    py: Python<'py>,
    key: &Bound<'py, PyAny>,
    dynamic: &Bound<'py, PyAny>,
    statics: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    rebuild::rebuild(py, key, dynamic, statics.filter(|s| !s.is_none()))
}

#[pymodule(gil_used = true)]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("BACKEND", "native")?;
    m.add_class::<StaticKey>()?;
    m.add_class::<dispatch::Dispatcher>()?;
    m.add_function(wrap_pyfunction!(is_array, m)?)?;
    m.add_function(wrap_pyfunction!(flatten_split, m)?)?;
    m.add_function(wrap_pyfunction!(rebuild_tree, m)?)?;
    m.add_function(wrap_pyfunction!(dispatch::dispatcher_subclass, m)?)?;
    filters::register(m)?;
    Ok(())
}
