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
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyString, PyTuple, PyType};

/// The fields of a dataclass node type, in jax's order.
#[pyclass(frozen, module = "filterjax._native", name = "_DataclassFields")]
pub struct DataclassFields {
    /// Names of the fields that are children, in order.
    data: Vec<Py<PyString>>,
    /// Names of the fields that make up the node data (a tuple, in this order).
    meta: Vec<Py<PyString>>,
    /// How to rebuild the node without calling its type, if that gives the same object
    /// (`filterjax._dataclass_init` decides, once per type): every field, in the order
    /// its `__init__` assigns them.
    direct: Option<Box<[Assign]>>,
}

/// One attribute the direct rebuild sets.
struct Assign {
    name: Py<PyString>,
    /// The value is `meta[index]` if true, else the `index`-th child.
    is_meta: bool,
    index: usize,
    /// A field with a default factory: `__init__` calls the factory when given this marker
    /// object, so a node holding it is rebuilt by calling the type.
    marker: Option<Py<PyAny>>,
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

    /// The node, as jaxlib rebuilds it: `kind(**{meta fields: meta, data fields:
    /// children})`, or the same object built directly where that is identical.
    pub fn build<'py>(
        &self,
        kind: &Bound<'py, PyType>,
        meta: &Bound<'py, PyAny>,
        children: &[Bound<'py, PyAny>],
    ) -> PyResult<Bound<'py, PyAny>> {
        let meta = if self.meta.is_empty() {
            None
        } else {
            Some(meta.cast::<PyTuple>()?)
        };
        if let Some(plan) = &self.direct {
            if let Some(built) = build_direct(plan, kind, meta, children)? {
                return Ok(built);
            }
        }
        let py = kind.py();
        let kwargs = PyDict::new(py);
        if let Some(meta) = meta {
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

/// `object.__new__(kind)` then the generic assignment of every field in `plan`, which is
/// what `kind(**fields)` does for the types `plan` is made for (see
/// `filterjax._dataclass_init`). None if a value is a default-factory marker, or the node
/// data or children are not as flattened: the caller calls the type.
fn build_direct<'py>(
    plan: &[Assign],
    kind: &Bound<'py, PyType>,
    meta: Option<&Bound<'py, PyTuple>>,
    children: &[Bound<'py, PyAny>],
) -> PyResult<Option<Bound<'py, PyAny>>> {
    let py = kind.py();
    let meta_len = meta.map_or(0, |m| m.len());
    let value = |assign: &Assign| -> PyResult<Option<Bound<'py, PyAny>>> {
        Ok(match (assign.is_meta, meta) {
            (true, Some(m)) if assign.index < meta_len => Some(m.get_item(assign.index)?),
            (true, _) => None,
            (false, _) => children.get(assign.index).cloned(),
        })
    };
    for assign in plan {
        match value(assign)? {
            None => return Ok(None),
            Some(v) if assign.marker.as_ref().is_some_and(|m| v.is(m)) => return Ok(None),
            Some(_) => {}
        }
    }
    let new = object_new(py)?;
    // SAFETY: `new` is `object.__new__`'s `tp_new`, called as `type.__call__` calls it:
    // with the type, an argument tuple and no keywords. It returns a new reference or
    // NULL with an exception set, which `from_owned_ptr_or_err` turns into an error.
    let obj = unsafe {
        let args = PyTuple::empty(py);
        Bound::from_owned_ptr_or_err(
            py,
            new(kind.as_type_ptr(), args.as_ptr(), std::ptr::null_mut()),
        )?
    };
    for assign in plan {
        let Some(v) = value(assign)? else {
            return Ok(None);
        };
        // SAFETY: three valid object pointers, borrowed for the call; the setter takes its
        // own reference to the value. -1 means an exception is set.
        let status =
            unsafe { ffi::PyObject_GenericSetAttr(obj.as_ptr(), assign.name.as_ptr(), v.as_ptr()) };
        if status < 0 {
            return Err(PyErr::fetch(py));
        }
    }
    Ok(Some(obj))
}

/// `object.__new__`'s C function (`PyBaseObject_Type.tp_new`).
fn object_new(py: Python<'_>) -> PyResult<ffi::newfunc> {
    static NEW: PyOnceLock<usize> = PyOnceLock::new();
    let address = *NEW.get_or_try_init(py, || {
        // SAFETY: `PyBaseObject_Type` is a static type object that lives as long as the
        // interpreter; `PyType_GetSlot` only reads its `tp_new` slot.
        let slot = unsafe {
            ffi::PyType_GetSlot(
                std::ptr::addr_of_mut!(ffi::PyBaseObject_Type),
                ffi::Py_tp_new,
            )
        };
        if slot.is_null() {
            Err(pyo3::exceptions::PyRuntimeError::new_err(
                "filterjax: object has no tp_new",
            ))
        } else {
            Ok(slot as usize)
        }
    })?;
    // SAFETY: the address was read from the `tp_new` slot, whose type is `newfunc`.
    Ok(unsafe { std::mem::transmute::<usize, ffi::newfunc>(address) })
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
    // Whatever goes wrong deciding keeps the call.
    let direct = direct_plan(kind, &data, &meta).ok().flatten();
    Ok(Some(DataclassFields { data, meta, direct }))
}

/// `filterjax._dataclass_init.direct_fields` for `kind`, read into a plan.
fn direct_plan(
    kind: &Bound<'_, PyType>,
    data: &[Py<PyString>],
    meta: &[Py<PyString>],
) -> PyResult<Option<Box<[Assign]>>> {
    let py = kind.py();
    let answer = py
        .import("filterjax._dataclass_init")?
        .getattr("direct_fields")?
        .call1((
            kind,
            PyTuple::new(py, data.iter().map(|n| n.bind(py)))?,
            PyTuple::new(py, meta.iter().map(|n| n.bind(py)))?,
        ))?;
    if answer.is_none() {
        return Ok(None);
    }
    let mut plan = Vec::new();
    for entry in answer.cast::<PyTuple>()?.iter() {
        let (name, is_meta, index, marker): (Bound<'_, PyString>, bool, usize, Bound<'_, PyAny>) =
            entry.extract()?;
        let bound = if is_meta { meta.len() } else { data.len() };
        if index >= bound {
            return Ok(None);
        }
        plan.push(Assign {
            name: PyString::intern(py, &name.to_cow()?).unbind(),
            is_meta,
            index,
            marker: (!marker.is_none()).then(|| marker.unbind()),
        });
    }
    Ok(Some(plan.into_boxed_slice()))
}
