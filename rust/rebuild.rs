//! `rebuild`: the inverse of `flatten_split`, built like `PyTreeDef.unflatten` (a post-order
//! walk over the nodes with a stack of finished subtrees; no recursion).

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};

use crate::classify;
use crate::dataclass::DataclassFields;
use crate::key::{Node, StaticKey};

/// A sequence of leaves, read by index.
enum Leaves<'py> {
    Tuple(Bound<'py, PyTuple>),
    List(Bound<'py, PyList>),
}

impl<'py> Leaves<'py> {
    /// Lists and tuples are read in place; anything else is iterated once into a list.
    fn of(obj: &Bound<'py, PyAny>) -> PyResult<Self> {
        if let Ok(t) = obj.cast_exact::<PyTuple>() {
            return Ok(Leaves::Tuple(t.clone()));
        }
        if let Ok(l) = obj.cast_exact::<PyList>() {
            return Ok(Leaves::List(l.clone()));
        }
        let items = obj.try_iter()?.collect::<PyResult<Vec<_>>>()?;
        Ok(Leaves::List(PyList::new(obj.py(), items)?))
    }

    #[inline]
    fn get(&self, i: usize) -> PyResult<Bound<'py, PyAny>> {
        match self {
            Leaves::Tuple(t) => t.get_item(i),
            Leaves::List(l) => l.get_item(i),
        }
    }
}

fn children_tuple<'py>(
    py: Python<'py>,
    agenda: &mut Vec<Bound<'py, PyAny>>,
    arity: usize,
) -> PyResult<Bound<'py, PyTuple>> {
    let start = agenda.len() - arity;
    PyTuple::new(py, agenda.drain(start..))
}

pub fn rebuild<'py>(
    py: Python<'py>,
    key: &Bound<'py, PyAny>,
    dynamic: &Bound<'py, PyAny>,
    statics: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let Ok(key) = key.cast_exact::<StaticKey>() else {
        return Err(PyTypeError::new_err(format!(
            "rebuild expects a StaticKey, got {}",
            key.get_type().name()?
        )));
    };
    let key = key.get();
    let statics = match statics {
        Some(s) => s.clone(),
        None => key.statics.bind(py).clone().into_any(),
    };
    let num_static = key.mask.len() - key.num_dynamic;
    let given = dynamic.len()?;
    if given != key.num_dynamic {
        return Err(PyValueError::new_err(format!(
            "rebuild: the key has {} dynamic leaves but {} were given",
            key.num_dynamic, given
        )));
    }
    let given = statics.len()?;
    if given != num_static {
        return Err(PyValueError::new_err(format!(
            "rebuild: the key has {num_static} static leaves but {given} were given"
        )));
    }
    let dynamic = Leaves::of(dynamic)?;
    let statics = Leaves::of(&statics)?;
    let (mut leaf, mut next_dynamic, mut next_static) = (0usize, 0usize, 0usize);
    unflatten(py, &key.nodes, || {
        let is_dynamic = key.mask.get(leaf).copied().unwrap_or(false);
        leaf += 1;
        if is_dynamic {
            next_dynamic += 1;
            dynamic.get(next_dynamic - 1)
        } else {
            next_static += 1;
            statics.get(next_static - 1)
        }
    })
}

/// Build the tree described by `nodes` (post-order), taking each leaf from `next_leaf`,
/// called once per leaf in order.
pub(crate) fn unflatten<'py>(
    py: Python<'py>,
    nodes: &[Node],
    mut next_leaf: impl FnMut() -> PyResult<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let g = classify::globals(py)?;
    let mut agenda: Vec<Bound<'py, PyAny>> = Vec::with_capacity(16);
    for node in nodes {
        let arity = node.arity();
        if arity > agenda.len() {
            return Err(PyRuntimeError::new_err("filterjax: corrupt StaticKey"));
        }
        let built = match node {
            Node::Leaf => next_leaf()?,
            Node::None => py.None().into_bound(py),
            Node::Tuple(n) => children_tuple(py, &mut agenda, *n)?.into_any(),
            Node::List(n) => {
                let start = agenda.len() - n;
                PyList::new(py, agenda.drain(start..))?.into_any()
            }
            Node::Dict { keys, arity } => {
                let dict = PyDict::new(py);
                let start = agenda.len() - arity;
                for (k, v) in keys.bind(py).iter().zip(agenda.drain(start..)) {
                    dict.set_item(k, v)?;
                }
                dict.into_any()
            }
            Node::OrderedDict { keys, arity } => {
                let od = g.ordered_dict.bind(py).call0()?;
                let start = agenda.len() - arity;
                for (k, v) in keys.bind(py).iter().zip(agenda.drain(start..)) {
                    // `OrderedDict.__setitem__`, which keeps its own order.
                    od.set_item(k, v)?;
                }
                od
            }
            Node::DefaultDict {
                factory,
                keys,
                arity,
            } => {
                let dd = g.default_dict.bind(py).call1((factory.bind(py),))?;
                let start = agenda.len() - arity;
                for (k, v) in keys.bind(py).iter().zip(agenda.drain(start..)) {
                    dd.set_item(k, v)?;
                }
                dd
            }
            Node::NamedTuple { kind, arity } => {
                let children = children_tuple(py, &mut agenda, *arity)?;
                kind.bind(py).call1(children)?
            }
            Node::Custom {
                kind,
                aux,
                from_iter,
                arity,
            } => {
                let from_iter = from_iter.bind(py);
                if let Ok(fields) = from_iter.cast_exact::<DataclassFields>() {
                    let start = agenda.len() - arity;
                    let built =
                        fields
                            .get()
                            .build(kind.bind(py), aux.bind(py), &agenda[start..])?;
                    agenda.truncate(start);
                    built
                } else {
                    let children = children_tuple(py, &mut agenda, *arity)?;
                    from_iter.call1((aux.bind(py), children))?
                }
            }
        };
        agenda.push(built);
    }
    match (agenda.pop(), agenda.is_empty()) {
        (Some(tree), true) => Ok(tree),
        _ => Err(PyRuntimeError::new_err("filterjax: corrupt StaticKey")),
    }
}
