//! The public filtering helpers on the core: `tree_partition`, `tree_filter`, `tree_combine`
//! and `tree_apply_updates` (`filterjax.partition`, `filter`, `combine`, `apply_updates`),
//! with Equinox's semantics.
//!
//! Each flattens its tree once with the `Flattener` of flatten.rs, which also sorts the
//! leaves by the filter (a bool, `is_array` natively, or any callable), and builds its
//! outputs with rebuild.rs's `unflatten`. A filter_spec that is itself a PyTree is resolved
//! as Equinox does: its own structure down to its leaves (what `flatten_up_to` accepts), then
//! each matching subtree flattened with `is_leaf`. The other trees of `combine` and the model
//! of `apply_updates` are read "up to" the first tree's structure in the same way.

use pyo3::exceptions::{PyException, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyDict, PyList, PyTuple};
use std::sync::RwLock;

use crate::classify::{self, Globals};
use crate::dataclass::DataclassFields;
use crate::errors;
use crate::flatten::{self, Flattener};
use crate::key::Node;
use crate::rebuild;
use crate::Truthy;

/// How one filter_spec leaf sorts the leaves of its subtree.
enum Spec<'py> {
    Const(bool),
    /// `filterjax.is_array` or `equinox.is_array`: the native array test, no Python call.
    IsArray,
    Call(Bound<'py, PyAny>),
}

impl<'py> Spec<'py> {
    /// Equinox's rule for a filter_spec leaf: a bool, else a callable, else an error.
    fn of(spec: &Bound<'py, PyAny>) -> PyResult<Self> {
        if spec.is_instance_of::<PyBool>() {
            return Ok(Spec::Const(spec.is_truthy()?));
        }
        if !spec.is_callable() {
            return Err(bad_filter_spec(spec));
        }
        if is_array_predicate(spec)? {
            return Ok(Spec::IsArray);
        }
        Ok(Spec::Call(spec.clone()))
    }

    fn apply(self, f: &mut Flattener<'_, 'py>) {
        match self {
            Spec::Const(keep) => {
                f.constant = Some(keep);
                f.predicate = None;
            }
            Spec::IsArray => {
                f.constant = None;
                f.predicate = None;
            }
            Spec::Call(predicate) => {
                f.constant = None;
                f.predicate = Some(predicate);
            }
        }
    }
}

/// The public layer's array predicate (`filterjax.is_array`), registered by it at import
/// through `register_array_predicate`: the core imports nothing from the public layer.
static PUBLIC_IS_ARRAY: RwLock<Option<Py<PyAny>>> = RwLock::new(None);
static SYS_MODULES: PyOnceLock<Py<PyDict>> = PyOnceLock::new();

/// Make `predicate` a filter_spec the core answers with its own array test, without calling
/// it per leaf. It must answer exactly as `is_array` does. A later registration replaces it.
#[pyfunction]
fn register_array_predicate(predicate: &Bound<'_, PyAny>) -> PyResult<()> {
    if !predicate.is_callable() {
        return Err(PyTypeError::new_err(format!(
            "register_array_predicate expects a callable, got {}",
            predicate.get_type().name()?
        )));
    }
    let mut slot = PUBLIC_IS_ARRAY
        .write()
        .map_err(|_| PyRuntimeError::new_err("filterjax: array predicate lock poisoned"))?;
    *slot = Some(predicate.clone().unbind());
    Ok(())
}

/// `spec is filterjax.is_array or spec is equinox.is_array` (Equinox's answers the same; it
/// is looked up only if Equinox is imported, and only for callables that are not ours).
fn is_array_predicate(spec: &Bound<'_, PyAny>) -> PyResult<bool> {
    let py = spec.py();
    let registered = PUBLIC_IS_ARRAY
        .read()
        .map_err(|_| PyRuntimeError::new_err("filterjax: array predicate lock poisoned"))?
        .as_ref()
        .is_some_and(|public| spec.as_ptr() == public.as_ptr());
    if registered {
        return Ok(true);
    }
    let modules = SYS_MODULES.get_or_try_init(py, || {
        Ok::<_, PyErr>(
            py.import("sys")?
                .getattr("modules")?
                .cast_into::<PyDict>()?
                .unbind(),
        )
    })?;
    if let Some(equinox) = modules.bind(py).get_item("equinox")? {
        if let Ok(theirs) = equinox.getattr(pyo3::intern!(py, "is_array")) {
            return Ok(spec.is(&theirs));
        }
    }
    Ok(false)
}

/// Whether jax flattens `obj` as a node (None included) rather than as a leaf.
fn is_node(g: &Globals, obj: &Bound<'_, PyAny>) -> PyResult<bool> {
    let py = obj.py();
    if g.registry.bind(py).contains(obj.get_type())? {
        return Ok(true);
    }
    Ok(obj.is_instance_of::<PyTuple>() && flatten::has_fields(obj))
}

/// The leaves of `tree` at the leaf positions of `nodes` (post-order, as recorded by the
/// Flattener), checked as `PyTreeDef.flatten_up_to` checks them. `Ok(None)`: `tree` does not
/// have that structure.
///
/// Walks `nodes` backwards, which visits each node before its children and the children
/// last to first, with a stack of the matching objects of `tree`.
fn up_to<'py>(
    g: &Globals,
    nodes: &[Node],
    tree: &Bound<'py, PyAny>,
) -> PyResult<Option<Vec<Bound<'py, PyAny>>>> {
    let py = tree.py();
    let mut stack: Vec<Bound<'py, PyAny>> = vec![tree.clone()];
    let mut found: Vec<Bound<'py, PyAny>> = Vec::with_capacity(nodes.len());
    for node in nodes.iter().rev() {
        let Some(obj) = stack.pop() else {
            return Err(corrupt());
        };
        match node {
            Node::Leaf => found.push(obj),
            Node::None => {
                if !obj.is_none() {
                    return Ok(None);
                }
            }
            Node::Tuple(arity) => match obj.cast_exact::<PyTuple>() {
                Ok(t) if t.len() == *arity => stack.extend(t.iter()),
                _ => return Ok(None),
            },
            Node::List(arity) => match obj.cast_exact::<PyList>() {
                Ok(l) if l.len() == *arity => stack.extend(l.iter()),
                _ => return Ok(None),
            },
            Node::Dict { keys, arity } => {
                let Ok(dict) = obj.cast_exact::<PyDict>() else {
                    return Ok(None);
                };
                if !push_values(&mut stack, dict, keys.bind(py).iter(), *arity)? {
                    return Ok(None);
                }
            }
            Node::OrderedDict { keys, arity } => {
                if obj.get_type_ptr() != g.ordered_dict.as_ptr().cast() {
                    return Ok(None);
                }
                let own = PyTuple::new(py, obj.try_iter()?.collect::<PyResult<Vec<_>>>()?)?;
                let keys = keys.bind(py);
                if keys.ne(&own)? {
                    return Ok(None);
                }
                let dict = obj.cast::<PyDict>()?;
                if !push_values(&mut stack, dict, keys.iter(), *arity)? {
                    return Ok(None);
                }
            }
            Node::DefaultDict {
                factory,
                keys,
                arity,
            } => {
                if obj.get_type_ptr() != g.default_dict.as_ptr().cast() {
                    return Ok(None);
                }
                let dict = obj.cast::<PyDict>()?;
                let sorted = dict.keys();
                sorted.sort()?;
                let theirs = (
                    obj.getattr(pyo3::intern!(py, "default_factory"))?,
                    sorted.to_tuple(),
                );
                let keys = keys.bind(py);
                if (factory.bind(py), keys).into_pyobject(py)?.ne(theirs)? {
                    return Ok(None);
                }
                if !push_values(&mut stack, dict, keys.iter(), *arity)? {
                    return Ok(None);
                }
            }
            Node::NamedTuple { kind, arity } => {
                if !obj.get_type().is(kind.bind(py)) {
                    return Ok(None);
                }
                match obj.cast::<PyTuple>() {
                    Ok(t) if t.len() == *arity => stack.extend(t.iter()),
                    _ => return Ok(None),
                }
            }
            Node::Custom {
                kind,
                aux,
                arity,
                from_iter,
            } => {
                let kind = kind.bind(py);
                if !obj.get_type().is(kind) {
                    return Ok(None);
                }
                if let Ok(fields) = from_iter.bind(py).cast_exact::<DataclassFields>() {
                    let fields = fields.get();
                    if aux.bind(py).ne(fields.meta(&obj)?)? || fields.num_data() != *arity {
                        return Ok(None);
                    }
                    for index in 0..*arity {
                        stack.push(fields.child(&obj, index)?);
                    }
                    continue;
                }
                let Some(entry) = g.registry.bind(py).get_item(kind)? else {
                    return Ok(None);
                };
                let (to_iter, _) = flatten::registry_functions(&entry)?;
                let result = to_iter.call1((&obj,))?;
                let pair = match result.cast::<PyTuple>() {
                    Ok(pair) if pair.len() == 2 => pair,
                    _ => return Err(errors::malformed_flatten(&result)),
                };
                if aux.bind(py).ne(pair.get_item(1)?)? {
                    return Ok(None);
                }
                let children = pair
                    .get_item(0)?
                    .try_iter()?
                    .collect::<PyResult<Vec<_>>>()?;
                if children.len() != *arity {
                    return Ok(None);
                }
                stack.extend(children);
            }
        }
    }
    if !stack.is_empty() {
        return Err(corrupt());
    }
    found.reverse();
    Ok(Some(found))
}

/// Push `dict[k]` for each of `keys` (in order); false if the key sets differ.
fn push_values<'py>(
    stack: &mut Vec<Bound<'py, PyAny>>,
    dict: &Bound<'py, PyDict>,
    keys: impl Iterator<Item = Bound<'py, PyAny>>,
    arity: usize,
) -> PyResult<bool> {
    if dict.len() != arity {
        return Ok(false);
    }
    for key in keys {
        // `PyDict_GetItem`: no `__missing__`, so a defaultdict is not changed by the lookup.
        match dict.get_item(&key)? {
            Some(value) => stack.push(value),
            None => return Ok(false),
        }
    }
    Ok(true)
}

fn corrupt() -> PyErr {
    PyRuntimeError::new_err("filterjax: inconsistent PyTree structure")
}

/// A PyTree flattened and sorted by a filter_spec.
struct Split<'py> {
    nodes: Vec<Node>,
    dynamic: Vec<Bound<'py, PyAny>>,
    statics: Vec<Bound<'py, PyAny>>,
    mask: Vec<bool>,
}

impl<'py> Split<'py> {
    fn of(f: Flattener<'_, 'py>, nodes: Vec<Node>) -> Self {
        Split {
            nodes,
            dynamic: f.dynamic,
            statics: f.statics,
            mask: f.mask,
        }
    }

    /// The tree with the matching leaves kept (`keep_matching`) or the others kept, and
    /// `replace` everywhere else.
    fn build(
        &self,
        keep_matching: bool,
        replace: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let mut mask = self.mask.iter();
        let mut dynamic = self.dynamic.iter();
        let mut statics = self.statics.iter();
        rebuild::unflatten(replace.py(), &self.nodes, || {
            let (leaf, keep) = match mask.next() {
                Some(true) => (dynamic.next(), keep_matching),
                Some(false) => (statics.next(), !keep_matching),
                None => (None, false),
            };
            match leaf {
                Some(leaf) if keep => Ok(leaf.clone()),
                Some(_) => Ok(replace.clone()),
                None => Err(corrupt()),
            }
        })
    }
}

/// Flatten `pytree` and sort its leaves by `filter_spec`, as `equinox.partition` does.
fn split<'py>(
    pytree: &Bound<'py, PyAny>,
    filter_spec: &Bound<'py, PyAny>,
    is_leaf: Option<&Bound<'py, PyAny>>,
) -> PyResult<Split<'py>> {
    let py = pytree.py();
    let g = classify::globals(py)?;
    let mut f = Flattener::new(py, g, is_leaf);
    if !is_node(g, filter_spec)? {
        Spec::of(filter_spec)?.apply(&mut f);
        if let Err(stop) = f.run(pytree) {
            return Err(errors::flatten_failed(py, pytree, is_leaf, stop));
        }
        if let Some(err) = f.pending.take() {
            return Err(predicate_failed(err, pytree, f.mask.len(), is_leaf));
        }
        let nodes = std::mem::take(&mut f.nodes);
        return Ok(Split::of(f, nodes));
    }

    // A filter_spec PyTree: its leaves, and the subtrees of `pytree` they stand for.
    let mut specs = Flattener::new(py, g, None);
    specs.constant = Some(true);
    if let Err(stop) = specs.run(filter_spec) {
        return Err(errors::flatten_failed(py, filter_spec, None, stop));
    }
    let subtrees = match up_to(g, &specs.nodes, pytree) {
        Ok(Some(subtrees)) => subtrees,
        Ok(None) => {
            return Err(structure_error(
                "filter_spec",
                filter_spec,
                pytree,
                None,
                0,
                None,
            ))
        }
        Err(err) => {
            return Err(structure_error(
                "filter_spec",
                filter_spec,
                pytree,
                None,
                0,
                Some(err),
            ))
        }
    };
    let mut sizes = Vec::with_capacity(subtrees.len());
    for (spec, subtree) in specs.dynamic.iter().zip(&subtrees) {
        Spec::of(spec)?.apply(&mut f);
        let before = f.nodes.len();
        if let Err(stop) = f.run(subtree) {
            return Err(errors::flatten_failed(py, pytree, is_leaf, stop));
        }
        if let Some(err) = f.pending.take() {
            return Err(predicate_failed(err, pytree, f.mask.len(), is_leaf));
        }
        sizes.push(f.nodes.len() - before);
    }
    // The filter_spec's structure with each of its leaves replaced by its subtree's.
    let mut inner = std::mem::take(&mut f.nodes).into_iter();
    let mut sizes = sizes.into_iter();
    let mut nodes = Vec::with_capacity(specs.nodes.len() + inner.len());
    for node in specs.nodes.drain(..) {
        if matches!(node, Node::Leaf) {
            let size = sizes.next().ok_or_else(corrupt)?;
            nodes.extend(inner.by_ref().take(size));
        } else {
            nodes.push(node);
        }
    }
    Ok(Split::of(f, nodes))
}

fn replacement<'py>(py: Python<'py>, replace: Option<&Bound<'py, PyAny>>) -> Bound<'py, PyAny> {
    match replace {
        Some(replace) => replace.clone(),
        None => py.None().into_bound(py),
    }
}

/// `equinox.partition(pytree, filter_spec, replace, is_leaf)`.
#[pyfunction]
#[pyo3(signature = (pytree, filter_spec, replace=None, is_leaf=None))]
fn tree_partition<'py>(
    py: Python<'py>,
    pytree: &Bound<'py, PyAny>,
    filter_spec: &Bound<'py, PyAny>,
    replace: Option<&Bound<'py, PyAny>>,
    is_leaf: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyTuple>> {
    let is_leaf = is_leaf.filter(|f| !f.is_none());
    let split = split(pytree, filter_spec, is_leaf)?;
    let replace = replacement(py, replace);
    let left = split.build(true, &replace)?;
    let right = split.build(false, &replace)?;
    PyTuple::new(py, [left, right])
}

/// `equinox.filter(pytree, filter_spec, inverse, replace, is_leaf)`.
#[pyfunction]
#[pyo3(
    signature = (pytree, filter_spec, inverse=Truthy(false), replace=None, is_leaf=None),
    text_signature = "(pytree, filter_spec, inverse=False, replace=None, is_leaf=None)"
)]
fn tree_filter<'py>(
    py: Python<'py>,
    pytree: &Bound<'py, PyAny>,
    filter_spec: &Bound<'py, PyAny>,
    inverse: Truthy,
    replace: Option<&Bound<'py, PyAny>>,
    is_leaf: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let inverse = inverse.0;
    let is_leaf = is_leaf.filter(|f| !f.is_none());
    let split = split(pytree, filter_spec, is_leaf)?;
    split.build(!inverse, &replacement(py, replace))
}

/// `equinox.combine(*pytrees, is_leaf=is_leaf)`.
#[pyfunction]
#[pyo3(signature = (pytrees, is_leaf=None))]
fn tree_combine<'py>(
    py: Python<'py>,
    pytrees: &Bound<'py, PyTuple>,
    is_leaf: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    if pytrees.is_empty() {
        return Err(PyTypeError::new_err("combine needs at least one PyTree"));
    }
    let is_leaf = is_leaf.filter(|f| !f.is_none());
    let g = classify::globals(py)?;
    let first = pytrees.get_item(0)?;
    let mut f = Flattener::new(py, g, is_leaf);
    f.constant = Some(true);
    f.none_is_leaf = true;
    if let Err(stop) = f.run(&first) {
        return Err(errors::flatten_failed(py, &first, is_leaf, stop));
    }
    let mut leaves = std::mem::take(&mut f.dynamic);
    for index in 1..pytrees.len() {
        let tree = pytrees.get_item(index)?;
        let others = match up_to(g, &f.nodes, &tree) {
            Ok(Some(others)) => others,
            Ok(None) => {
                return Err(structure_error(
                    "combine", &first, &tree, is_leaf, index, None,
                ))
            }
            Err(err) => {
                return Err(structure_error(
                    "combine",
                    &first,
                    &tree,
                    is_leaf,
                    index,
                    Some(err),
                ))
            }
        };
        for (slot, other) in leaves.iter_mut().zip(others) {
            if slot.is_none() {
                *slot = other;
            }
        }
    }
    let mut leaves = leaves.into_iter();
    rebuild::unflatten(py, &f.nodes, || leaves.next().ok_or_else(corrupt))
}

/// `equinox.apply_updates(model, updates)`.
#[pyfunction]
fn tree_apply_updates<'py>(
    py: Python<'py>,
    model: &Bound<'py, PyAny>,
    updates: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let g = classify::globals(py)?;
    let mut f = Flattener::new(py, g, None);
    f.constant = Some(true);
    f.none_is_leaf = true;
    if let Err(stop) = f.run(updates) {
        return Err(errors::flatten_failed(py, updates, None, stop));
    }
    let leaves = match up_to(g, &f.nodes, model) {
        Ok(Some(leaves)) => leaves,
        Ok(None) => return Err(structure_error("updates", updates, model, None, 0, None)),
        Err(err) => {
            return Err(structure_error(
                "updates",
                updates,
                model,
                None,
                0,
                Some(err),
            ))
        }
    };
    let mut values = Vec::with_capacity(leaves.len());
    for (delta, leaf) in f.dynamic.iter().zip(leaves) {
        values.push(if delta.is_none() {
            leaf
        } else {
            leaf.add(delta)?
        });
    }
    let mut values = values.into_iter();
    rebuild::unflatten(py, &f.nodes, || values.next().ok_or_else(corrupt))
}

// --------------------------------------------------------------------------------------------
// Error paths: the messages come from filterjax._diagnose, as in the Python twin
// --------------------------------------------------------------------------------------------

fn diagnose<'py>(py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
    py.import("filterjax._diagnose")?.getattr(name)
}

fn bad_filter_spec(spec: &Bound<'_, PyAny>) -> PyErr {
    match diagnose(spec.py(), "bad_filter_spec").and_then(|f| f.call1((spec,))) {
        Ok(exc) => PyErr::from_value(exc),
        Err(err) => err,
    }
}

/// `tree` does not fit `prefix`: `raise_structure_error` names where. `original` is what
/// went wrong while reading `tree`, if anything was raised.
fn structure_error(
    kind: &str,
    prefix: &Bound<'_, PyAny>,
    tree: &Bound<'_, PyAny>,
    is_leaf: Option<&Bound<'_, PyAny>>,
    index: usize,
    original: Option<PyErr>,
) -> PyErr {
    let py = tree.py();
    let original = match original {
        Some(err) if !err.is_instance_of::<PyException>(py) => return err,
        Some(err) => err,
        None => PyValueError::new_err(format!("{kind}: the PyTree structures do not match")),
    };
    let raised = diagnose(py, "raise_structure_error")
        .and_then(|f| f.call1((kind, prefix, tree, is_leaf, index, original.into_value(py))));
    match raised {
        Err(err) => err,
        Ok(_) => PyRuntimeError::new_err("filterjax: raise_structure_error returned normally"),
    }
}

/// A filter_spec callable raised on the `index`-th leaf: keep its error, noting the path.
fn predicate_failed(
    err: PyErr,
    tree: &Bound<'_, PyAny>,
    index: usize,
    is_leaf: Option<&Bound<'_, PyAny>>,
) -> PyErr {
    let py = tree.py();
    if err.is_instance_of::<PyException>(py) {
        // The note is a courtesy: failing to add it must not replace the user's exception.
        let _ = diagnose(py, "note_predicate_error")
            .and_then(|f| f.call1((err.value(py), tree, index, is_leaf)));
    }
    err
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(tree_partition, m)?)?;
    m.add_function(wrap_pyfunction!(tree_filter, m)?)?;
    m.add_function(wrap_pyfunction!(tree_combine, m)?)?;
    m.add_function(wrap_pyfunction!(tree_apply_updates, m)?)?;
    m.add_function(wrap_pyfunction!(register_array_predicate, m)?)?;
    Ok(())
}
