//! Shallow calls: a repeated `filter_jit` call whose positional arguments are leaves,
//! `None`s, or tuples, lists and dicts of leaves (the common shape of high-frequency calls:
//! `f(x, 3)`, `f(params, obs)`), matched against the last call's key argument by argument,
//! without the general walk of flatten.rs.
//!
//! A shallow call is read off a key once (`ShallowCall::of`) and kept with it. Matching a
//! call against it decides exactly what the general walk with that key expected
//! (`flatten::Expected`) decides: same node kinds, arities and dict keys, same leaf kinds,
//! same types of static leaves, and static leaves equal in hash and `==`. Anything it does
//! not know (another leaf type, a subclass, a custom node) is simply not a match: the
//! general walk then takes the call, so this path only ever shortens the way to the same
//! answer.

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};

use crate::classify::{self, Globals};
use crate::flatten;
use crate::key::{same_or_equal, Node, StaticKey};

/// One positional argument of a shallow call.
enum Arg {
    Leaf,
    None,
    Tuple(usize),
    List(usize),
    /// A dict of leaves: the index of its node in the key (whose keys are sorted).
    Dict(usize),
}

/// A key read as a shallow call: `(args, {})` whose every argument is an `Arg`.
pub struct ShallowCall {
    args: Box<[Arg]>,
}

/// Deepest level a shallow call's leaves sit at (args pair, args tuple, container, leaf):
/// the general walk refuses trees deeper than the recursion limit, so a match needs more.
const DEPTH: usize = 3;

impl ShallowCall {
    /// `key` as a shallow call, if it is one.
    pub fn of(key: &StaticKey) -> Option<ShallowCall> {
        // Post-order: the arguments' nodes, then `Tuple(len(args))`, `{}`, `Tuple(2)`.
        let nodes = &key.nodes;
        let [args_nodes @ .., Node::Tuple(num_args), Node::Dict { arity: 0, .. }, Node::Tuple(2)] =
            &nodes[..]
        else {
            return None;
        };
        // Each argument is a leaf or `None`, or a container right after its leaves.
        let mut args = Vec::with_capacity(*num_args);
        let mut leaves = 0;
        for (index, node) in args_nodes.iter().enumerate() {
            let arity = node.arity();
            let arg = match node {
                Node::Leaf => {
                    leaves += 1;
                    continue;
                }
                Node::None => Arg::None,
                Node::Tuple(_) => Arg::Tuple(arity),
                Node::List(_) => Arg::List(arity),
                Node::Dict { .. } => Arg::Dict(index),
                _ => return None,
            };
            if leaves < arity {
                return None;
            }
            // Leaves not taken by this container are arguments of their own.
            args.extend((0..leaves - arity).map(|_| Arg::Leaf));
            leaves = 0;
            args.push(arg);
        }
        args.extend((0..leaves).map(|_| Arg::Leaf));
        (args.len() == *num_args).then(|| ShallowCall {
            args: args.into_boxed_slice(),
        })
    }

    /// Does a call with positional arguments `args` (and no keyword arguments) make
    /// exactly `key`, of which this is the shallow form? Its dynamic leaves are put into
    /// `list`, which has `key.num_dynamic` items and is held by the caller alone; on a
    /// mismatch part of it may have been filled.
    pub fn matches<'a, 'py: 'a>(
        &self,
        g: &Globals,
        key: &StaticKey,
        args: impl ExactSizeIterator<Item = Borrowed<'a, 'py, PyAny>>,
        list: &Bound<'py, PyList>,
    ) -> bool {
        let py = list.py();
        if args.len() != self.args.len() || flatten::recursion_limit() <= DEPTH {
            return false;
        }
        let Some(hashes) = key.static_hashes() else {
            return false;
        };
        let mut leaves = Leaves {
            g,
            key,
            statics: key.statics.bind(py),
            hashes,
            list,
            leaf: 0,
            dynamic: 0,
        };
        for (shape, arg) in self.args.iter().zip(args) {
            let matched = match *shape {
                Arg::Leaf => leaves.take(&arg),
                Arg::None => arg.is_none(),
                Arg::Tuple(arity) => match arg.cast_exact::<PyTuple>() {
                    Ok(tuple) if tuple.len() == arity => {
                        tuple.iter_borrowed().all(|item| leaves.take(&item))
                    }
                    _ => false,
                },
                Arg::List(arity) => match arg.cast_exact::<PyList>() {
                    // Read item by item, as the general walk does: `==` on a static leaf
                    // may change the list meanwhile.
                    Ok(items) if items.len() == arity => (0..arity).all(|i| {
                        items
                            .get_item(i)
                            .is_ok_and(|item| leaves.take(&item.as_borrowed()))
                    }),
                    _ => false,
                },
                Arg::Dict(node) => match (&key.nodes[node], arg.cast_exact::<PyDict>()) {
                    (Node::Dict { keys, arity }, Ok(dict)) if dict.len() == *arity => {
                        // The same number of keys, each found: the same keys, so sorted
                        // they are the key's (sorted) keys, in that order.
                        keys.bind(py).iter().all(|name| {
                            matches!(dict.get_item(&name), Ok(Some(value)) if leaves.take(&value.as_borrowed()))
                        })
                    }
                    _ => false,
                },
            };
            if !matched {
                return false;
            }
        }
        leaves.leaf == key.mask.len() && leaves.dynamic == key.num_dynamic
    }
}

/// The leaves of a call being matched, in order.
struct Leaves<'a, 'py> {
    g: &'a Globals,
    key: &'a StaticKey,
    statics: &'a Bound<'py, PyTuple>,
    hashes: &'a [isize],
    list: &'a Bound<'py, PyList>,
    /// Leaves (and dynamic leaves) taken so far.
    leaf: usize,
    dynamic: usize,
}

impl<'py> Leaves<'_, 'py> {
    /// Is `obj` the next leaf the key expects: an array where it has a dynamic leaf, or a
    /// builtin scalar of the same type, hash and value as its static leaf? A dynamic leaf
    /// goes into the list.
    fn take(&mut self, obj: &Borrowed<'_, 'py, PyAny>) -> bool {
        let ty = obj.get_type_ptr();
        // Only leaves whose kind the type alone says: anything else goes the general way.
        let Some(dynamic) = classify::known_is_array(self.g, obj.py(), ty) else {
            return false;
        };
        if self.key.mask.get(self.leaf) != Some(&dynamic) {
            return false;
        }
        self.leaf += 1;
        if dynamic {
            if self.dynamic >= self.list.len() {
                return false;
            }
            // SAFETY: `list` is a live list held only by the caller, and `self.dynamic` is
            // within its length; `PyList_SetItem` takes the new reference and releases the
            // `None` it replaces (each item is set once per match), which runs no Python
            // code.
            unsafe {
                ffi::PyList_SetItem(
                    self.list.as_ptr(),
                    self.dynamic as ffi::Py_ssize_t,
                    (**obj).clone().into_ptr(),
                )
            };
            self.dynamic += 1;
            return true;
        }
        let index = self.leaf - 1 - self.dynamic;
        let (Some(&hash), Ok(known)) = (
            self.hashes.get(index),
            self.statics.get_borrowed_item(index),
        ) else {
            return false;
        };
        // As a table lookup tests a key's static leaf: type, hash, then `==`. An error in
        // either is no match (the general walk then meets it and reports it).
        known.get_type_ptr() == ty
            && obj.hash().is_ok_and(|h| h == hash)
            && same_or_equal(&known, obj).unwrap_or(false)
    }
}
