//! Error paths: hand the problem to filterjax's Python helpers so that both backends raise
//! the same exception with the same message. Nothing here runs on a successful call.

use pyo3::exceptions::{PyException, PyRecursionError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;

/// Why flattening stopped.
pub enum Stop {
    /// A Python exception (from `is_leaf`, a flatten function, a key sort, ...).
    Raised(PyErr),
    /// A node sits deeper than the recursion limit (or than what the Rust stack allows).
    TooDeep,
}

impl From<PyErr> for Stop {
    fn from(err: PyErr) -> Self {
        Stop::Raised(err)
    }
}

/// `repr(obj)` for an error message; an object whose `__repr__` raises is still reported.
fn shown(obj: &Bound<'_, PyAny>) -> String {
    obj.repr()
        .map(|r| r.to_string())
        .unwrap_or_else(|_| "<unprintable>".to_owned())
}

/// Message of jax's own error when a custom flatten function returns something else than a
/// `(children, aux_data)` pair.
pub fn malformed_flatten(result: &Bound<'_, PyAny>) -> PyErr {
    let shown = shown(result);
    PyValueError::new_err(format!(
        "The to_iterable function for a custom PyTree node should return a (children, \
         aux_data) tuple, got {shown}"
    ))
}

pub fn malformed_children(result: &Bound<'_, PyAny>) -> PyErr {
    let shown = shown(result);
    PyValueError::new_err(format!(
        "The to_iterable function for a custom PyTree node should return a (children, \
         aux_data) tuple where 'children' is iterable, got {shown}"
    ))
}

pub fn non_boolean_is_leaf(value: &Bound<'_, PyAny>) -> PyErr {
    let shown = shown(value);
    PyValueError::new_err(format!(
        "is_leaf predicate returned a non-boolean value {shown}; expected a boolean"
    ))
}

/// jax wraps an exception raised while comparing node metadata in this `ValueError`.
pub fn metadata_equality(py: Python<'_>, cause: PyErr) -> PyErr {
    let err = PyValueError::new_err(
        "Exception raised while checking equality of metadata fields of pytree. Make sure that \
         metadata fields are hashable and have simple equality semantics. (Note: arrays cannot \
         be passed as metadata fields!)",
    );
    err.set_cause(py, Some(cause));
    err
}

/// Turn a failed flatten into the canonical exception from
/// `filterjax._diagnose.raise_flatten_error`. Exceptions that are not `Exception`s
/// (KeyboardInterrupt, SystemExit, ...) pass through untouched, as in the Python twin.
pub fn flatten_failed(
    py: Python<'_>,
    tree: &Bound<'_, PyAny>,
    is_leaf: Option<&Bound<'_, PyAny>>,
    stop: Stop,
) -> PyErr {
    let original = match stop {
        Stop::Raised(err) => {
            if !err.is_instance_of::<PyException>(py) {
                return err;
            }
            err
        }
        Stop::TooDeep => PyRecursionError::new_err(
            "maximum recursion depth exceeded in flatten; PyTree may have cyclical node \
             references.",
        ),
    };
    let raised = py
        .import("filterjax._diagnose")
        .and_then(|m| m.getattr("raise_flatten_error"))
        .and_then(|f| f.call1((tree, is_leaf, original.into_value(py))));
    match raised {
        Err(err) => err,
        Ok(_) => PyRuntimeError::new_err("filterjax: raise_flatten_error returned normally"),
    }
}

/// The error for a static leaf whose `__hash__` raised: built by
/// `filterjax._errors.unhashable_static`, with the leaf's path.
pub fn unhashable_static(
    py: Python<'_>,
    tree: &Bound<'_, PyAny>,
    is_leaf: Option<&Bound<'_, PyAny>>,
    leaf_index: usize,
    leaf: &Bound<'_, PyAny>,
    cause: PyErr,
) -> PyErr {
    if !cause.is_instance_of::<PyException>(py) {
        return cause;
    }
    let built = py
        .import("filterjax._errors")
        .and_then(|m| m.getattr("unhashable_static"))
        .and_then(|f| f.call1((tree, leaf_index, leaf, cause.into_value(py), is_leaf)));
    match built {
        Ok(exc) => PyErr::from_value(exc),
        Err(err) => err,
    }
}

/// Say which static leaf's `__eq__` raised, keeping the user's exception as it is.
pub fn static_equality(py: Python<'_>, err: &PyErr, static_index: usize, leaf: &Bound<'_, PyAny>) {
    let kind = leaf
        .get_type()
        .fully_qualified_name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".to_owned());
    let note = format!(
        "{}{static_index}{}{kind}{}",
        STATIC_EQ_NOTE.0, STATIC_EQ_NOTE.1, STATIC_EQ_NOTE.2
    );
    // Notes are a courtesy: failing to add one must not replace the user's exception.
    let value = err.value(py);
    let _ = value.call_method1(pyo3::intern!(py, "add_note"), (note,));
    // Which static leaf it was, for callers that name it by its path
    // (`filterjax._errors.STATIC_INDEX_ATTR`).
    let _ = value.setattr(pyo3::intern!(py, "_filterjax_static_index"), static_index);
}

/// The note's wording, shared with `_pycore` (`filterjax._errors.static_equality_note`).
const STATIC_EQ_NOTE: (&str, &str, &str) = (
    "filterjax: raised while comparing static leaf #",
    " (of type ",
    ") of two calls' arguments; static leaves need an __eq__ that returns a bool for any \
     other value of their type",
);
