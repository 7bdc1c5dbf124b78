//! Nodes registered with `jax.tree_util.register_dataclass`, read and rebuilt natively.
//!
//! jaxlib flattens such a node itself: its children are the data fields read with `getattr`,
//! its node data the tuple of its meta fields, and it is rebuilt by calling the type with
//! every field as a keyword argument. The Python registry (`jax._src.tree_util._registry`)
//! only holds the two closures `register_dataclass` made, so the field names are read from
//! those closures, once per type. Every jax from 0.4.38 to 0.12 makes them the same way (in
//! `register_dataclass`, or `_register_dataclass` in newer releases); if
//! a jax makes them differently, or the type was registered some other way, the node keeps
//! the generic path that calls the registered functions.

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString, PyTuple, PyType};

/// The fields of a dataclass node type, in jax's order.
#[pyclass(frozen, module = "filterjax._native", name = "_DataclassFields")]
pub struct DataclassFields {
    /// Names of the fields that are children, in order.
    data: Vec<Py<PyString>>,
    /// Names of the fields that make up the node data (a tuple, in this order).
    meta: Vec<Py<PyString>>,
}

impl DataclassFields {
    #[inline]
    pub fn num_data(&self) -> usize {
        self.data.len()
    }

    /// The `index`-th child of `obj`.
    #[inline]
    pub fn child<'py>(&self, obj: &Bound<'py, PyAny>, index: usize) -> PyResult<Bound<'py, PyAny>> {
        obj.getattr(self.data[index].bind(obj.py()))
    }

    /// The node data of `obj`: its meta fields, as a tuple.
    #[inline]
    pub fn meta<'py>(&self, obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyTuple>> {
        let py = obj.py();
        let len = self.meta.len();
        if len == 0 {
            return Ok(PyTuple::empty(py));
        }
        // Filled in place, without an intermediate vector: this runs for every node.
        // SAFETY: `PyTuple_New` returns a new reference to a tuple of `len` empty slots, or
        // NULL with an exception set (turned into an error here). Each slot is set once,
        // with a new reference, before the tuple is used; if a `getattr` fails, the partly
        // filled tuple is dropped, and a tuple's deallocation skips empty slots.
        let tuple = unsafe {
            Bound::from_owned_ptr_or_err(py, ffi::PyTuple_New(len as ffi::Py_ssize_t))?
                .cast_into_unchecked::<PyTuple>()
        };
        for (index, name) in self.meta.iter().enumerate() {
            let value = obj.getattr(name.bind(py))?;
            // SAFETY: `index < len`, the slot is empty, and `PyTuple_SetItem` steals the
            // new reference that `into_ptr` hands over.
            unsafe {
                ffi::PyTuple_SetItem(tuple.as_ptr(), index as ffi::Py_ssize_t, value.into_ptr());
            }
        }
        Ok(tuple)
    }

    /// `kind(**{meta fields: meta, data fields: children})`, as jaxlib rebuilds the node.
    pub fn build<'py>(
        &self,
        kind: &Bound<'py, PyAny>,
        meta: &Bound<'py, PyAny>,
        children: impl Iterator<Item = Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = kind.py();
        let kwargs = PyDict::new(py);
        if !self.meta.is_empty() {
            let meta = meta.cast::<PyTuple>()?;
            for (name, value) in self.meta.iter().zip(meta.iter()) {
                kwargs.set_item(name.bind(py), value)?;
            }
        }
        for (name, value) in self.data.iter().zip(children) {
            kwargs.set_item(name.bind(py), value)?;
        }
        kind.call((), Some(&kwargs))
    }
}

/// The fields of `kind` if its registry entry is `register_dataclass`'s and they can be
/// read from it, else None. Anything unexpected means "not readable": the generic path
/// that calls the registered functions stays correct.
pub fn read<'py>(
    kind: &Bound<'py, PyType>,
    entry: &Bound<'py, PyAny>,
) -> PyResult<Option<Bound<'py, DataclassFields>>> {
    match read_fields(kind, entry).ok().flatten() {
        Some(fields) => Ok(Some(Bound::new(kind.py(), fields)?)),
        None => Ok(None),
    }
}

/// The value of the free variable `name` of the closure `function`.
fn closure_value<'py>(
    function: &Bound<'py, PyAny>,
    name: &str,
) -> PyResult<Option<Bound<'py, PyAny>>> {
    let py = function.py();
    let code = function.getattr(pyo3::intern!(py, "__code__"))?;
    let names = code.getattr(pyo3::intern!(py, "co_freevars"))?;
    let names = names.cast::<PyTuple>()?;
    let cells = function.getattr(pyo3::intern!(py, "__closure__"))?;
    if cells.is_none() {
        return Ok(None);
    }
    let cells = cells.cast::<PyTuple>()?;
    for (index, candidate) in names.iter().enumerate() {
        if candidate.cast::<PyString>()?.to_cow()? == name {
            let cell = cells.get_item(index)?;
            return Ok(Some(cell.getattr(pyo3::intern!(py, "cell_contents"))?));
        }
    }
    Ok(None)
}

/// Whether `function` is the local function `name` of jax's `register_dataclass` (or of
/// the private `_register_dataclass` it delegates to in newer jax).
fn is_function_named(function: &Bound<'_, PyAny>, name: &str) -> PyResult<bool> {
    let py = function.py();
    let module = function.getattr(pyo3::intern!(py, "__module__"))?;
    let qualname = function.getattr(pyo3::intern!(py, "__qualname__"))?;
    let qualname = qualname.cast::<PyString>()?.to_cow()?;
    let made_by = qualname
        .strip_suffix(name)
        .and_then(|q| q.strip_suffix(".<locals>."));
    Ok(module.cast::<PyString>()?.to_cow()? == "jax._src.tree_util"
        && matches!(made_by, Some("register_dataclass" | "_register_dataclass")))
}

/// Field names, interned, from a tuple of strings.
fn names(value: Option<Bound<'_, PyAny>>) -> PyResult<Option<Vec<Py<PyString>>>> {
    let Some(value) = value else {
        return Ok(None);
    };
    let Ok(tuple) = value.cast::<PyTuple>() else {
        return Ok(None);
    };
    let mut out = Vec::with_capacity(tuple.len());
    for item in tuple.iter() {
        let Ok(name) = item.cast::<PyString>() else {
            return Ok(None);
        };
        out.push(PyString::intern(item.py(), &name.to_cow()?).unbind());
    }
    Ok(Some(out))
}

fn read_fields(
    kind: &Bound<'_, PyType>,
    entry: &Bound<'_, PyAny>,
) -> PyResult<Option<DataclassFields>> {
    let (to_iter, from_iter) = crate::flatten::registry_functions(entry)?;
    if !is_function_named(&to_iter, "flatten_func")?
        || !is_function_named(&from_iter, "unflatten_func")?
    {
        return Ok(None);
    }
    match closure_value(&from_iter, "nodetype")? {
        Some(nodetype) if nodetype.is(kind) => {}
        _ => return Ok(None),
    }
    let data = names(closure_value(&to_iter, "data_fields")?)?;
    let meta = names(closure_value(&to_iter, "meta_fields")?)?;
    // The unflatten function must close over the same names.
    let data_again = names(closure_value(&from_iter, "data_fields")?)?;
    let meta_again = names(closure_value(&from_iter, "meta_fields")?)?;
    let (Some(data), Some(meta), Some(data_again), Some(meta_again)) =
        (data, meta, data_again, meta_again)
    else {
        return Ok(None);
    };
    // Interned: equal names are the same object.
    let same = |a: &[Py<PyString>], b: &[Py<PyString>]| {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.is(y))
    };
    if !same(&data, &data_again) || !same(&meta, &meta_again) {
        return Ok(None);
    }
    Ok(Some(DataclassFields { data, meta }))
}
