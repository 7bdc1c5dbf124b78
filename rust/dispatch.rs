//! `Dispatcher`: the per-call path of a `filter_jit` function (twin of
//! `filterjax._pycore.Dispatcher`).
//!
//! A call is: look up the binding plan of its shape, bind the arguments to the function's
//! normal form, partition them into dynamic leaves and a `StaticKey`, look the key up in
//! the table of compiled programs (one `jax.jit` per static signature), call that with the
//! flat array leaves only, and rebuild the output. JAX's own dispatch then sees nothing
//! but arrays: no static argument to hash or compare. Anything off that path (a call shape
//! or static signature seen for the first time, a partition or comparison that raises)
//! goes to the Python fallback, which fills the tables.

use pyo3::exceptions::PyException;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use std::sync::Mutex;

use pyo3::types::{PyDict, PyList, PyString, PyTuple};

use crate::errors::Stop;
use crate::flatten::CallKwargs;
use crate::key::StaticKey;
use crate::{flatten, rebuild, Truthy};

/// The per-call path of a `filter_jit` function.
///
/// Holds no mutable state of its own: the plan and program tables are dicts shared by
/// every wrapper around the same function, filled (and cleared) from Python.
#[pyclass(
    frozen,
    dict,
    weakref,
    subclass,
    module = "filterjax._native",
    name = "Dispatcher"
)]
pub struct Dispatcher {
    /// Call shape (`len(args)` or `(len(args), keyword names)`) -> `identity_plan` or
    /// `(argument sources, keyword sources)`.
    plans: Py<PyDict>,
    /// `StaticKey` of the bound arguments -> the `jax.jit` compiled for it.
    programs: Py<PyDict>,
    identity_plan: Py<PyAny>,
    fallback: Py<PyAny>,
    output_spec: Py<PyAny>,
    /// The wrapped function's own array leaves, passed first to every program.
    leading: Py<PyTuple>,
    fast: bool,
    /// `on_error(exception)`: the exception to raise instead of one a program raised, or
    /// None. Called only on that error path.
    on_error: Option<Py<PyAny>>,
    /// The key of the last call found in `programs`: repeated calls with equal static
    /// parts are compared with it in place, without making a key object.
    last: Mutex<Option<Py<StaticKey>>>,
    /// The last keyword call shape found in `plans` (see `keyword_plan`).
    last_shape: Mutex<Option<KeywordShape>>,
}

static METHOD_TYPE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// A call shape with keyword arguments, and its binding plan.
struct KeywordShape {
    /// `(len(args), keyword names)`, the plan table's key.
    shape: Py<PyTuple>,
    /// The keyword names, sorted.
    sorted: Py<PyList>,
    /// What `plans` held for `shape`. A plan depends only on the function's signature and
    /// the call shape, so it stays right after the table drops or re-wraps it: a call shape
    /// holding NNX objects is still sent to the fallback, because NNX programs are never
    /// stored under a key a Dispatcher makes.
    plan: Py<PyAny>,
}

/// One entry of a binding plan: where a bound argument comes from in the call.
fn pick<'py>(
    source: &Bound<'py, PyAny>,
    args: &Bound<'py, PyTuple>,
    kwargs: Option<&Bound<'py, PyDict>>,
) -> PyResult<Option<Bound<'py, PyAny>>> {
    if let Ok(name) = source.cast_exact::<PyString>() {
        return match kwargs {
            Some(kwargs) => kwargs.get_item(name),
            None => Ok(None),
        };
    }
    let index: usize = source.extract()?;
    Ok(args.get_item(index).ok())
}

/// `(args, kwargs)` in the function's normal form (kwargs None when there are none), or
/// None if the plan does not fit the call (the fallback then binds it and says what is
/// wrong).
#[allow(clippy::type_complexity)]
fn apply_plan<'py>(
    py: Python<'py>,
    plan: &Bound<'py, PyAny>,
    args: &Bound<'py, PyTuple>,
    kwargs: Option<&Bound<'py, PyDict>>,
) -> PyResult<Option<(Vec<Bound<'py, PyAny>>, Option<Bound<'py, PyDict>>)>> {
    let Ok(plan) = plan.cast_exact::<PyTuple>() else {
        return Ok(None);
    };
    if plan.len() != 2 {
        return Ok(None);
    }
    let arg_sources = plan.get_item(0)?;
    let kw_sources = plan.get_item(1)?;
    let (Ok(arg_sources), Ok(kw_sources)) = (
        arg_sources.cast_exact::<PyTuple>(),
        kw_sources.cast_exact::<PyTuple>(),
    ) else {
        return Ok(None);
    };
    let mut bound_args = Vec::with_capacity(arg_sources.len());
    for source in arg_sources.iter() {
        match pick(&source, args, kwargs)? {
            Some(value) => bound_args.push(value),
            None => return Ok(None),
        }
    }
    let bound_kwargs = if kw_sources.is_empty() {
        None
    } else {
        let bound = PyDict::new(py);
        for item in kw_sources.iter() {
            let item = item.cast_exact::<PyTuple>()?;
            let name = item.get_item(0)?;
            match pick(&item.get_item(1)?, args, kwargs)? {
                Some(value) => bound.set_item(name, value)?,
                None => return Ok(None),
            }
        }
        Some(bound)
    };
    Ok(Some((bound_args, bound_kwargs)))
}

impl Dispatcher {
    /// The program compiled for the key these parts make (None if there is none yet), and
    /// the dynamic leaves to call it with.
    ///
    /// Parts that matched the key of this dispatcher's last hit while they were made are
    /// looked up by that key, with no new key object and no hashing; otherwise a key is
    /// made and, if found, remembered for next time. The table is consulted either way, so
    /// a cleared or evicted program is never called.
    #[allow(clippy::type_complexity)]
    fn lookup<'py>(
        &self,
        py: Python<'py>,
        mut parts: flatten::Parts<'py>,
        last: Option<&Bound<'py, StaticKey>>,
    ) -> PyResult<Lookup<'py>> {
        let programs = self.programs.bind(py);
        if let (true, Some(last)) = (parts.matched, last) {
            let dynamic = parts.take_dynamic(py)?;
            parts.recycle();
            return Ok(match programs.get_item(last)? {
                Some(program) => Lookup::Found(program, dynamic),
                None => Lookup::Missing,
            });
        }
        let hash = match parts.hash(py) {
            Ok(hash) => hash,
            Err(failure) => return Ok(Lookup::Unhashable(failure.err)),
        };
        let (dynamic, key) = parts.into_key(py, Some(hash))?;
        let key = Bound::new(py, key)?;
        let Some(program) = programs.get_item(&key)? else {
            return Ok(Lookup::Missing);
        };
        let remembered = table_key(programs, &program, hash).unwrap_or(key);
        self.remember(remembered.unbind());
        Ok(Lookup::Found(program, dynamic))
    }

    /// The binding plan of a call with these keyword arguments (None if the plan table has
    /// none yet), and their names sorted. The last ones found are reused while calls pass
    /// the same names (the same string objects, in the same order), as repeated calls from
    /// one call site do, without looking the table up.
    #[allow(clippy::type_complexity)]
    fn keyword_plan<'py>(
        &self,
        py: Python<'py>,
        num_args: usize,
        kwargs: &Bound<'py, PyDict>,
    ) -> PyResult<Option<(Bound<'py, PyAny>, Bound<'py, PyList>)>> {
        let last = self.last_shape.lock().ok().and_then(|guard| {
            guard.as_ref().map(|known| {
                (
                    known.shape.bind(py).clone(),
                    known.sorted.bind(py).clone(),
                    known.plan.bind(py).clone(),
                )
            })
        });
        if let Some((shape, sorted, plan)) = last {
            if same_shape(&shape, num_args, kwargs)? {
                return Ok(Some((plan, sorted)));
            }
        }
        let names = PyTuple::new(py, kwargs.keys())?;
        let shape = PyTuple::new(
            py,
            [num_args.into_pyobject(py)?.into_any(), names.into_any()],
        )?;
        let Some(plan) = self.plans.bind(py).get_item(&shape)? else {
            return Ok(None);
        };
        let sorted = kwargs.keys();
        sorted.sort()?;
        let found = KeywordShape {
            shape: shape.unbind(),
            sorted: sorted.clone().unbind(),
            plan: plan.clone().unbind(),
        };
        let previous = match self.last_shape.lock() {
            Ok(mut guard) => guard.replace(found),
            Err(_) => None,
        };
        // Released after the lock: freeing a plan can run Python code.
        drop(previous);
        Ok(Some((plan, sorted)))
    }

    fn last_key<'py>(&self, py: Python<'py>) -> Option<Bound<'py, StaticKey>> {
        let guard = self.last.lock().ok()?;
        guard.as_ref().map(|k| k.bind(py).clone())
    }

    fn remember(&self, key: Py<StaticKey>) {
        let previous = match self.last.lock() {
            Ok(mut guard) => guard.replace(key),
            Err(_) => Some(key),
        };
        // Released after the lock: freeing a key can run arbitrary Python (a static
        // leaf's `__del__`), which may call this dispatcher again.
        drop(previous);
    }

    /// What `on_error` makes of an error a program raised (the error itself if it has
    /// no answer, or if asking it fails).
    fn translate(&self, py: Python<'_>, err: PyErr) -> PyErr {
        let Some(on_error) = &self.on_error else {
            return err;
        };
        match on_error.bind(py).call1((err.value(py),)) {
            Ok(replacement) if !replacement.is_none() => PyErr::from_value(replacement),
            _ => err,
        }
    }
}

/// What `Dispatcher::lookup` found.
enum Lookup<'py> {
    /// The program and the dynamic leaves to call it with.
    Found(Bound<'py, PyAny>, Bound<'py, PyList>),
    /// No program for this static signature (yet).
    Missing,
    /// A static leaf could not be hashed (the error `hash` raised).
    Unhashable(PyErr),
}

/// Is `shape` the `(num_args, names)` of a call with these keyword arguments, names
/// compared by identity?
fn same_shape(
    shape: &Bound<'_, PyTuple>,
    num_args: usize,
    kwargs: &Bound<'_, PyDict>,
) -> PyResult<bool> {
    if shape.get_borrowed_item(0)?.extract::<usize>()? != num_args {
        return Ok(false);
    }
    let names = shape.get_borrowed_item(1)?;
    let names = names.cast_exact::<PyTuple>()?;
    if names.len() != kwargs.len() {
        return Ok(false);
    }
    let mut position: ffi::Py_ssize_t = 0;
    let mut key: *mut ffi::PyObject = std::ptr::null_mut();
    let mut value: *mut ffi::PyObject = std::ptr::null_mut();
    for name in names.iter_borrowed() {
        // SAFETY: the GIL is held and `kwargs` is a live dict, not changed during the loop
        // (nothing here runs Python code). `PyDict_Next` hands out borrowed references,
        // which are only compared by address, never used.
        let more =
            unsafe { ffi::PyDict_Next(kwargs.as_ptr(), &mut position, &mut key, &mut value) };
        if more == 0 || key != name.as_ptr() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Most table entries searched for the key object the table itself holds.
const TABLE_SCAN_MAX: usize = 16;

/// The key object `programs` holds for `program` (found by the program's identity and the
/// key's hash), if the table is small enough to search. Looking a key up by the table's
/// own object is an identity match: no `__eq__` call.
fn table_key<'py>(
    programs: &Bound<'py, PyDict>,
    program: &Bound<'py, PyAny>,
    hash: isize,
) -> Option<Bound<'py, StaticKey>> {
    if programs.len() > TABLE_SCAN_MAX {
        return None;
    }
    programs.iter().find_map(|(key, value)| {
        let key = key.cast_into_exact::<StaticKey>().ok()?;
        (value.is(program) && key.get().cached_hash() == Some(hash)).then_some(key)
    })
}

#[pymethods]
impl Dispatcher {
    #[new]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(
        signature = (plans, programs, identity_plan, fallback, output_spec, leading=None, fast=Truthy(true), on_error=None),
        text_signature = "(plans, programs, identity_plan, fallback, output_spec, leading=None, fast=True, on_error=None)"
    )]
    fn new(
        py: Python<'_>,
        plans: Bound<'_, PyDict>,
        programs: Bound<'_, PyDict>,
        identity_plan: Py<PyAny>,
        fallback: Py<PyAny>,
        output_spec: Py<PyAny>,
        leading: Option<&Bound<'_, PyAny>>,
        fast: Truthy,
        on_error: Option<Py<PyAny>>,
    ) -> PyResult<Self> {
        let leading = match leading.filter(|l| !l.is_none()) {
            Some(l) => match l.cast_exact::<PyTuple>() {
                Ok(t) => t.clone(),
                Err(_) => PyTuple::new(py, l.try_iter()?.collect::<PyResult<Vec<_>>>()?)?,
            },
            None => PyTuple::empty(py),
        };
        Ok(Dispatcher {
            plans: plans.unbind(),
            programs: programs.unbind(),
            identity_plan,
            fallback,
            output_spec,
            leading: leading.unbind(),
            fast: fast.0,
            on_error: on_error.filter(|f| !f.is_none(py)),
            last: Mutex::new(None),
            last_shape: Mutex::new(None),
        })
    }

    /// The wrapped function's array leaves (a tuple), in `jax.tree_util` order.
    #[getter]
    fn leading<'py>(&self, py: Python<'py>) -> Bound<'py, PyTuple> {
        self.leading.bind(py).clone()
    }

    #[pyo3(signature = (*args, **kwargs))]
    fn __call__<'py>(
        &self,
        py: Python<'py>,
        args: &Bound<'py, PyTuple>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        // No keyword arguments: no dict, unless the call leaves the fast path.
        let kwargs = kwargs.filter(|k| !k.is_empty());
        let leading = self.leading.bind(py);
        let fallback = || {
            let kwargs = match kwargs {
                Some(k) => k.clone(),
                None => PyDict::new(py),
            };
            self.fallback.bind(py).call1((leading, args, kwargs))
        };
        if !self.fast {
            return fallback();
        }
        let plans = self.plans.bind(py);
        let (plan, sorted_keys) = match kwargs {
            None => match plans.get_item(args.len())? {
                Some(plan) => (plan, None),
                None => return fallback(),
            },
            Some(kwargs) => match self.keyword_plan(py, args.len(), kwargs)? {
                Some((plan, sorted)) => (plan, Some(sorted)),
                None => return fallback(),
            },
        };
        // Compared with the last call's key as it is made (see `flatten::Expected`).
        let last = self.last_key(py);
        let expect = last.as_ref().map(|key| key.get());
        let parts = if plan.is(&self.identity_plan) {
            let kwargs = kwargs.map(|dict| CallKwargs {
                dict,
                sorted_keys: sorted_keys.as_ref(),
            });
            flatten::partition_call(py, args, kwargs, expect)
        } else {
            match apply_plan(py, &plan, args, kwargs)? {
                Some((bound_args, bound_kwargs)) => {
                    let kwargs = bound_kwargs.as_ref().map(|dict| CallKwargs {
                        dict,
                        sorted_keys: None,
                    });
                    flatten::partition_bound_call(py, &bound_args, kwargs, expect)
                }
                None => return fallback(),
            }
        };
        let parts = match parts {
            Ok(parts) => parts,
            // The fallback partitions again and raises the error with the call's names.
            Err(Stop::Raised(err)) if !err.is_instance_of::<PyException>(py) => return Err(err),
            Err(_) => return fallback(),
        };
        let program = match self.lookup(py, parts, last.as_ref()) {
            Ok(Lookup::Found(program, dynamic)) => (program, dynamic),
            // A static signature not compiled yet.
            Ok(Lookup::Missing) => return fallback(),
            // An unhashable static leaf, or one whose `__eq__` raised: the fallback says
            // which leaf it was.
            Ok(Lookup::Unhashable(err)) | Err(err) if err.is_instance_of::<PyException>(py) => {
                return fallback()
            }
            Ok(Lookup::Unhashable(err)) | Err(err) => return Err(err),
        };
        let (program, dynamic) = program;
        // Two flat sequences, not one positional argument per leaf: JAX flattens a list in
        // one pass, but builds a tree structure per positional argument.
        let called = if leading.is_empty() {
            program.call1((dynamic,))
        } else {
            program.call1((leading, dynamic))
        };
        let out = match called {
            Ok(out) => out,
            Err(err) => return Err(self.translate(py, err)),
        };
        if let Ok(dict) = out.cast_exact::<PyDict>() {
            if dict.len() == 1 {
                if let Some((spec, leaves)) = dict.iter().next() {
                    if spec.get_type().is(&self.output_spec) {
                        let spec_key = spec.getattr(pyo3::intern!(py, "key"))?;
                        return rebuild::rebuild(py, &spec_key, &leaves, None);
                    }
                }
            }
        }
        Ok(out)
    }

    fn __get__<'py>(
        slf: &Bound<'py, Self>,
        instance: Option<&Bound<'py, PyAny>>,
        _owner: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        match instance.filter(|i| !i.is_none()) {
            None => Ok(slf.clone().into_any()),
            Some(instance) => {
                let method_type = METHOD_TYPE.get_or_try_init(py, || -> PyResult<_> {
                    Ok(py.import("types")?.getattr("MethodType")?.unbind())
                })?;
                method_type.bind(py).call1((slf, instance))
            }
        }
    }

    fn __traverse__(&self, visit: pyo3::gc::PyVisit<'_>) -> Result<(), pyo3::PyTraverseError> {
        visit.call(&self.plans)?;
        visit.call(&self.programs)?;
        visit.call(&self.identity_plan)?;
        visit.call(&self.fallback)?;
        visit.call(&self.output_spec)?;
        visit.call(&self.leading)?;
        if let Some(on_error) = &self.on_error {
            visit.call(on_error)?;
        }
        // Never contended here: the lock is only held for a reference count change.
        if let Ok(last) = self.last.try_lock() {
            if let Some(key) = last.as_ref() {
                visit.call(key)?;
            }
        }
        if let Ok(last_shape) = self.last_shape.try_lock() {
            if let Some(known) = last_shape.as_ref() {
                visit.call(&known.plan)?;
            }
        }
        Ok(())
    }
}
