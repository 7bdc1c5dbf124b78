//! `flatten_split`: flatten a PyTree exactly as `jax.tree_util.tree_flatten` does, sort each
//! leaf into dynamic or static, and build the `StaticKey`, all in one pass.

use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};

use pyo3::exceptions::PyKeyError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyDict, PyIterator, PyList, PyTuple, PyType};
use pyo3::{ffi, PyTypeInfo};

use crate::classify::{self, Globals};
use crate::dataclass::{self, DataclassFields};
use crate::errors::{self, Stop};
use crate::key::{hash_parts, node_equal, same_or_equal, HashFailure, Node, StaticKey};

/// Deepest nesting accepted whatever `sys.getrecursionlimit()` says. The walk keeps its own
/// stack on the heap (a few words per level), so this only bounds memory for absurd limits.
const MAX_DEPTH: usize = 1_000_000;

/// Most types remembered in `Globals::node_kinds` before it is emptied.
const NODE_KINDS_MAX: usize = 4096;

/// What an open node is once all its children are flattened.
enum Finish<'py> {
    Tuple,
    List,
    NamedTuple(Bound<'py, PyType>),
    Dict(Bound<'py, PyList>),
    OrderedDict(Bound<'py, PyTuple>),
    DefaultDict(Bound<'py, PyAny>, Bound<'py, PyTuple>),
    Custom {
        kind: Bound<'py, PyType>,
        aux: Bound<'py, PyAny>,
        from_iter: Bound<'py, PyAny>,
    },
}

/// Where an open node's remaining children come from.
enum Children<'py> {
    Tuple(Bound<'py, PyTuple>),
    List(Bound<'py, PyList>),
    /// Values of a `dict`, looked up by its sorted keys.
    DictValues(Bound<'py, PyDict>, Bound<'py, PyList>),
    /// Values of another mapping, looked up with its `__getitem__` by ordered keys.
    MappingValues(Bound<'py, PyAny>, Bound<'py, PyTuple>),
    /// The data fields of a `register_dataclass` node, read with `getattr`.
    Fields(Bound<'py, PyAny>, Bound<'py, DataclassFields>),
    Iter(Bound<'py, PyIterator>),
}

/// A node whose children are being flattened: one entry of the explicit walk stack.
struct Open<'py> {
    children: Children<'py>,
    next: usize,
    /// Number of children, known up front except for lazily iterated custom children.
    len: usize,
    finish: Finish<'py>,
}

impl<'py> Open<'py> {
    fn new(children: Children<'py>, len: usize, finish: Finish<'py>) -> Self {
        Open {
            children,
            next: 0,
            len,
            finish,
        }
    }

    /// The next child to flatten, or None once all are done.
    #[inline]
    fn next_child(&mut self) -> PyResult<Option<Bound<'py, PyAny>>> {
        let child = match &mut self.children {
            Children::Iter(iter) => match iter.next() {
                Some(child) => {
                    self.len += 1;
                    return child.map(Some);
                }
                None => return Ok(None),
            },
            _ if self.next >= self.len => return Ok(None),
            Children::Tuple(tuple) => tuple.get_item(self.next)?,
            // A strong reference each time: `is_leaf` may mutate the list meanwhile.
            Children::List(list) => list.get_item(self.next)?,
            Children::DictValues(dict, keys) => {
                let key = keys.get_item(self.next)?;
                match dict.get_item(&key)? {
                    Some(child) => child,
                    None => return Err(PyKeyError::new_err(key.unbind())),
                }
            }
            Children::MappingValues(mapping, keys) => {
                mapping.get_item(keys.get_item(self.next)?)?
            }
            Children::Fields(obj, fields) => fields.get().child(obj, self.next)?,
        };
        self.next += 1;
        Ok(Some(child))
    }

    fn into_node(self) -> Node {
        let arity = self.len;
        match self.finish {
            Finish::Tuple => Node::Tuple(arity),
            Finish::List => Node::List(arity),
            Finish::NamedTuple(kind) => Node::NamedTuple {
                kind: kind.unbind(),
                arity,
            },
            Finish::Dict(keys) => Node::Dict {
                keys: keys.unbind(),
                arity,
            },
            Finish::OrderedDict(keys) => Node::OrderedDict {
                keys: keys.unbind(),
                arity,
            },
            Finish::DefaultDict(factory, keys) => Node::DefaultDict {
                factory: factory.unbind(),
                keys: keys.unbind(),
                arity,
            },
            Finish::Custom {
                kind,
                aux,
                from_iter,
            } => Node::Custom {
                kind: kind.unbind(),
                aux: aux.unbind(),
                from_iter: from_iter.unbind(),
                arity,
            },
        }
    }
}

pub(crate) struct Flattener<'a, 'py> {
    py: Python<'py>,
    g: &'a Globals,
    /// `leaf -> truthy` for a dynamic leaf; None means `is_array`.
    pub(crate) predicate: Option<Bound<'py, PyAny>>,
    /// If set, every leaf is dynamic (true) or static (false) and `predicate` is ignored.
    pub(crate) constant: Option<bool>,
    /// `None` is a leaf (as with `is_leaf=lambda x: x is None`), without asking `is_leaf`.
    pub(crate) none_is_leaf: bool,
    is_leaf: Option<&'a Bound<'py, PyAny>>,
    limit: usize,
    pub(crate) nodes: Vec<Node>,
    pub(crate) dynamic: Vec<Bound<'py, PyAny>>,
    pub(crate) statics: Vec<Bound<'py, PyAny>>,
    pub(crate) mask: Vec<bool>,
    /// First error from classifying a leaf. The Python twin classifies only after a
    /// successful flatten, so a flatten error found later must win over this one. The
    /// failing leaf's index is `mask.len()`: nothing more is classified after it.
    pub(crate) pending: Option<PyErr>,
    /// The walk's stack of open nodes, kept between runs.
    stack: Vec<Open<'py>>,
    /// The key this flatten is expected to make, if one is (see `Expected`).
    expect: Option<Expected<'a>>,
}

/// A key compared with the tree while it is walked, so that a call repeating an earlier
/// call's static part is recognised without recording its structure: every node is
/// compared with the key's node at the same position instead of being stored, every leaf's
/// kind (dynamic or static) and static type with the key's mask and statics. At the first
/// difference the nodes matched so far are copied from the key and the walk goes on
/// recording, so the result is the same as a flatten without a key.
pub(crate) struct Expected<'a> {
    key: &'a StaticKey,
    /// How many of the key's nodes (a prefix) the walk has matched.
    matched: usize,
}

impl<'a, 'py> Flattener<'a, 'py> {
    pub(crate) fn new(
        py: Python<'py>,
        g: &'a Globals,
        is_leaf: Option<&'a Bound<'py, PyAny>>,
    ) -> Self {
        let (nodes, dynamic, statics, mask, stack) =
            match SPARE.with(|spare| spare.borrow_mut().take()) {
                // SAFETY (each `relifetime`): the element types differ only in a lifetime.
                Some(spare) => unsafe {
                    (
                        spare.nodes,
                        relifetime(spare.dynamic),
                        relifetime(spare.statics),
                        spare.mask,
                        relifetime(spare.stack),
                    )
                },
                None => (
                    Vec::with_capacity(HINT_NODES.get()),
                    Vec::with_capacity(HINT_DYNAMIC.get()),
                    Vec::with_capacity(HINT_STATIC.get()),
                    Vec::with_capacity(HINT_LEAVES.get()),
                    Vec::new(),
                ),
            };
        Flattener {
            py,
            g,
            predicate: None,
            constant: None,
            none_is_leaf: false,
            is_leaf,
            limit: recursion_limit(),
            nodes,
            dynamic,
            statics,
            mask,
            pending: None,
            stack,
            expect: None,
        }
    }

    /// Compare the walk with `key` (see `Expected`).
    pub(crate) fn expect(&mut self, key: Option<&'a StaticKey>) {
        self.expect = key.map(|key| Expected { key, matched: 0 });
    }

    /// Record `node`, the next node in post-order; or, while the walk matches the expected
    /// key, check it against the key's node at this position.
    #[inline]
    fn emit(&mut self, node: Node) {
        if let Some(expected) = &mut self.expect {
            if let Some(known) = expected.key.nodes.get(expected.matched) {
                let same = match (known, &node) {
                    (Node::Leaf, Node::Leaf) | (Node::None, Node::None) => true,
                    (Node::Tuple(a), Node::Tuple(b)) | (Node::List(a), Node::List(b)) => a == b,
                    // A comparison that raises counts as a difference: the lookup that
                    // follows compares again, and reports the error where it always has.
                    _ => node_equal(self.py, known, &node).unwrap_or(false),
                };
                if same {
                    expected.matched += 1;
                    return;
                }
            }
            self.diverge();
        }
        self.nodes.push(node);
    }

    /// `emit(Node::Leaf)`, without making the node to compare.
    #[inline]
    fn emit_leaf(&mut self) {
        if let Some(expected) = &mut self.expect {
            if let Some(Node::Leaf) = expected.key.nodes.get(expected.matched) {
                expected.matched += 1;
                return;
            }
            self.diverge();
        }
        self.nodes.push(Node::Leaf);
    }

    /// `emit` of an empty dict's node, without making the node to compare: any empty
    /// dict's node equals any other's.
    #[inline]
    fn emit_empty_dict(&mut self) -> PyResult<()> {
        if let Some(expected) = &mut self.expect {
            if let Some(Node::Dict { arity: 0, .. }) = expected.key.nodes.get(expected.matched) {
                expected.matched += 1;
                return Ok(());
            }
            self.diverge();
        }
        self.nodes.push(Node::Dict {
            keys: empty_keys(self.py)?.unbind(),
            arity: 0,
        });
        Ok(())
    }

    /// Stop comparing: record the nodes matched so far, as copies of the key's.
    #[cold]
    #[inline(never)]
    fn diverge(&mut self) {
        if let Some(expected) = self.expect.take() {
            let py = self.py;
            let prefix = &expected.key.nodes[..expected.matched];
            self.nodes
                .extend(prefix.iter().map(|node| node.clone_ref(py)));
        }
    }

    /// Does the leaf about to be recorded (dynamic or not, and of type `ty` if static)
    /// agree with the expected key? Stops comparing if not.
    #[inline]
    fn check_leaf(&mut self, dynamic: bool, ty: *mut ffi::PyTypeObject) {
        let Some(expected) = &self.expect else {
            return;
        };
        let key = expected.key;
        let agrees = match key.mask.get(self.mask.len()) {
            Some(&known) if known == dynamic => {
                dynamic
                    || key
                        .statics
                        .bind(self.py)
                        .get_borrowed_item(self.statics.len())
                        .is_ok_and(|known| known.get_type_ptr() == ty)
            }
            _ => false,
        };
        if !agrees {
            self.diverge();
        }
    }

    /// Flatten `tree`: a depth-first walk with an explicit stack, so that no nesting depth
    /// can overflow the Rust stack. Nodes are recorded in post-order, like jax's. Appends
    /// to what earlier runs recorded.
    pub(crate) fn run(&mut self, tree: &Bound<'py, PyAny>) -> Result<(), Stop> {
        self.run_from(tree, 0)
    }

    /// `run` for a tree that sits at `depth` inside a larger one.
    /// `run_from` on a dict whose keys, sorted, are known to be `sorted_keys`.
    fn run_dict_from(
        &mut self,
        dict: &Bound<'py, PyDict>,
        sorted_keys: &Bound<'py, PyList>,
        depth: usize,
    ) -> Result<(), Stop> {
        let root = Open::new(
            Children::DictValues(dict.clone(), sorted_keys.clone()),
            sorted_keys.len(),
            Finish::Dict(sorted_keys.clone()),
        );
        let mut stack = std::mem::take(&mut self.stack);
        let done = self.walk_open(&mut stack, root, depth);
        stack.clear();
        self.stack = stack;
        done
    }

    fn run_from(&mut self, tree: &Bound<'py, PyAny>, depth: usize) -> Result<(), Stop> {
        // One stack for every run of this flattener (empty between runs).
        let mut stack = std::mem::take(&mut self.stack);
        let done = self.walk(&mut stack, tree, depth);
        stack.clear();
        self.stack = stack;
        done
    }

    fn walk(
        &mut self,
        stack: &mut Vec<Open<'py>>,
        tree: &Bound<'py, PyAny>,
        depth: usize,
    ) -> Result<(), Stop> {
        match self.visit(tree.clone(), depth)? {
            Some(open) => self.walk_open(stack, open, depth),
            None => Ok(()),
        }
    }

    /// The rest of `walk` once its root is open.
    fn walk_open(
        &mut self,
        stack: &mut Vec<Open<'py>>,
        root: Open<'py>,
        depth: usize,
    ) -> Result<(), Stop> {
        stack.push(root);
        while let Some(top) = stack.last_mut() {
            match top.next_child()? {
                Some(child) => {
                    let depth = depth + stack.len();
                    if let Some(open) = self.visit(child, depth)? {
                        stack.push(open);
                    }
                }
                None => {
                    if let Some(done) = stack.pop() {
                        self.emit(done.into_node());
                    }
                }
            }
        }
        Ok(())
    }

    fn leaf(&mut self, obj: Bound<'py, PyAny>) {
        self.emit_leaf();
        if self.pending.is_some() {
            return;
        }
        let dynamic = match (self.constant, &self.predicate) {
            (Some(constant), _) => Ok(constant),
            (None, None) => classify::is_array(self.g, &obj),
            (None, Some(predicate)) => predicate.call1((&obj,)).and_then(|r| r.is_truthy()),
        };
        match dynamic {
            Ok(true) => {
                self.check_leaf(true, obj.get_type_ptr());
                self.dynamic.push(obj);
                self.mask.push(true);
            }
            Ok(false) => {
                self.check_leaf(false, obj.get_type_ptr());
                self.statics.push(obj);
                self.mask.push(false);
            }
            Err(err) => self.pending = Some(err),
        }
    }

    /// Classify one node at `depth`. Leaves and `None` are recorded at once; a container
    /// is returned open, to have its children walked.
    #[inline]
    fn visit(&mut self, obj: Bound<'py, PyAny>, depth: usize) -> Result<Option<Open<'py>>, Stop> {
        let py = self.py;
        if self.none_is_leaf && obj.is_none() {
            self.leaf(obj);
            return Ok(None);
        }
        if let Some(is_leaf) = self.is_leaf {
            if self.asks_leaf(is_leaf, &obj)? {
                self.leaf(obj);
                return Ok(None);
            }
        }
        if depth >= self.limit {
            return Err(Stop::TooDeep);
        }
        let ty = obj.get_type_ptr();
        let g = self.g;
        if classify::known_is_array(g, py, ty).is_some() {
            self.leaf(obj);
            return Ok(None);
        }
        if obj.is_none() {
            self.emit(Node::None);
            return Ok(None);
        }
        if ty == PyTuple::type_object_raw(py) {
            let tuple = obj.cast_into::<PyTuple>().map_err(PyErr::from)?;
            let len = tuple.len();
            return Ok(Some(Open::new(Children::Tuple(tuple), len, Finish::Tuple)));
        }
        if ty == PyList::type_object_raw(py) {
            let list = obj.cast_into::<PyList>().map_err(PyErr::from)?;
            let len = list.len();
            return Ok(Some(Open::new(Children::List(list), len, Finish::List)));
        }
        if ty == PyDict::type_object_raw(py) {
            return self.open_dict(&obj).map(Some);
        }
        if ty == g.ordered_dict.as_ptr().cast() {
            return self.open_ordered_dict(&obj).map(Some);
        }
        if ty == g.default_dict.as_ptr().cast() {
            return self.open_default_dict(&obj).map(Some);
        }
        self.visit_other(obj)
    }

    /// Registered custom nodes, namedtuples and leaves of other types.
    #[inline(never)]
    fn visit_other(&mut self, obj: Bound<'py, PyAny>) -> Result<Option<Open<'py>>, Stop> {
        let py = self.py;
        let kind = obj.get_type();
        let registry = self.g.registry.bind(py);
        let known = self.node_kinds(registry)?;
        let registered = match known.get_item(&kind)? {
            Some(answer) => match answer.cast_into::<DataclassFields>() {
                Ok(fields) => return self.open_dataclass(obj, kind, fields).map(Some),
                Err(answer) => answer.into_inner().is_truthy()?,
            },
            None => {
                let answer = match registry.get_item(&kind)? {
                    Some(entry) => match dataclass::read(&kind, &entry)? {
                        Some(fields) => fields.into_any(),
                        None => PyBool::new(py, true).to_owned().into_any(),
                    },
                    None => PyBool::new(py, false).to_owned().into_any(),
                };
                known.set_item(&kind, &answer)?;
                if let Ok(fields) = answer.cast_into::<DataclassFields>() {
                    return self.open_dataclass(obj, kind, fields).map(Some);
                }
                registry.contains(&kind)?
            }
        };
        if registered {
            if let Some(entry) = registry.get_item(&kind)? {
                return self.open_custom(&obj, kind, &entry).map(Some);
            }
        }
        if obj.is_instance_of::<PyTuple>() && has_fields(&obj) {
            let tuple = obj.cast_into::<PyTuple>().map_err(PyErr::from)?;
            let len = tuple.len();
            return Ok(Some(Open::new(
                Children::Tuple(tuple),
                len,
                Finish::NamedTuple(kind),
            )));
        }
        self.leaf(obj);
        Ok(None)
    }

    /// The cache of what types are (see `Globals::node_kinds`), emptied first if the
    /// registry has grown or changed size since, or if it is full.
    #[inline]
    fn node_kinds(&self, registry: &Bound<'py, PyDict>) -> PyResult<Bound<'py, PyDict>> {
        let known = self.g.node_kinds.bind(self.py);
        let size = registry.len();
        let checked = &self.g.node_kinds_registry_len;
        if checked.load(Ordering::Relaxed) != size || known.len() >= NODE_KINDS_MAX {
            known.clear();
            checked.store(size, Ordering::Relaxed);
        }
        Ok(known.clone())
    }

    /// `is_leaf(obj)`, accepting only what jax accepts: True, False or None.
    fn asks_leaf(&self, is_leaf: &Bound<'py, PyAny>, obj: &Bound<'py, PyAny>) -> PyResult<bool> {
        let answer = is_leaf.call1((obj,))?;
        // SAFETY: only the addresses of the `True`/`False` singletons are read; they live
        // as long as the interpreter and nothing is dereferenced.
        let (true_ptr, false_ptr) = unsafe { (ffi::Py_True(), ffi::Py_False()) };
        if answer.as_ptr() == true_ptr {
            Ok(true)
        } else if answer.as_ptr() == false_ptr || answer.is_none() {
            Ok(false)
        } else {
            Err(errors::non_boolean_is_leaf(&answer))
        }
    }

    #[inline(never)]
    fn open_dict(&mut self, obj: &Bound<'py, PyAny>) -> Result<Open<'py>, Stop> {
        let dict = obj.cast::<PyDict>().map_err(PyErr::from)?;
        let keys = if dict.is_empty() {
            empty_keys(self.py)?
        } else {
            let keys = dict.keys();
            keys.sort()?;
            keys
        };
        let len = keys.len();
        Ok(Open::new(
            Children::DictValues(dict.clone(), keys.clone()),
            len,
            Finish::Dict(keys),
        ))
    }

    #[inline(never)]
    fn open_ordered_dict(&mut self, obj: &Bound<'py, PyAny>) -> Result<Open<'py>, Stop> {
        // The OrderedDict's own order (which `move_to_end` changes), not the dict's.
        let keys = PyTuple::new(self.py, obj.try_iter()?.collect::<PyResult<Vec<_>>>()?)?;
        let len = keys.len();
        Ok(Open::new(
            Children::MappingValues(obj.clone(), keys.clone()),
            len,
            Finish::OrderedDict(keys),
        ))
    }

    #[inline(never)]
    fn open_default_dict(&mut self, obj: &Bound<'py, PyAny>) -> Result<Open<'py>, Stop> {
        let dict = obj.cast::<PyDict>().map_err(PyErr::from)?;
        let sorted = dict.keys();
        sorted.sort()?;
        let keys = sorted.to_tuple();
        let factory = obj.getattr(pyo3::intern!(self.py, "default_factory"))?;
        let len = keys.len();
        Ok(Open::new(
            Children::MappingValues(obj.clone(), keys.clone()),
            len,
            Finish::DefaultDict(factory, keys),
        ))
    }

    /// A `register_dataclass` node, as jaxlib reads it: the data fields are its children,
    /// the tuple of its meta fields its node data. Rebuilt by calling the type (rebuild.rs).
    fn open_dataclass(
        &mut self,
        obj: Bound<'py, PyAny>,
        kind: Bound<'py, PyType>,
        fields: Bound<'py, DataclassFields>,
    ) -> Result<Open<'py>, Stop> {
        let aux = fields.get().meta(&obj)?.into_any();
        let len = fields.get().num_data();
        let finish = Finish::Custom {
            kind,
            aux,
            from_iter: fields.clone().into_any(),
        };
        Ok(Open::new(Children::Fields(obj, fields), len, finish))
    }

    #[inline(never)]
    fn open_custom(
        &mut self,
        obj: &Bound<'py, PyAny>,
        kind: Bound<'py, PyType>,
        entry: &Bound<'py, PyAny>,
    ) -> Result<Open<'py>, Stop> {
        let (to_iter, from_iter) = registry_functions(entry)?;
        let result = to_iter.call1((obj,))?;
        let pair = match result.cast::<PyTuple>() {
            Ok(pair) if pair.len() == 2 => pair,
            _ => return Err(errors::malformed_flatten(&result).into()),
        };
        let children = pair.get_item(0)?;
        let aux = pair.get_item(1)?;
        let finish = Finish::Custom {
            kind,
            aux,
            from_iter,
        };
        if let Ok(tuple) = children.cast_exact::<PyTuple>() {
            let len = tuple.len();
            return Ok(Open::new(Children::Tuple(tuple.clone()), len, finish));
        }
        if let Ok(list) = children.cast_exact::<PyList>() {
            let len = list.len();
            return Ok(Open::new(Children::List(list.clone()), len, finish));
        }
        // Any other iterable is consumed lazily, as jax does.
        let iter = children
            .try_iter()
            .map_err(|_| errors::malformed_children(&result))?;
        Ok(Open::new(Children::Iter(iter), 0, finish))
    }
}

/// `(to_iter, from_iter)` of an entry of jax's node registry.
pub(crate) fn registry_functions<'py>(
    entry: &Bound<'py, PyAny>,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    let py = entry.py();
    match entry.cast::<PyTuple>() {
        Ok(pair) if pair.len() >= 2 => Ok((pair.get_item(0)?, pair.get_item(1)?)),
        _ => Ok((
            entry.getattr(pyo3::intern!(py, "to_iter"))?,
            entry.getattr(pyo3::intern!(py, "from_iter"))?,
        )),
    }
}

/// `hasattr(obj, "_fields")`, swallowing errors as jax's namedtuple test does.
pub(crate) fn has_fields(obj: &Bound<'_, PyAny>) -> bool {
    obj.hasattr(pyo3::intern!(obj.py(), "_fields"))
        .unwrap_or(false)
}

/// Vector capacity for the next call: the size the last call needed. Calls usually repeat
/// with trees of one shape, so this makes the vectors right-sized with no regrowth.
struct SizeHint(AtomicUsize);

impl SizeHint {
    const fn new(n: usize) -> Self {
        SizeHint(AtomicUsize::new(n))
    }

    fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed).min(1 << 16)
    }

    fn set(&self, n: usize) {
        self.0.store(n, Ordering::Relaxed);
    }
}

static HINT_NODES: SizeHint = SizeHint::new(16);
static HINT_DYNAMIC: SizeHint = SizeHint::new(8);
static HINT_STATIC: SizeHint = SizeHint::new(8);
static HINT_LEAVES: SizeHint = SizeHint::new(16);

/// `sys.getrecursionlimit()`, at most `MAX_DEPTH`.
pub(crate) fn recursion_limit() -> usize {
    // SAFETY: a plain read of an interpreter setting; the caller holds the GIL.
    let limit = unsafe { ffi::Py_GetRecursionLimit() };
    usize::try_from(limit).unwrap_or(0).min(MAX_DEPTH)
}

/// The sorted keys of every empty dict: one list, never mutated, instead of a new one per
/// node.
fn empty_keys(py: Python<'_>) -> PyResult<Bound<'_, PyList>> {
    static EMPTY: PyOnceLock<Py<PyList>> = PyOnceLock::new();
    let keys = EMPTY.get_or_try_init(py, || -> PyResult<_> { Ok(PyList::empty(py).unbind()) })?;
    Ok(keys.bind(py).clone())
}

/// The emptied buffers of parts that were only compared (`Parts::recycle`), for the next
/// flatten on this thread: a repeated call then allocates none. Always empty of objects.
struct Spare {
    nodes: Vec<Node>,
    dynamic: Vec<Bound<'static, PyAny>>,
    statics: Vec<Bound<'static, PyAny>>,
    mask: Vec<bool>,
    stack: Vec<Open<'static>>,
}

/// The allocation of `vec`, emptied, as a vector of another element type.
///
/// # Safety
/// `T` and `U` must differ only in lifetimes (so they have the same layout). No value is
/// ever read as the other type: the vector is emptied (its elements dropped as `T`) first.
/// Spare buffers are kept this way with `'static` in place of the walk's `'py`.
unsafe fn relifetime<T, U>(vec: Vec<T>) -> Vec<U> {
    let mut vec = std::mem::ManuallyDrop::new(vec);
    vec.clear();
    let (ptr, capacity) = (vec.as_mut_ptr(), vec.capacity());
    // SAFETY: the allocation was made by a `Vec<T>` with this capacity and is handed over
    // whole (`ManuallyDrop` never frees it); `U` has `T`'s layout (the caller's promise);
    // the length is 0.
    unsafe { Vec::from_raw_parts(ptr.cast::<U>(), 0, capacity) }
}

thread_local! {
    static SPARE: RefCell<Option<Spare>> = const { RefCell::new(None) };
}

/// A tree flattened and its leaves sorted, not (yet) made into a `StaticKey`.
pub struct Parts<'py> {
    pub nodes: Vec<Node>,
    pub dynamic: Vec<Bound<'py, PyAny>>,
    pub statics: Vec<Bound<'py, PyAny>>,
    pub mask: Vec<bool>,
    /// The tree made exactly the key it was expected to make (see `Expected`); `nodes`
    /// is then empty.
    pub matched: bool,
    /// The walk stack's allocation, for `recycle`.
    stack: Vec<Open<'py>>,
    /// Each static leaf's hash, once `hash` has run.
    static_hashes: Vec<isize>,
}

impl<'py> Parts<'py> {
    /// The key's hash for these parts (`StaticKey::compute_hash` of the key they make).
    pub fn hash(&mut self, py: Python<'py>) -> Result<isize, HashFailure> {
        let statics = &self.statics;
        hash_parts(
            py,
            &self.nodes,
            &self.mask,
            statics.len(),
            |i| Ok(statics[i].clone()),
            &mut self.static_hashes,
        )
    }

    /// Keep these parts' buffers for the next flatten on this thread.
    pub fn recycle(mut self) {
        // Emptied before the thread-local is touched: releasing a leaf can run Python code
        // (a `__del__`), which may flatten again.
        self.nodes.clear();
        self.dynamic.clear();
        self.statics.clear();
        self.mask.clear();
        // SAFETY (each `relifetime`): the element types differ only in a lifetime.
        let spare = unsafe {
            Spare {
                nodes: self.nodes,
                dynamic: relifetime(self.dynamic),
                statics: relifetime(self.statics),
                mask: self.mask,
                stack: relifetime(self.stack),
            }
        };
        SPARE.with(|slot| *slot.borrow_mut() = Some(spare));
    }

    /// The dynamic leaves (a list) and the key, whose hash is `hash` if given (as `hash`
    /// computed it, leaving the static leaves' hashes in these parts).
    pub fn into_key(
        self,
        py: Python<'py>,
        hash: Option<isize>,
    ) -> PyResult<(Bound<'py, PyList>, StaticKey)> {
        let num_dynamic = self.dynamic.len();
        let dynamic = PyList::new(py, self.dynamic)?;
        let statics = PyTuple::new(py, self.statics)?.unbind();
        let key = match hash {
            Some(h) => StaticKey::with_hash(
                self.nodes,
                statics,
                self.mask,
                num_dynamic,
                h,
                self.static_hashes,
            ),
            None => StaticKey::new(self.nodes, statics, self.mask, num_dynamic),
        };
        Ok((dynamic, key))
    }
}

impl<'a, 'py> Flattener<'a, 'py> {
    /// What was flattened, or the first error classifying a leaf. Remembers the sizes as
    /// the next call's capacity hints.
    fn into_parts(mut self) -> PyResult<Parts<'py>> {
        if let Some(err) = self.pending.take() {
            return Err(err);
        }
        let matched = self.all_matched();
        if !matched {
            HINT_NODES.set(self.nodes.len());
        }
        HINT_DYNAMIC.set(self.dynamic.len());
        HINT_STATIC.set(self.statics.len());
        HINT_LEAVES.set(self.mask.len());
        Ok(Parts {
            nodes: self.nodes,
            dynamic: self.dynamic,
            statics: self.statics,
            mask: self.mask,
            matched,
            stack: self.stack,
            static_hashes: Vec::new(),
        })
    }

    /// Once the walk is over: did it make exactly the expected key? The structure, mask and
    /// static types were compared on the way; the static leaves are compared last, with
    /// `==` as keys compare them. If not, the nodes are recorded in full.
    fn all_matched(&mut self) -> bool {
        let Some(expected) = &self.expect else {
            return false;
        };
        let key = expected.key;
        let complete = expected.matched == key.nodes.len() && self.mask.len() == key.mask.len();
        if let (true, Some(hashes)) = (complete, key.static_hashes()) {
            let statics = key.statics.bind(self.py);
            // Hash and `==`, as a table lookup would test the leaf: a leaf changed in place
            // since the key was made is the key's own object, but no longer hashes alike.
            // As above, an `__eq__` (or `__hash__`) that raises counts as a difference.
            let equal = statics.len() == self.statics.len()
                && hashes.len() == self.statics.len()
                && self
                    .statics
                    .iter()
                    .zip(hashes)
                    .enumerate()
                    .all(|(index, (leaf, &hash))| {
                        leaf.hash().is_ok_and(|h| h == hash)
                            && statics
                                .get_borrowed_item(index)
                                .is_ok_and(|known| same_or_equal(&known, leaf).unwrap_or(false))
                    });
            if equal {
                return true;
            }
        }
        self.diverge();
        false
    }
}

/// The parts of `partition((args, kwargs))` (kwargs None: an empty dict), made without
/// building that tuple or dict. A flatten error is returned bare, without the diagnosis
/// `partition` adds.
pub fn partition_call<'py>(
    py: Python<'py>,
    args: &Bound<'py, PyTuple>,
    kwargs: Option<CallKwargs<'_, 'py>>,
    expect: Option<&StaticKey>,
) -> Result<Parts<'py>, Stop> {
    let g = classify::globals(py)?;
    let mut f = Flattener::new(py, g, None);
    f.expect(expect);
    // The pair is the root (depth 0); its two children sit at depth 1.
    f.run_from(args.as_any(), 1)?;
    finish_call(&mut f, kwargs)?;
    Ok(f.into_parts()?)
}

/// `partition_call` for positional arguments given one by one (as a binding plan picks
/// them), without making their tuple.
pub fn partition_bound_call<'py>(
    py: Python<'py>,
    args: &[Bound<'py, PyAny>],
    kwargs: Option<CallKwargs<'_, 'py>>,
    expect: Option<&StaticKey>,
) -> Result<Parts<'py>, Stop> {
    let g = classify::globals(py)?;
    let mut f = Flattener::new(py, g, None);
    f.expect(expect);
    for arg in args {
        f.run_from(arg, 2)?;
    }
    f.emit(Node::Tuple(args.len()));
    finish_call(&mut f, kwargs)?;
    Ok(f.into_parts()?)
}

/// A call's keyword arguments, with their names sorted if already known.
#[derive(Clone, Copy)]
pub struct CallKwargs<'a, 'py> {
    pub dict: &'a Bound<'py, PyDict>,
    /// `sorted(dict)`, if known; must be exactly that.
    pub sorted_keys: Option<&'a Bound<'py, PyList>>,
}

/// The keyword half of a call's `(args, kwargs)` pair, then the pair itself.
fn finish_call<'py>(
    f: &mut Flattener<'_, 'py>,
    kwargs: Option<CallKwargs<'_, 'py>>,
) -> Result<(), Stop> {
    match kwargs {
        Some(CallKwargs {
            dict,
            sorted_keys: Some(keys),
        }) => f.run_dict_from(dict, keys, 1)?,
        Some(CallKwargs { dict, .. }) => f.run_from(dict.as_any(), 1)?,
        None => f.emit_empty_dict()?,
    }
    f.emit(Node::Tuple(2));
    Ok(())
}

pub fn flatten_split<'py>(
    py: Python<'py>,
    tree: &Bound<'py, PyAny>,
    predicate: Option<&Bound<'py, PyAny>>,
    is_leaf: Option<&Bound<'py, PyAny>>,
    hashed: bool,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, StaticKey>)> {
    let g = classify::globals(py)?;
    let mut f = Flattener::new(py, g, is_leaf);
    f.predicate = predicate.cloned();
    if let Err(stop) = f.run(tree) {
        return Err(errors::flatten_failed(py, tree, is_leaf, stop));
    }
    let (dynamic, key) = f.into_parts()?.into_key(py, None)?;
    if hashed {
        if let Err(failure) = key.compute_hash(py) {
            let statics = key.statics.bind(py);
            let leaf = statics.get_item(failure.static_index)?;
            let index = key.leaf_index_of_static(failure.static_index);
            return Err(errors::unhashable_static(
                py,
                tree,
                is_leaf,
                index,
                &leaf,
                failure.err,
            ));
        }
    }
    Ok((dynamic.into_any(), Bound::new(py, key)?))
}
