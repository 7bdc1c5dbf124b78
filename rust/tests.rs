//! Unit tests against an embedded interpreter that has jax installed (see the command at
//! the top of lib.rs).

use std::ffi::CString;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::{flatten, rebuild, StaticKey};

/// Start the interpreter once and make jax and `filterjax` importable: `PYO3_PYTHON`'s
/// `sys.path` (the venv's site-packages) plus this checkout's `python/` directory.
fn with_py<R>(f: impl for<'py> FnOnce(Python<'py>, &Bound<'py, PyDict>) -> R) -> R {
    Python::initialize();
    Python::attach(|py| {
        let sys = py.import("sys").unwrap();
        let path = sys.getattr("path").unwrap().cast_into::<PyList>().unwrap();
        let ours = concat!(env!("CARGO_MANIFEST_DIR"), "/python");
        if !path.contains(ours).unwrap() {
            path.insert(0, ours).unwrap();
            if let Ok(python) = std::env::var("PYO3_PYTHON") {
                let out = std::process::Command::new(python)
                    .args(["-c", "import sys; print('\\n'.join(sys.path))"])
                    .output()
                    .expect("run PYO3_PYTHON");
                for entry in String::from_utf8_lossy(&out.stdout).lines() {
                    if !entry.is_empty() && !path.contains(entry).unwrap() {
                        path.append(entry).unwrap();
                    }
                }
            }
        }
        let ns = PyDict::new(py);
        run(
            py,
            &ns,
            "import collections, sys\nimport numpy as np\nimport jax, jax.numpy as jnp\n\
             import jax.tree_util as jtu",
        );
        f(py, &ns)
    })
}

fn run(py: Python<'_>, ns: &Bound<'_, PyDict>, code: &str) {
    let code = CString::new(code).unwrap();
    if let Err(err) = py.run(&code, Some(ns), Some(ns)) {
        err.print(py);
        panic!("python code failed");
    }
}

fn eval<'py>(py: Python<'py>, ns: &Bound<'py, PyDict>, expr: &str) -> Bound<'py, PyAny> {
    let code = CString::new(expr).unwrap();
    match py.eval(&code, Some(ns), Some(ns)) {
        Ok(v) => v,
        Err(err) => {
            err.print(py);
            panic!("python expression failed: {expr}");
        }
    }
}

fn part<'py>(
    py: Python<'py>,
    tree: &Bound<'py, PyAny>,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, StaticKey>)> {
    flatten::flatten_split(py, tree, None, None, true)
}

#[test]
fn leaf_order_matches_jax_and_rebuild_round_trips() {
    with_py(|py, ns| {
        run(
            py,
            ns,
            "NT = collections.namedtuple('NT', 'x y')\n\
             tree = {'b': [1, jnp.zeros(2), None], 'a': (np.ones(3), 'hi', NT(2.0, np.float32(1))),\n\
                     'c': collections.OrderedDict([('z', 1), ('y', jnp.ones(1))]),\n\
                     'd': collections.defaultdict(list, {'q': 3, 'p': jnp.ones(())})}",
        );
        let tree = eval(py, ns, "tree");
        let (dynamic, key) = part(py, &tree).unwrap();
        ns.set_item("dynamic", &dynamic).unwrap();
        ns.set_item("key", &key).unwrap();
        run(
            py,
            ns,
            "leaves = jtu.tree_leaves(tree)\n\
             assert key.num_leaves == len(leaves)\n\
             expect = [l for l in leaves if isinstance(l, (jax.Array, np.ndarray, np.generic))]\n\
             assert all(a is b for a, b in zip(dynamic, expect)) and len(dynamic) == len(expect)\n\
             assert key.statics == ('hi', 2.0, 1, 1, 3), key.statics\n",
        );
        let back = rebuild::rebuild(py, key.as_any(), &dynamic, None).unwrap();
        ns.set_item("back", back).unwrap();
        run(
            py,
            ns,
            "assert jtu.tree_structure(back) == jtu.tree_structure(tree)\n\
             assert all(a is b for a, b in zip(jtu.tree_leaves(back), jtu.tree_leaves(tree)))\n\
             assert type(back['d']) is collections.defaultdict and back['d'].default_factory is list\n\
             assert list(back['c']) == ['z', 'y']",
        );
    });
}

#[test]
fn equal_trees_give_equal_keys_and_types_matter() {
    with_py(|py, ns| {
        let (_, k1) = part(py, &eval(py, ns, "{'a': 1, 'b': (2, 'x')}")).unwrap();
        let (_, k2) = part(py, &eval(py, ns, "{'a': 1, 'b': (2, 'x')}")).unwrap();
        let (_, k3) = part(py, &eval(py, ns, "{'a': 1.0, 'b': (2, 'x')}")).unwrap();
        let (_, k4) = part(py, &eval(py, ns, "{'a': True, 'b': (2, 'x')}")).unwrap();
        assert!(k1.eq(&k2).unwrap());
        assert_eq!(k1.hash().unwrap(), k2.hash().unwrap());
        assert!(!k1.eq(&k3).unwrap());
        assert!(!k1.eq(&k4).unwrap());
        assert!(!k3.eq(&k4).unwrap());
    });
}

#[test]
fn unhashable_static_reports_its_path() {
    with_py(|py, ns| {
        let err = part(py, &eval(py, ns, "{'a': jnp.ones(1), 'b': [1, {2}]}")).unwrap_err();
        ns.set_item("err", err.value(py)).unwrap();
        run(
            py,
            ns,
            "from filterjax._errors import UnhashableStaticError\n\
             assert isinstance(err, UnhashableStaticError), err\n\
             assert err.path == (jtu.DictKey('b'), jtu.SequenceKey(1)), err.path",
        );
        // hashed=False defers the error to the first hash.
        let tree = eval(py, ns, "[{2}]");
        let (_, key) = flatten::flatten_split(py, &tree, None, None, false).unwrap();
        assert!(key
            .hash()
            .unwrap_err()
            .is_instance_of::<pyo3::exceptions::PyTypeError>(py));
    });
}

#[test]
fn flatten_errors_come_from_the_diagnoser() {
    with_py(|py, ns| {
        run(
            py,
            ns,
            "class Boom:\n    pass\n\
             jtu.register_pytree_node(Boom, lambda b: 1 / 0, lambda a, c: Boom())",
        );
        let err = part(py, &eval(py, ns, "[1, Boom()]")).unwrap_err();
        assert!(err.is_instance_of::<pyo3::exceptions::PyZeroDivisionError>(py));
        ns.set_item("err", err.value(py)).unwrap();
        run(
            py,
            ns,
            "assert any('tree[1]' in n for n in err.__notes__), err.__notes__",
        );
        let err = part(py, &eval(py, ns, "{1: 2, 'a': 3}")).unwrap_err();
        assert!(err.is_instance_of::<pyo3::exceptions::PyValueError>(py));
    });
}

#[test]
fn deep_trees_do_not_overflow() {
    with_py(|py, ns| {
        run(
            py,
            ns,
            "def nest(n):\n    x = 1\n    for _ in range(n):\n        x = [x]\n    return x\n\
             cyc = []\ncyc.append(cyc)",
        );
        let err = part(py, &eval(py, ns, "nest(5000)")).unwrap_err();
        assert!(err.is_instance_of::<pyo3::exceptions::PyRecursionError>(py));
        let err = part(py, &eval(py, ns, "cyc")).unwrap_err();
        ns.set_item("err", err.value(py)).unwrap();
        run(
            py,
            ns,
            "from filterjax._errors import PyTreeCycleError\nassert isinstance(err, PyTreeCycleError)",
        );
        // The walk keeps its stack on the heap: with the limit raised, very deep trees work
        // even on a test thread's small stack, and rebuild inverts them.
        run(
            py,
            ns,
            "old = sys.getrecursionlimit(); sys.setrecursionlimit(1_000_000)",
        );
        let deep = eval(py, ns, "nest(200_000)");
        let result = part(py, &deep);
        run(py, ns, "sys.setrecursionlimit(old)");
        let (dynamic, key) = result.unwrap();
        assert_eq!(key.get().nodes.len(), 200_001);
        let back = rebuild::rebuild(py, key.as_any(), &dynamic, None).unwrap();
        assert!(back.is_instance_of::<PyList>());
        // Just under the default limit works.
        let (_, key) = part(py, &eval(py, ns, "nest(900)")).unwrap();
        assert_eq!(key.get().mask.len(), 1);
    });
}

#[test]
fn rebuild_checks_lengths() {
    with_py(|py, ns| {
        let (_, key) = part(py, &eval(py, ns, "[jnp.ones(1), 'a']")).unwrap();
        let err = rebuild::rebuild(py, key.as_any(), &eval(py, ns, "[]"), None).unwrap_err();
        assert_eq!(
            err.value(py).to_string(),
            "rebuild: the key has 1 dynamic leaves but 0 were given"
        );
        let none = eval(py, ns, "[None]");
        let part_only = rebuild::rebuild(py, key.as_any(), &none, Some(&none)).unwrap();
        assert_eq!(part_only.repr().unwrap().to_string(), "[None, None]");
    });
}
