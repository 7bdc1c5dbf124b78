//! `Dispatcher`: the per-call path of a `filter_jit` function (twin of
//! `filterjax._pycore.Dispatcher`).

use std::sync::Mutex;

use pyo3::exceptions::{PyException, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple};

use crate::{flatten, rebuild, Truthy};

/// What `reset` swaps. Behind a mutex because the class is frozen (shared across threads
/// and re-entered from the jitted function); the lock is never held while Python runs.
struct State {
    jitted: Py<PyAny>,
    plans: Py<PyAny>,
    leading: Option<Py<PyAny>>,
    fast: bool,
}

/// The per-call path of a `filter_jit` function.
///
/// Calls whose shape has `fast_plan` as plan are partitioned, passed to `jitted` as
/// `(key, [leading,] dynamic)` and their output rebuilt; everything else goes to
/// `fallback(args, kwargs)`.
#[pyclass(
    frozen,
    dict,
    weakref,
    module = "filterjax._native",
    name = "Dispatcher"
)]
pub struct Dispatcher {
    state: Mutex<State>,
    fast_plan: Py<PyAny>,
    fallback: Py<PyAny>,
    output_spec: Py<PyAny>,
}

static METHOD_TYPE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

fn lock_error() -> PyErr {
    PyRuntimeError::new_err("filterjax: Dispatcher state lock poisoned")
}

type Snapshot = (Py<PyAny>, Py<PyAny>, Option<Py<PyAny>>, bool);

impl Dispatcher {
    /// A snapshot of the swappable state, taken without running Python under the lock.
    fn snapshot(&self, py: Python<'_>) -> PyResult<Snapshot> {
        let state = self.state.lock().map_err(|_| lock_error())?;
        Ok((
            state.jitted.clone_ref(py),
            state.plans.clone_ref(py),
            state.leading.as_ref().map(|l| l.clone_ref(py)),
            state.fast,
        ))
    }
}

fn not_none(obj: Option<Py<PyAny>>, py: Python<'_>) -> Option<Py<PyAny>> {
    obj.filter(|o| !o.is_none(py))
}

#[pymethods]
impl Dispatcher {
    #[new]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (jitted, plans, fast_plan, fallback, output_spec, leading=None, fast=Truthy(true)))]
    fn new(
        py: Python<'_>,
        jitted: Py<PyAny>,
        plans: Py<PyAny>,
        fast_plan: Py<PyAny>,
        fallback: Py<PyAny>,
        output_spec: Py<PyAny>,
        leading: Option<Py<PyAny>>,
        fast: Truthy,
    ) -> PyResult<Self> {
        Ok(Dispatcher {
            state: Mutex::new(State {
                jitted,
                plans,
                leading: not_none(leading, py),
                fast: fast.0,
            }),
            fast_plan,
            fallback,
            output_spec,
        })
    }

    /// Swap in a new jitted function and plan table (after the caches were cleared).
    #[pyo3(signature = (jitted, plans, leading=None, fast=Truthy(true)))]
    fn reset(
        &self,
        py: Python<'_>,
        jitted: Py<PyAny>,
        plans: Py<PyAny>,
        leading: Option<Py<PyAny>>,
        fast: Truthy,
    ) -> PyResult<()> {
        let fast = fast.0;
        let old = {
            let mut state = self.state.lock().map_err(|_| lock_error())?;
            std::mem::replace(
                &mut *state,
                State {
                    jitted,
                    plans,
                    leading: not_none(leading, py),
                    fast,
                },
            )
        };
        // Dropped outside the lock: releasing the old objects may run Python code.
        drop(old);
        Ok(())
    }

    #[pyo3(signature = (*args, **kwargs))]
    fn __call__<'py>(
        &self,
        py: Python<'py>,
        args: &Bound<'py, PyTuple>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let kwargs = match kwargs {
            Some(k) => k.clone(),
            None => PyDict::new(py),
        };
        let (jitted, plans, leading, fast) = self.snapshot(py)?;
        let fallback = |args: &Bound<'py, PyTuple>, kwargs: Bound<'py, PyDict>| {
            self.fallback.bind(py).call1((args, kwargs))
        };
        if !fast {
            return fallback(args, kwargs);
        }
        let shape = if kwargs.is_empty() {
            args.len().into_pyobject(py)?.into_any()
        } else {
            let names = PyTuple::new(py, kwargs.keys())?;
            PyTuple::new(
                py,
                [args.len().into_pyobject(py)?.into_any(), names.into_any()],
            )?
            .into_any()
        };
        let plans = plans.bind(py);
        let plan = match plans.cast_exact::<PyDict>() {
            Ok(dict) => dict.get_item(&shape)?,
            Err(_) => Some(plans.call_method1(pyo3::intern!(py, "get"), (&shape,))?),
        };
        if !plan.is_some_and(|p| p.is(&self.fast_plan)) {
            return fallback(args, kwargs);
        }
        let tree = PyTuple::new(py, [args.as_any(), kwargs.as_any()])?;
        let (dynamic, key) = match flatten::partition(py, tree.as_any(), None, None, true) {
            Ok(parts) => parts,
            // The fallback partitions again and raises the error with the call's names.
            Err(err) if err.is_instance_of::<PyException>(py) => return fallback(args, kwargs),
            Err(err) => return Err(err),
        };
        let jitted = jitted.bind(py);
        let called = match leading {
            None => jitted.call1((key, dynamic)),
            Some(leading) => jitted.call1((key, leading, dynamic)),
        };
        let out = match called {
            Ok(out) => out,
            // Nothing ran: JAX's cache lookup failed on a static leaf's `__eq__`. The
            // fallback repeats the call and says which leaf it was.
            Err(err) if is_static_comparison_error(py, &err) => return fallback(args, kwargs),
            Err(err) => return Err(err),
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

    fn __repr__(slf: &Bound<'_, Self>) -> PyResult<String> {
        let py = slf.py();
        let name = match slf.getattr(pyo3::intern!(py, "__name__")) {
            Ok(name) => name.str()?.to_string(),
            Err(err) if err.is_instance_of::<pyo3::exceptions::PyAttributeError>(py) => {
                "?".to_owned()
            }
            Err(err) => return Err(err),
        };
        Ok(format!("<filter_jit({name})>"))
    }

    fn __traverse__(&self, visit: pyo3::gc::PyVisit<'_>) -> Result<(), pyo3::PyTraverseError> {
        visit.call(&self.fast_plan)?;
        visit.call(&self.fallback)?;
        visit.call(&self.output_spec)?;
        // `try_lock`: the GC may run while a call holds the lock briefly; skipping the
        // swappable fields then only delays collecting a cycle through them.
        if let Ok(state) = self.state.try_lock() {
            visit.call(&state.jitted)?;
            visit.call(&state.plans)?;
            if let Some(leading) = &state.leading {
                visit.call(leading)?;
            }
        }
        Ok(())
    }
}

/// JAX's dispatch error for a static argument whose `__eq__` raised (the same prefix as
/// `filterjax._pycore.JAX_STATIC_EQ_ERROR`).
fn is_static_comparison_error(py: Python<'_>, err: &PyErr) -> bool {
    err.is_instance_of::<PyValueError>(py)
        && err
            .value(py)
            .str()
            .is_ok_and(|message| message.to_string_lossy().starts_with(JAX_STATIC_EQ_ERROR))
}

const JAX_STATIC_EQ_ERROR: &str = "static arguments should be comparable";
