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

use pyo3::exceptions::{PyException, PyTypeError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use std::sync::{Arc, Mutex};

use pyo3::types::{PyDict, PyList, PyString, PyTuple, PyType};

use crate::errors::Stop;
use crate::flatten::CallKwargs;
use crate::key::StaticKey;
use crate::{classify, flatten, rebuild, Truthy};

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
    /// The last call shape found in `plans` (see `plan_for`).
    last_shape: Mutex<Option<Arc<CallShape>>>,
    /// The list the last program was called with, emptied to `None`s (see `leaf_list`).
    spare_list: Mutex<Option<Py<PyList>>>,
    /// Where CPython enters calls of instances of a `dispatcher_subclass` class (read at
    /// the offset that class declares as `__vectorcalloffset__`).
    vectorcall: VectorcallEntry,
}

static METHOD_TYPE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// One entry of a binding plan: where a bound argument comes from in the call.
enum Source {
    /// `args[index]`.
    Arg(usize),
    /// `kwargs[name]`.
    Keyword(Py<PyString>),
}

impl Source {
    fn parse(source: &Bound<'_, PyAny>) -> Option<Source> {
        match source.cast_exact::<PyString>() {
            Ok(name) => Some(Source::Keyword(name.clone().unbind())),
            Err(_) => source.extract::<usize>().ok().map(Source::Arg),
        }
    }

    #[inline]
    fn pick<'py>(
        &self,
        args: &Bound<'py, PyTuple>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        match self {
            Source::Arg(index) => Ok(args.get_item(*index).ok()),
            Source::Keyword(name) => match kwargs {
                Some(kwargs) => kwargs.get_item(name.bind(args.py())),
                None => Ok(None),
            },
        }
    }
}

/// A call shape's binding plan, read once from the plan table's entry.
enum Plan {
    /// The call is already in the function's normal form.
    Identity,
    /// `(argument sources, (name, source) of each keyword argument)`.
    Bind(Vec<Source>, Vec<(Py<PyString>, Source)>),
    /// Anything else (an NNX call shape's plan): calls go to the fallback.
    Other,
}

impl Plan {
    fn parse(plan: &Bound<'_, PyAny>, identity: &Py<PyAny>) -> Plan {
        if plan.is(identity) {
            return Plan::Identity;
        }
        Self::parse_bind(plan).unwrap_or(Plan::Other)
    }

    fn parse_bind(plan: &Bound<'_, PyAny>) -> Option<Plan> {
        let plan = plan.cast_exact::<PyTuple>().ok()?;
        if plan.len() != 2 {
            return None;
        }
        let arg_sources = plan.get_item(0).ok()?;
        let kw_sources = plan.get_item(1).ok()?;
        let args = arg_sources
            .cast_exact::<PyTuple>()
            .ok()?
            .iter()
            .map(|source| Source::parse(&source))
            .collect::<Option<Vec<_>>>()?;
        let mut kwargs = Vec::new();
        for item in kw_sources.cast_exact::<PyTuple>().ok()?.iter() {
            let item = item.cast_exact::<PyTuple>().ok()?;
            let name = item.get_item(0).ok()?;
            let name = name.cast_exact::<PyString>().ok()?.clone().unbind();
            kwargs.push((name, Source::parse(&item.get_item(1).ok()?)?));
        }
        Some(Plan::Bind(args, kwargs))
    }
}

/// `(args, kwargs)` in the function's normal form by a `Plan::Bind`'s sources (kwargs
/// None when there are none), or None if the plan does not fit the call (the fallback then
/// binds it and says what is wrong).
#[allow(clippy::type_complexity)]
fn bind_call<'py>(
    py: Python<'py>,
    arg_sources: &[Source],
    kw_sources: &[(Py<PyString>, Source)],
    args: &Bound<'py, PyTuple>,
    kwargs: Option<&Bound<'py, PyDict>>,
) -> PyResult<Option<(Vec<Bound<'py, PyAny>>, Option<Bound<'py, PyDict>>)>> {
    let mut bound_args = Vec::with_capacity(arg_sources.len());
    for source in arg_sources {
        match source.pick(args, kwargs)? {
            Some(value) => bound_args.push(value),
            None => return Ok(None),
        }
    }
    let bound_kwargs = if kw_sources.is_empty() {
        None
    } else {
        let bound = PyDict::new(py);
        for (name, source) in kw_sources {
            match source.pick(args, kwargs)? {
                Some(value) => bound.set_item(name.bind(py), value)?,
                None => return Ok(None),
            }
        }
        Some(bound)
    };
    Ok(Some((bound_args, bound_kwargs)))
}

/// The last call shape found in the plan table, and its plan.
struct CallShape {
    num_args: usize,
    /// The keyword names in call order (None for a positional call), compared by identity,
    /// and sorted.
    names: Option<(Py<PyTuple>, Py<PyList>)>,
    /// A plan depends only on the function's signature and the call shape, so it stays
    /// right after the table drops or re-wraps its entry: a call shape holding NNX objects
    /// still reaches the fallback, because NNX programs are never stored under a key a
    /// Dispatcher makes.
    plan: Plan,
    /// Where each bound argument sits in a vectorcall's argument array (positional
    /// arguments, then keyword values in call order), when the call binds to positional
    /// arguments only: the calls `call_shallow` can take without making an argument tuple.
    array_sources: Option<Vec<usize>>,
}

impl CallShape {
    fn array_sources(
        plan: &Plan,
        num_args: usize,
        names: Option<&Bound<'_, PyTuple>>,
    ) -> Option<Vec<usize>> {
        match plan {
            Plan::Identity if names.is_none() => Some((0..num_args).collect()),
            Plan::Bind(arg_sources, kw_sources) if kw_sources.is_empty() => arg_sources
                .iter()
                .map(|source| match source {
                    Source::Arg(index) => (*index < num_args).then_some(*index),
                    Source::Keyword(name) => {
                        let position = names?.iter().position(|n| n.eq(name).unwrap_or(false))?;
                        Some(num_args + position)
                    }
                })
                .collect(),
            _ => None,
        }
    }

    /// Does a vectorcall with these keyword names (NULL or a tuple) have this shape? The
    /// names are compared by identity, as `same_names` does.
    fn has_kwnames(&self, kwnames: Option<&Borrowed<'_, '_, PyTuple>>) -> bool {
        let kwnames = kwnames.filter(|names| !names.is_empty());
        match (&self.names, kwnames) {
            (None, None) => true,
            (Some((names, _)), Some(kwnames)) => {
                let names = names.bind(kwnames.py());
                names.len() == kwnames.len()
                    && names
                        .iter_borrowed()
                        .zip(kwnames.iter_borrowed())
                        .all(|(a, b)| a.is(&*b))
            }
            _ => false,
        }
    }
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
            let dynamic = self.leaf_list(py, &mut parts.dynamic)?;
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

    /// The call shape of a call with these arguments and its binding plan (None if the plan
    /// table has none yet). The last one found is reused while calls have the same number
    /// of positional arguments and the same keyword names (the same string objects, in the
    /// same order), as repeated calls from one call site do, without looking the table up.
    fn plan_for(
        &self,
        py: Python<'_>,
        num_args: usize,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Option<Arc<CallShape>>> {
        let last = self.last_shape.lock().ok().and_then(|guard| guard.clone());
        if let Some(last) = last {
            if last.num_args == num_args {
                let same = match (&last.names, kwargs) {
                    (None, None) => true,
                    (Some((names, _)), Some(kwargs)) => same_names(names.bind(py), kwargs),
                    _ => false,
                };
                if same {
                    return Ok(Some(last));
                }
            }
        }
        let (plan, names) = match kwargs {
            None => (self.plans.bind(py).get_item(num_args)?, None),
            Some(kwargs) => {
                let names = PyTuple::new(py, kwargs.keys())?;
                let shape = PyTuple::new(
                    py,
                    [
                        num_args.into_pyobject(py)?.into_any(),
                        names.clone().into_any(),
                    ],
                )?;
                let plan = self.plans.bind(py).get_item(&shape)?;
                let sorted = kwargs.keys();
                sorted.sort()?;
                (plan, Some((names.unbind(), sorted.unbind())))
            }
        };
        let Some(plan) = plan else {
            return Ok(None);
        };
        let plan = Plan::parse(&plan, &self.identity_plan);
        let array_sources = {
            let names = names.as_ref().map(|(names, _)| names.bind(py));
            CallShape::array_sources(&plan, num_args, names)
        };
        let found = Arc::new(CallShape {
            num_args,
            names,
            plan,
            array_sources,
        });
        let previous = match self.last_shape.lock() {
            Ok(mut guard) => guard.replace(found.clone()),
            Err(_) => None,
        };
        // Released after the lock: freeing a shape releases Python objects.
        drop(previous);
        Ok(Some(found))
    }

    /// A call of the wrapped function (see the module's description).
    fn call<'py>(
        &self,
        py: Python<'py>,
        args: &Bound<'py, PyTuple>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.call_after(py, args, kwargs, false)
    }

    /// `call`, where `shallow_missed` says that this call was already matched as a shallow
    /// call with the last key and did not match (the vectorcall entry tries that first):
    /// it is then not matched again.
    fn call_after<'py>(
        &self,
        py: Python<'py>,
        args: &Bound<'py, PyTuple>,
        kwargs: Option<&Bound<'py, PyDict>>,
        shallow_missed: bool,
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
        let Some(shape) = self.plan_for(py, args.len(), kwargs)? else {
            return fallback();
        };
        let last = self.last_key(py);
        let shallow_last = last.as_ref().filter(|_| !shallow_missed);
        if let (Plan::Identity, None, Some(last)) = (&shape.plan, kwargs, shallow_last) {
            if let Some(out) = self.call_shallow(py, last, args.iter_borrowed(), leading) {
                return out;
            }
        }
        // Compared with the last call's key as it is made (see `flatten::Expected`).
        let expect = last.as_ref().map(|key| key.get());
        let parts = match &shape.plan {
            Plan::Identity => {
                let sorted_keys = shape.names.as_ref().map(|(_, sorted)| sorted.bind(py));
                let kwargs = kwargs.map(|dict| CallKwargs { dict, sorted_keys });
                flatten::partition_call(py, args, kwargs, expect)
            }
            Plan::Bind(arg_sources, kw_sources) => {
                match bind_call(py, arg_sources, kw_sources, args, kwargs)? {
                    Some((bound_args, bound_kwargs)) => {
                        if let (None, Some(last)) = (&bound_kwargs, shallow_last) {
                            let bound = bound_args.iter().map(Bound::as_borrowed);
                            if let Some(out) = self.call_shallow(py, last, bound, leading) {
                                return out;
                            }
                        }
                        let kwargs = bound_kwargs.as_ref().map(|dict| CallKwargs {
                            dict,
                            sorted_keys: None,
                        });
                        flatten::partition_bound_call(py, &bound_args, kwargs, expect)
                    }
                    None => return fallback(),
                }
            }
            Plan::Other => return fallback(),
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
        self.run(py, &program, dynamic, leading)
    }

    /// A call made by CPython's vectorcall protocol: `args` holds the positional arguments,
    /// then the values of the keyword arguments named by `kwnames`. A repeated shallow call
    /// of the last call shape is taken from the array as it is; any other call makes the
    /// argument tuple and keyword dict `tp_call` would have had, and goes to `call`.
    fn vectorcall<'py>(
        &self,
        py: Python<'py>,
        args: ArgArray<'_, 'py>,
        num_args: usize,
        kwnames: Option<Borrowed<'_, 'py, PyTuple>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let shallow_missed = match self.vectorcall_shallow(py, args, num_args, kwnames.as_ref()) {
            Shallow::Ran(out) => return out,
            Shallow::Missed => true,
            Shallow::NotTried => false,
        };
        let positional = PyTuple::new(py, args.range(0..num_args))?;
        let kwargs = match kwnames.filter(|names| !names.is_empty()) {
            Some(names) => {
                let kwargs = PyDict::new(py);
                let values = args.range(num_args..args.raw.len());
                for (name, value) in names.iter_borrowed().zip(values) {
                    kwargs.set_item(name, value)?;
                }
                Some(kwargs)
            }
            None => None,
        };
        self.call_after(py, &positional, kwargs.as_ref(), shallow_missed)
    }

    /// `call_shallow` for a vectorcall of the last call shape that binds to positional
    /// arguments only.
    fn vectorcall_shallow<'py>(
        &self,
        py: Python<'py>,
        args: ArgArray<'_, 'py>,
        num_args: usize,
        kwnames: Option<&Borrowed<'_, 'py, PyTuple>>,
    ) -> Shallow<'py> {
        if !self.fast {
            return Shallow::NotTried;
        }
        let Some(shape) = self.last_shape.lock().ok().and_then(|guard| guard.clone()) else {
            return Shallow::NotTried;
        };
        if shape.num_args != num_args || !shape.has_kwnames(kwnames) {
            return Shallow::NotTried;
        }
        let (Some(sources), Some(last)) = (&shape.array_sources, self.last_key(py)) else {
            return Shallow::NotTried;
        };
        let bound = sources.iter().map(|&index| args.get(index));
        match self.call_shallow(py, &last, bound, self.leading.bind(py)) {
            Some(out) => Shallow::Ran(out),
            None => Shallow::Missed,
        }
    }

    /// `program` called with the call's dynamic leaves (and the function's own array
    /// leaves), and its output rebuilt.
    fn run<'py>(
        &self,
        py: Python<'py>,
        program: &Bound<'py, PyAny>,
        dynamic: Bound<'py, PyList>,
        leading: &Bound<'py, PyTuple>,
    ) -> PyResult<Bound<'py, PyAny>> {
        // Two flat sequences, not one positional argument per leaf: JAX flattens a list in
        // one pass, but builds a tree structure per positional argument.
        let called = call_program(program, leading, &dynamic);
        self.keep_list(dynamic);
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

    /// A positional call repeating the static part of the last call found, when that is
    /// a shallow call (see shallow.rs): matched argument by argument and run, or None if it
    /// does not match (the general path then takes it).
    fn call_shallow<'a, 'py: 'a>(
        &self,
        py: Python<'py>,
        last: &Bound<'py, StaticKey>,
        args: impl ExactSizeIterator<Item = Borrowed<'a, 'py, PyAny>>,
        leading: &Bound<'py, PyTuple>,
    ) -> Option<PyResult<Bound<'py, PyAny>>> {
        let key = last.get();
        let shallow = key.shallow()?;
        let g = classify::globals(py).ok()?;
        let list = self.spare_list_of(py, key.num_dynamic)?;
        if !shallow.matches(g, key, args, &list) {
            self.keep_list(list);
            return None;
        }
        // Looked up as in `lookup`: a cleared or evicted program is never called.
        match self.programs.bind(py).get_item(last) {
            Ok(Some(program)) => Some(self.run(py, &program, list, leading)),
            _ => {
                self.keep_list(list);
                None
            }
        }
    }

    /// The last call's list (see `leaf_list`) if it has `len` items and nothing else holds
    /// it.
    fn spare_list_of<'py>(&self, py: Python<'py>, len: usize) -> Option<Bound<'py, PyList>> {
        let list = self.spare_list.lock().ok()?.take()?.into_bound(py);
        (list.len() == len && sole_reference(&list)).then_some(list)
    }

    /// A list of `leaves` (which it takes) to call a program with: the last call's list
    /// refilled if it has the right length and nothing else holds it (so no one can see it
    /// change), else a new one. A repeated call then makes no list.
    fn leaf_list<'py>(
        &self,
        py: Python<'py>,
        leaves: &mut Vec<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyList>> {
        if let Some(list) = self.spare_list_of(py, leaves.len()) {
            for (index, leaf) in leaves.drain(..).enumerate() {
                // SAFETY: `list` is a live list of this length that only this function
                // holds; `PyList_SetItem` takes the new reference and releases the `None` it
                // replaces (which runs no Python code).
                unsafe {
                    ffi::PyList_SetItem(list.as_ptr(), index as ffi::Py_ssize_t, leaf.into_ptr())
                };
            }
            return Ok(list);
        }
        PyList::new(py, leaves.drain(..))
    }

    /// Keep the list a program was called with for the next call (`leaf_list`), its items
    /// released, unless something else still holds it (the program kept it).
    fn keep_list(&self, list: Bound<'_, PyList>) {
        if !sole_reference(&list) {
            return;
        }
        let py = list.py();
        for index in 0..list.len() {
            // SAFETY: only this function holds `list`, whose length is fixed meanwhile; a
            // released leaf's `__del__` may run Python code, but none that can reach the
            // list. `PyList_SetItem` takes the new reference to `None`.
            unsafe {
                ffi::PyList_SetItem(
                    list.as_ptr(),
                    index as ffi::Py_ssize_t,
                    py.None().into_ptr(),
                )
            };
        }
        let previous = match self.spare_list.lock() {
            Ok(mut guard) => guard.replace(list.unbind()),
            Err(_) => None,
        };
        drop(previous);
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

/// What `Dispatcher::vectorcall_shallow` did.
enum Shallow<'py> {
    /// The call matched the last key and ran: its result.
    Ran(PyResult<Bound<'py, PyAny>>),
    /// The call was matched with the last key as a shallow call, and did not match.
    Missed,
    /// The call is not of the last call shape, or that shape is not a shallow one.
    NotTried,
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

/// Is `obj`'s only reference the one held here?
fn sole_reference(obj: &Bound<'_, PyAny>) -> bool {
    // SAFETY: reads the reference count of a live object; the GIL is held.
    unsafe { ffi::Py_REFCNT(obj.as_ptr()) == 1 }
}

/// `program(dynamic)`, or `program(leading, dynamic)` when the wrapped function has array
/// leaves of its own.
fn call_program<'py>(
    program: &Bound<'py, PyAny>,
    leading: &Bound<'py, PyTuple>,
    dynamic: &Bound<'py, PyList>,
) -> PyResult<Bound<'py, PyAny>> {
    #[cfg(not(windows))]
    {
        let both = [leading.as_ptr(), dynamic.as_ptr()];
        let args = if leading.is_empty() {
            &both[1..]
        } else {
            &both[..]
        };
        // SAFETY: `program` is a live object and `args` points to `args.len()` live
        // objects, borrowed for the call. The result is a new reference or NULL with an
        // exception set.
        unsafe {
            Bound::from_owned_ptr_or_err(
                program.py(),
                PyObject_Vectorcall(
                    program.as_ptr(),
                    args.as_ptr(),
                    args.len(),
                    std::ptr::null_mut(),
                ),
            )
        }
    }
    #[cfg(windows)]
    {
        if leading.is_empty() {
            program.call1((dynamic,))
        } else {
            program.call1((leading, dynamic))
        }
    }
}

#[cfg(not(windows))]
extern "C" {
    /// Call `callable` with arguments in an array: no tuple is made for them (and JAX's
    /// compiled functions take their arguments this way). Exported by CPython as a function
    /// since 3.11, the oldest Python this module supports, but in the limited API only from
    /// 3.12, so pyo3-ffi declares it only there. On Windows an abi3 module links against
    /// `python3.dll`, which exports only the limited API: calls there make a tuple.
    fn PyObject_Vectorcall(
        callable: *mut ffi::PyObject,
        args: *const *mut ffi::PyObject,
        nargsf: usize,
        kwnames: *mut ffi::PyObject,
    ) -> *mut ffi::PyObject;
}

/// Are `names` the keyword names of a call with these keyword arguments, in order and
/// compared by identity?
fn same_names(names: &Bound<'_, PyTuple>, kwargs: &Bound<'_, PyDict>) -> bool {
    if names.len() != kwargs.len() {
        return false;
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
            return false;
        }
    }
    true
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
            spare_list: Mutex::new(None),
            vectorcall: VectorcallEntry(vectorcall_entry),
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
        self.call(py, args, kwargs)
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
        // `last_shape` holds only ints and strings, which can't be part of a cycle.
        Ok(())
    }
}

/// `tp_call` of the classes `dispatcher_subclass` makes: `Dispatcher.__call__` with the
/// call's own `args` tuple and `kwargs` dict, without PyO3's argument handling (which
/// copies every keyword argument into a new dict). Entered through PyO3's own `tp_call`
/// trampoline (the one its `#[pymethods] __call__` uses): it traps panics and marks the
/// thread as attached without asking CPython for the GIL state again.
///
/// # Safety
/// Called by CPython as `tp_call`: the interpreter is attached, `slf` is a live object of
/// the class, `args` a live tuple and `kwargs` NULL or a live dict, all borrowed for the
/// duration of the call.
unsafe fn call_slot(
    py: Python<'_>,
    slf: *mut ffi::PyObject,
    args: *mut ffi::PyObject,
    kwargs: *mut ffi::PyObject,
) -> PyResult<*mut ffi::PyObject> {
    // SAFETY: see the function's contract; `Borrowed` does not outlive the call.
    let (slf, args, kwargs) = unsafe {
        (
            Borrowed::from_ptr(py, slf),
            Borrowed::from_ptr(py, args),
            Borrowed::from_ptr_or_opt(py, kwargs),
        )
    };
    let dispatcher = slf.cast::<Dispatcher>()?;
    let args = args.cast::<PyTuple>()?;
    let kwargs = match kwargs {
        Some(kwargs) => Some(kwargs.cast::<PyDict>()?),
        None => None,
    };
    let out = dispatcher.get().call(py, &args, kwargs.as_deref())?;
    Ok(out.into_ptr())
}

/// `vectorcallfunc` of the classes `dispatcher_subclass` makes (see `Dispatcher::vectorcall`).
/// Entered through PyO3's own trampoline for fastcall functions, whose signature is the
/// same but for the count's type (`Py_ssize_t` there, `size_t` here: the same width).
///
/// # Safety
/// Called by CPython as a vectorcall function: the interpreter is attached, `callable` is a
/// live object of the class and `args` points to the positional arguments' count (given by
/// `nargsf`, less its flag bit) plus `kwnames`' length of live objects, all borrowed for
/// the duration of the call; `kwnames` is NULL or a tuple of strings.
unsafe extern "C" fn vectorcall_entry(
    callable: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargsf: usize,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    let trampoline = pyo3::impl_::trampoline::get_trampoline_function!(
        fastcall_cfunction_with_keywords,
        vectorcall_slot
    );
    // SAFETY: see the function's contract, which is the trampoline's.
    unsafe { trampoline(callable, args, nargsf as ffi::Py_ssize_t, kwnames) }
}

/// The flag bit of a vectorcall's argument count: the callee may use `args[-1]`.
const VECTORCALL_ARGUMENTS_OFFSET: usize = 1 << (usize::BITS - 1);

/// The body of `vectorcall_entry`, run inside the trampoline.
///
/// # Safety
/// As for `vectorcall_entry`.
unsafe fn vectorcall_slot(
    py: Python<'_>,
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargsf: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> PyResult<*mut ffi::PyObject> {
    let num_args = (nargsf as usize) & !VECTORCALL_ARGUMENTS_OFFSET;
    // SAFETY: see the function's contract; `Borrowed` does not outlive the call.
    let (slf, kwnames) = unsafe {
        (
            Borrowed::from_ptr(py, slf),
            Borrowed::from_ptr_or_opt(py, kwnames),
        )
    };
    let kwnames = match kwnames {
        Some(names) => Some(names.cast::<PyTuple>()?),
        None => None,
    };
    let len = num_args + kwnames.as_ref().map_or(0, |names| names.len());
    // SAFETY: `args` points to `len` live objects, borrowed for the call (see the
    // function's contract).
    let args = unsafe { ArgArray::new(py, args, len) };
    let dispatcher = slf.cast::<Dispatcher>()?;
    let out = dispatcher.get().vectorcall(py, args, num_args, kwnames)?;
    Ok(out.into_ptr())
}

/// Where a `Dispatcher`'s `vectorcall` field sits in its object, in bytes from the start, if
/// it lies inside the object (CPython reads it there for classes that declare it).
fn vectorcall_offset(py: Python<'_>) -> PyResult<Option<ffi::Py_ssize_t>> {
    static OFFSET: PyOnceLock<Option<ffi::Py_ssize_t>> = PyOnceLock::new();
    OFFSET
        .get_or_try_init(py, || -> PyResult<_> {
            let empty = PyDict::new(py);
            let none = py.None();
            let probe = Dispatcher::new(
                py,
                empty.clone(),
                empty,
                none.clone_ref(py),
                none.clone_ref(py),
                none,
                None,
                Truthy(false),
                None,
            )?;
            let probe = Bound::new(py, probe)?;
            let field = std::ptr::addr_of!(probe.get().vectorcall) as isize;
            let offset = field - probe.as_ptr() as isize;
            let size: isize = probe.get_type().getattr("__basicsize__")?.extract()?;
            let width = std::mem::size_of::<VectorcallEntry>() as isize;
            Ok((offset > 0 && offset + width <= size).then_some(offset))
        })
        .copied()
}

/// A vectorcall's argument array: pointers to live objects, borrowed for the call.
#[derive(Clone, Copy)]
struct ArgArray<'a, 'py> {
    raw: &'a [*mut ffi::PyObject],
    py: Python<'py>,
}

impl<'a, 'py> ArgArray<'a, 'py> {
    /// # Safety
    /// `args` is NULL with `len` zero, or points to `len` live objects that stay alive and
    /// in place for `'a`.
    unsafe fn new(py: Python<'py>, args: *const *mut ffi::PyObject, len: usize) -> Self {
        let raw = if len == 0 {
            &[]
        } else {
            // SAFETY: see the function's contract.
            unsafe { std::slice::from_raw_parts(args, len) }
        };
        ArgArray { raw, py }
    }

    fn get(&self, index: usize) -> Borrowed<'a, 'py, PyAny> {
        // SAFETY: every pointer in `raw` is a live object for `'a` (see `new`).
        unsafe { Borrowed::from_ptr(self.py, self.raw[index]) }
    }

    fn range(
        &self,
        range: std::ops::Range<usize>,
    ) -> impl ExactSizeIterator<Item = Borrowed<'a, 'py, PyAny>> + '_ {
        range.map(|index| self.get(index))
    }
}

/// A `vectorcallfunc`, kept in a `Dispatcher` where CPython looks for it.
#[repr(transparent)]
struct VectorcallEntry(ffi::vectorcallfunc);

/// `Py_TPFLAGS_HAVE_VECTORCALL` (pyo3-ffi declares it for the 3.12 limited API only; the
/// value is the same since 3.8).
const TPFLAGS_HAVE_VECTORCALL: std::ffi::c_ulong = 1 << 11;

/// A subclass of `bases` (which include `Dispatcher`) whose calls enter the Dispatcher
/// directly (see `vectorcall_entry` and `call_slot`), made like `type("_DispatcherSubclass", bases,
/// {"__slots__": ()})`: the same layout, MRO and `__init_subclass__` call.
#[pyfunction]
pub fn dispatcher_subclass<'py>(
    py: Python<'py>,
    bases: &Bound<'py, PyTuple>,
) -> PyResult<Bound<'py, PyType>> {
    let dispatcher = py.get_type::<Dispatcher>();
    let mut derives = false;
    for base in bases.iter() {
        let base = base.cast_into::<PyType>()?;
        derives |= base.is_subclass(&dispatcher)?;
    }
    if !derives {
        return Err(PyTypeError::new_err(
            "dispatcher_subclass: one of the bases must be a subclass of Dispatcher",
        ));
    }
    // Calls enter by vectorcall (no argument tuple or keyword dict) where the Dispatcher's
    // entry can be declared, else by `tp_call`, which stays for callers that have a tuple.
    let offset = vectorcall_offset(py)?;
    let mut members = [
        ffi::PyMemberDef {
            name: c"__vectorcalloffset__".as_ptr(),
            type_code: ffi::Py_T_PYSSIZET,
            offset: offset.unwrap_or(0),
            flags: ffi::Py_READONLY,
            doc: std::ptr::null(),
        },
        ffi::PyMemberDef::default(),
    ];
    let mut slots = vec![ffi::PyType_Slot {
        slot: ffi::Py_tp_call,
        pfunc: pyo3::impl_::trampoline::get_trampoline_function!(ternaryfunc, call_slot)
            as *mut std::ffi::c_void,
    }];
    let mut flags = ffi::Py_TPFLAGS_DEFAULT | ffi::Py_TPFLAGS_BASETYPE;
    if offset.is_some() {
        slots.push(ffi::PyType_Slot {
            slot: ffi::Py_tp_members,
            pfunc: members.as_mut_ptr().cast(),
        });
        flags |= TPFLAGS_HAVE_VECTORCALL;
    }
    slots.push(ffi::PyType_Slot {
        slot: 0,
        pfunc: std::ptr::null_mut(),
    });
    let mut spec = ffi::PyType_Spec {
        name: c"filterjax._native._DispatcherSubclass".as_ptr(),
        // Zero: the instance layout is the bases' (no new slots, like `__slots__ = ()`).
        basicsize: 0,
        itemsize: 0,
        flags: flags as std::ffi::c_uint,
        slots: slots.as_mut_ptr(),
    };
    // SAFETY: `spec`, `slots` and `members` are valid for the call, which copies what it
    // keeps (the name is a static string); `bases` is a live tuple of types. The result is a new
    // reference to a type, or NULL with an exception set.
    let made = unsafe {
        Bound::from_owned_ptr_or_err(py, ffi::PyType_FromSpecWithBases(&mut spec, bases.as_ptr()))?
    };
    let made = made.cast_into::<PyType>()?;
    // What `type.__new__` does last: the nearest base's `__init_subclass__`, for the class.
    made.call_method0(pyo3::intern!(py, "__init_subclass__"))?;
    Ok(made)
}
