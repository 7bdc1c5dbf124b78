//! `StaticKey`: the structure of a partitioned PyTree, its static leaves and its mask.

use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::OnceLock;

use pyo3::basic::CompareOp;
use pyo3::gc::PyVisit;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyList, PyTuple, PyType};
use pyo3::PyTraverseError;

use crate::classify;
use crate::errors;
use crate::shallow::ShallowCall;

/// One node of the flattened structure, in post-order (children before their parent), the
/// order `jax.tree_util.PyTreeDef` keeps.
pub enum Node {
    Leaf,
    None,
    Tuple(usize),
    List(usize),
    /// A `dict`: its keys, sorted.
    Dict {
        keys: Py<PyList>,
        arity: usize,
    },
    /// An `OrderedDict`: its keys in order (jax's node data).
    OrderedDict {
        keys: Py<PyTuple>,
        arity: usize,
    },
    /// A `defaultdict`: jax's node data is `(default_factory, sorted keys)`.
    DefaultDict {
        factory: Py<PyAny>,
        keys: Py<PyTuple>,
        arity: usize,
    },
    NamedTuple {
        kind: Py<PyType>,
        arity: usize,
    },
    /// Any type registered with `jax.tree_util`.
    Custom {
        kind: Py<PyType>,
        aux: Py<PyAny>,
        from_iter: Py<PyAny>,
        arity: usize,
    },
}

impl Node {
    #[inline]
    pub fn arity(&self) -> usize {
        match self {
            Node::Leaf | Node::None => 0,
            Node::Tuple(n) | Node::List(n) => *n,
            Node::Dict { arity, .. }
            | Node::OrderedDict { arity, .. }
            | Node::DefaultDict { arity, .. }
            | Node::NamedTuple { arity, .. }
            | Node::Custom { arity, .. } => *arity,
        }
    }

    /// A copy of this node holding new references to the same objects.
    pub fn clone_ref(&self, py: Python<'_>) -> Node {
        match self {
            Node::Leaf => Node::Leaf,
            Node::None => Node::None,
            Node::Tuple(n) => Node::Tuple(*n),
            Node::List(n) => Node::List(*n),
            Node::Dict { keys, arity } => Node::Dict {
                keys: keys.clone_ref(py),
                arity: *arity,
            },
            Node::OrderedDict { keys, arity } => Node::OrderedDict {
                keys: keys.clone_ref(py),
                arity: *arity,
            },
            Node::DefaultDict {
                factory,
                keys,
                arity,
            } => Node::DefaultDict {
                factory: factory.clone_ref(py),
                keys: keys.clone_ref(py),
                arity: *arity,
            },
            Node::NamedTuple { kind, arity } => Node::NamedTuple {
                kind: kind.clone_ref(py),
                arity: *arity,
            },
            Node::Custom {
                kind,
                aux,
                from_iter,
                arity,
            } => Node::Custom {
                kind: kind.clone_ref(py),
                aux: aux.clone_ref(py),
                from_iter: from_iter.clone_ref(py),
                arity: *arity,
            },
        }
    }

    fn tag(&self) -> u64 {
        match self {
            Node::Leaf => 1,
            Node::None => 2,
            Node::Tuple(_) => 3,
            Node::List(_) => 4,
            Node::Dict { .. } => 5,
            Node::OrderedDict { .. } => 6,
            Node::DefaultDict { .. } => 7,
            Node::NamedTuple { .. } => 8,
            Node::Custom { .. } => 9,
        }
    }

    /// `(type, node_data)` as `PyTreeDef.node_data()` gives it, for `__repr__`.
    fn node_data<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let g = classify::globals(py)?;
        let pair = |kind: Bound<'py, PyAny>, data: Bound<'py, PyAny>| -> PyResult<_> {
            Ok(Some(PyTuple::new(py, [kind, data])?.into_any()))
        };
        let none = || py.None().into_bound(py);
        match self {
            Node::Leaf => Ok(None),
            Node::None => pair(py.None().into_bound(py).get_type().into_any(), none()),
            Node::Tuple(_) => pair(py.get_type::<PyTuple>().into_any(), none()),
            Node::List(_) => pair(py.get_type::<PyList>().into_any(), none()),
            Node::Dict { keys, .. } => pair(
                py.get_type::<pyo3::types::PyDict>().into_any(),
                keys.bind(py).clone().into_any(),
            ),
            Node::OrderedDict { keys, .. } => pair(
                g.ordered_dict.bind(py).clone().into_any(),
                keys.bind(py).clone().into_any(),
            ),
            Node::DefaultDict { factory, keys, .. } => pair(
                g.default_dict.bind(py).clone().into_any(),
                PyTuple::new(py, [factory.bind(py), keys.bind(py).as_any()])?.into_any(),
            ),
            Node::NamedTuple { kind, .. } => pair(kind.bind(py).clone().into_any(), none()),
            Node::Custom { kind, aux, .. } => {
                pair(kind.bind(py).clone().into_any(), aux.bind(py).clone())
            }
        }
    }
}

/// `PyObject_RichCompareBool(a, b, Py_EQ)`: identity first, then `==`.
#[inline]
pub fn same_or_equal(a: &Bound<'_, PyAny>, b: &Bound<'_, PyAny>) -> PyResult<bool> {
    if a.is(b) {
        return Ok(true);
    }
    a.eq(b)
}

/// Does the node data of two nodes of the same kind, type and arity compare equal?
fn node_data_equal(py: Python<'_>, a: &Node, b: &Node) -> PyResult<bool> {
    // jax compares custom metadata inside a guard that rewraps errors; dict keys are
    // compared bare.
    let guarded = |r: PyResult<bool>| r.map_err(|e| errors::metadata_equality(py, e));
    match (a, b) {
        (Node::Dict { keys: ka, .. }, Node::Dict { keys: kb, .. }) => {
            let (ka, kb) = (ka.bind(py), kb.bind(py));
            for (x, y) in ka.iter().zip(kb.iter()) {
                if !same_or_equal(&x, &y)? {
                    return Ok(false);
                }
            }
            Ok(true)
        }
        (Node::OrderedDict { keys: ka, .. }, Node::OrderedDict { keys: kb, .. }) => {
            guarded(same_or_equal(ka.bind(py).as_any(), kb.bind(py).as_any()))
        }
        (
            Node::DefaultDict {
                factory: fa,
                keys: ka,
                ..
            },
            Node::DefaultDict {
                factory: fb,
                keys: kb,
                ..
            },
        ) => guarded((|| {
            Ok(same_or_equal(fa.bind(py), fb.bind(py))?
                && same_or_equal(ka.bind(py).as_any(), kb.bind(py).as_any())?)
        })()),
        (Node::NamedTuple { kind: ta, .. }, Node::NamedTuple { kind: tb, .. }) => {
            guarded(same_or_equal(ta.bind(py).as_any(), tb.bind(py).as_any()))
        }
        (
            Node::Custom {
                kind: ta, aux: xa, ..
            },
            Node::Custom {
                kind: tb, aux: xb, ..
            },
        ) => {
            if !ta.is(tb) {
                return Ok(false);
            }
            guarded(same_or_equal(xa.bind(py), xb.bind(py)))
        }
        _ => Ok(true),
    }
}

const HASH_UNSET: isize = -1;

/// A small multiply-xorshift combiner; only consistency with `__eq__` matters.
#[inline]
fn mix(h: u64, v: u64) -> u64 {
    (h ^ v).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29)
}

/// The hash of a key made of these parts: node kinds, arities, dict keys, node types, the
/// mask and every static leaf; never custom aux data (jax does not require it to be
/// hashable). `static_at(i)` gives the `i`-th of `num_statics` static leaves; their own
/// hashes are left in `static_hashes`.
pub fn hash_parts<'py>(
    py: Python<'py>,
    nodes: &[Node],
    mask: &[bool],
    num_statics: usize,
    static_at: impl Fn(usize) -> PyResult<Bound<'py, PyAny>>,
    static_hashes: &mut Vec<isize>,
) -> Result<isize, HashFailure> {
    static_hashes.clear();
    let mut h: u64 = 0x2545_F491_4F6C_DD1D ^ nodes.len() as u64;
    let hash_of = |obj: &Bound<'_, PyAny>| -> u64 {
        // Dict keys are hashable (they are in a dict); should one still fail, leave it
        // out rather than fail: equal keys then still collide, which is allowed.
        obj.hash().map(|v| v as u64).unwrap_or(0)
    };
    for node in nodes {
        h = mix(h, node.tag() | (node.arity() as u64) << 8);
        match node {
            Node::Dict { keys, .. } => {
                for k in keys.bind(py).iter() {
                    h = mix(h, hash_of(&k));
                }
            }
            Node::OrderedDict { keys, .. } | Node::DefaultDict { keys, .. } => {
                for k in keys.bind(py).iter() {
                    h = mix(h, hash_of(&k));
                }
            }
            Node::NamedTuple { kind, .. } => h = mix(h, hash_of(kind.bind(py).as_any())),
            Node::Custom { kind, .. } => h = mix(h, kind.as_ptr() as u64),
            _ => {}
        }
    }
    let mut bits: u64 = 0;
    for (i, &m) in mask.iter().enumerate() {
        bits = (bits << 1) | m as u64;
        if i % 64 == 63 {
            h = mix(h, bits);
            bits = 0;
        }
    }
    h = mix(h, bits ^ mask.len() as u64);
    for static_index in 0..num_statics {
        let hashed = static_at(static_index).and_then(|leaf| leaf.hash());
        match hashed {
            Ok(v) => {
                static_hashes.push(v);
                h = mix(h, v as u64);
            }
            Err(err) => return Err(HashFailure { static_index, err }),
        }
    }
    let out = (h ^ (h >> 32)) as isize;
    Ok(if out == HASH_UNSET { -2 } else { out })
}

/// Are two nodes the same (kind, arity, node data)?
#[inline]
pub fn node_equal(py: Python<'_>, a: &Node, b: &Node) -> PyResult<bool> {
    if a.tag() != b.tag() || a.arity() != b.arity() {
        return Ok(false);
    }
    node_data_equal(py, a, b)
}

/// Do two nodes sequences describe the same structure (kinds, arities, node data)?
fn nodes_equal(py: Python<'_>, a: &[Node], b: &[Node]) -> PyResult<bool> {
    if a.len() != b.len() {
        return Ok(false);
    }
    for (x, y) in a.iter().zip(b.iter()) {
        if !node_equal(py, x, y)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Everything about a partitioned PyTree except its dynamic leaves.
///
/// Immutable. Equal structure and equal, same-typed static leaves give equal keys with
/// equal hashes.
#[pyclass(frozen, module = "filterjax._native", name = "StaticKey")]
pub struct StaticKey {
    pub nodes: Vec<Node>,
    pub statics: Py<PyTuple>,
    pub mask: Vec<bool>,
    pub num_dynamic: usize,
    hash: AtomicIsize,
    /// The hash of each static leaf when the key was hashed. A leaf changed in place since
    /// then (a mutable object that hashes by value) no longer matches it.
    static_hashes: OnceLock<Box<[isize]>>,
    mask_tuple: PyOnceLock<Py<PyTuple>>,
    /// The key read as a shallow call, if it is one (see shallow.rs), once asked for.
    shallow: OnceLock<Option<ShallowCall>>,
}

/// Why hashing a key failed: the static leaf (index among the statics) and its error.
pub struct HashFailure {
    pub static_index: usize,
    pub err: PyErr,
}

impl StaticKey {
    pub fn new(
        nodes: Vec<Node>,
        statics: Py<PyTuple>,
        mask: Vec<bool>,
        num_dynamic: usize,
    ) -> Self {
        StaticKey {
            nodes,
            statics,
            mask,
            num_dynamic,
            hash: AtomicIsize::new(HASH_UNSET),
            static_hashes: OnceLock::new(),
            mask_tuple: PyOnceLock::new(),
            shallow: OnceLock::new(),
        }
    }

    #[inline]
    pub(crate) fn cached_hash(&self) -> Option<isize> {
        let h = self.hash.load(Ordering::Relaxed);
        (h != HASH_UNSET).then_some(h)
    }

    /// The key's hash, computed once (see `hash_parts`).
    pub fn compute_hash(&self, py: Python<'_>) -> Result<isize, HashFailure> {
        if let Some(h) = self.cached_hash() {
            return Ok(h);
        }
        let statics = self.statics.bind(py);
        let mut static_hashes = Vec::with_capacity(statics.len());
        let out = hash_parts(
            py,
            &self.nodes,
            &self.mask,
            statics.len(),
            |i| statics.get_item(i),
            &mut static_hashes,
        )?;
        let _ = self.static_hashes.set(static_hashes.into_boxed_slice());
        self.hash.store(out, Ordering::Relaxed);
        Ok(out)
    }

    /// This key as a shallow call, if it is one.
    #[inline]
    pub(crate) fn shallow(&self) -> Option<&ShallowCall> {
        self.shallow.get_or_init(|| ShallowCall::of(self)).as_ref()
    }

    /// The static leaves' hashes, once the key has been hashed.
    #[inline]
    pub(crate) fn static_hashes(&self) -> Option<&[isize]> {
        self.static_hashes.get().map(|h| &h[..])
    }

    /// A key of these parts whose hash is already known (`hash_parts` of the same parts,
    /// which gave `static_hashes`).
    pub fn with_hash(
        nodes: Vec<Node>,
        statics: Py<PyTuple>,
        mask: Vec<bool>,
        num_dynamic: usize,
        hash: isize,
        static_hashes: Vec<isize>,
    ) -> Self {
        let key = StaticKey::new(nodes, statics, mask, num_dynamic);
        let _ = key.static_hashes.set(static_hashes.into_boxed_slice());
        key.hash.store(hash, Ordering::Relaxed);
        key
    }

    /// Index among all leaves of the `static_index`-th static leaf.
    pub fn leaf_index_of_static(&self, static_index: usize) -> usize {
        self.mask
            .iter()
            .enumerate()
            .filter(|(_, &dynamic)| !dynamic)
            .nth(static_index)
            .map(|(i, _)| i)
            .unwrap_or(0)
    }

    fn equal(&self, py: Python<'_>, other: &StaticKey) -> PyResult<bool> {
        if std::ptr::eq(self, other) {
            return Ok(true);
        }
        if let (Some(a), Some(b)) = (self.cached_hash(), other.cached_hash()) {
            if a != b {
                return Ok(false);
            }
        }
        let other_statics = other.statics.bind(py);
        self.equal_to_parts(py, &other.nodes, &other.mask, other_statics.len(), |i| {
            other_statics.get_item(i)
        })
    }

    /// Would a key of these parts compare equal to this one? The same test as `==`
    /// between keys (mask, static types, structure, then each static leaf with `==`), for
    /// parts not (yet) made into a key. `static_at(i)` gives the `i`-th of `num_statics`
    /// static leaves.
    pub fn equal_to_parts<'py>(
        &self,
        py: Python<'py>,
        nodes: &[Node],
        mask: &[bool],
        num_statics: usize,
        static_at: impl Fn(usize) -> PyResult<Bound<'py, PyAny>>,
    ) -> PyResult<bool> {
        if self.mask != mask {
            return Ok(false);
        }
        let own = self.statics.bind(py);
        if own.len() != num_statics {
            return Ok(false);
        }
        for (i, x) in own.iter().enumerate() {
            if x.get_type_ptr() != static_at(i)?.get_type_ptr() {
                return Ok(false);
            }
        }
        if !nodes_equal(py, &self.nodes, nodes)? {
            return Ok(false);
        }
        for (index, x) in own.iter().enumerate() {
            let y = static_at(index)?;
            let equal = same_or_equal(&x, &y)
                .inspect_err(|err| errors::static_equality(py, err, index, &x));
            if !equal? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The structure as a real `PyTreeDef` (only for `__repr__`).
    fn treedef<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let g = classify::globals(py)?;
        let make = g.treedef_from_node.bind(py);
        let registry = g.default_registry.bind(py);
        let mut agenda: Vec<Bound<'py, PyAny>> = Vec::new();
        for node in &self.nodes {
            let arity = node.arity();
            if arity > agenda.len() {
                return Err(pyo3::exceptions::PyRuntimeError::new_err(
                    "corrupt StaticKey",
                ));
            }
            let children = PyList::new(py, agenda.drain(agenda.len() - arity..))?;
            agenda.push(make.call1((registry, node.node_data(py)?, children))?);
        }
        agenda
            .pop()
            .ok_or_else(|| pyo3::exceptions::PyRuntimeError::new_err("corrupt StaticKey"))
    }
}

#[pymethods]
impl StaticKey {
    /// Number of leaves, dynamic and static.
    #[getter]
    fn num_leaves(&self) -> usize {
        self.mask.len()
    }

    /// Number of dynamic leaves.
    #[getter]
    fn num_dynamic(&self) -> usize {
        self.num_dynamic
    }

    /// Number of static leaves.
    #[getter]
    fn num_static(&self) -> usize {
        self.mask.len() - self.num_dynamic
    }

    /// The static leaves, in leaf order.
    #[getter]
    fn statics<'py>(&self, py: Python<'py>) -> Bound<'py, PyTuple> {
        self.statics.bind(py).clone()
    }

    /// One bool per leaf, True where the leaf is dynamic.
    #[getter]
    fn mask<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        let t = self
            .mask_tuple
            .get_or_try_init(py, || PyTuple::new(py, self.mask.iter()).map(Bound::unbind))?;
        Ok(t.bind(py).clone())
    }

    fn __hash__(&self, py: Python<'_>) -> PyResult<isize> {
        self.compute_hash(py).map_err(|f| f.err)
    }

    fn __richcmp__(
        slf: &Bound<'_, Self>,
        other: &Bound<'_, PyAny>,
        op: CompareOp,
    ) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let eq = match op {
            CompareOp::Eq => true,
            CompareOp::Ne => false,
            _ => return Ok(py.NotImplemented()),
        };
        let Ok(other) = other.cast_exact::<StaticKey>() else {
            return Ok(py.NotImplemented());
        };
        let equal = slf.get().equal(py, other.get())?;
        Ok(pyo3::types::PyBool::new(py, equal == eq)
            .to_owned()
            .into_any()
            .unbind())
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let structure = match self.treedef(py) {
            Ok(t) => t.str()?.to_string(),
            Err(_) => format!("<{} nodes>", self.nodes.len()),
        };
        Ok(format!(
            "StaticKey({}, statics={}, num_dynamic={})",
            structure,
            self.statics.bind(py).repr()?,
            self.num_dynamic
        ))
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.statics)?;
        // The cached mask tuple holds only bools, so it can never be part of a cycle.
        for node in &self.nodes {
            match node {
                Node::Dict { keys, .. } => visit.call(keys)?,
                Node::OrderedDict { keys, .. } => visit.call(keys)?,
                Node::DefaultDict { factory, keys, .. } => {
                    visit.call(factory)?;
                    visit.call(keys)?;
                }
                Node::NamedTuple { kind, .. } => visit.call(kind)?,
                Node::Custom {
                    kind,
                    aux,
                    from_iter,
                    ..
                } => {
                    visit.call(kind)?;
                    visit.call(aux)?;
                    visit.call(from_iter)?;
                }
                _ => {}
            }
        }
        Ok(())
    }
}
