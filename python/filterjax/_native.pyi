"""Type stub of `filterjax._native`, the Rust twin of `filterjax._pycore`.

Same functions, same results and same errors as the pure-Python core; only faster.
"""

from collections.abc import Callable, Sequence
from typing import Any, Final, Literal, Self, final

from typing_extensions import disjoint_base

__all__ = [
    "BACKEND",
    "Dispatcher",
    "StaticKey",
    "is_array",
    "flatten_split",
    "rebuild",
    "dispatcher_subclass",
    "register_array_predicate",
    "tree_apply_updates",
    "tree_combine",
    "tree_filter",
    "tree_partition",
]

BACKEND: Final[Literal["native"]]
"""Name of this core implementation, as reported by `filterjax._backend.backend()`."""

@final
class StaticKey:
    """Everything about a partitioned PyTree except its dynamic leaves.

    Holds the structure (node kinds, arities and node data in `jax.tree_util`'s post-order),
    the static leaves and which leaf positions are dynamic. Immutable; instances come only
    from `flatten_split`.

    Two keys are equal when their masks are equal, their static leaves have the same exact
    types and compare equal (identity first, then `==`), and their structures are equal as
    `jax.tree_util.PyTreeDef`s are (custom node types by identity, node data with `==`).
    So `1`, `1.0` and `True` as static leaves give unequal keys. Equal keys have equal
    hashes. Exceptions raised while comparing leaves or node data propagate.
    """

    @property
    def num_leaves(self) -> int:
        """Number of leaves, dynamic and static."""

    @property
    def num_dynamic(self) -> int:
        """Number of dynamic leaves."""

    @property
    def num_static(self) -> int:
        """Number of static leaves."""

    @property
    def statics(self) -> tuple[Any, ...]:
        """The static leaves, in leaf order."""

    @property
    def mask(self) -> tuple[bool, ...]:
        """One entry per leaf, `True` where the leaf is dynamic."""

    def __hash__(self) -> int:
        """Hash of the structure, mask and static leaves (computed once, then cached).

        Custom node aux data is not hashed (jax does not require it to be hashable).
        Raises what a static leaf's `__hash__` raises.
        """

    def __eq__(self, value: object, /) -> bool: ...
    def __ne__(self, value: object, /) -> bool: ...

def is_array(x: Any) -> bool:
    """True for JAX arrays (tracers included), NumPy arrays and NumPy scalars.

    Same answer as `isinstance(x, (jax.Array, numpy.ndarray, numpy.generic))`, remembered
    per exact type.
    """

def flatten_split(
    tree: Any,
    predicate: Callable[[Any], Any] | None = None,
    is_leaf: Callable[[Any], bool | None] | None = None,
    hashed: bool = True,
) -> tuple[list[Any], StaticKey]:
    """Flatten `tree` and split its leaves into dynamic and static.

    **Arguments:**

    - `tree`: any PyTree, flattened exactly as `jax.tree_util.tree_flatten(tree, is_leaf)`
        would (same leaves, same order).
    - `predicate`: `leaf -> truthy` for a dynamic leaf. `None` means `is_array`.
    - `is_leaf`: as in `jax.tree_util.tree_flatten`; must return `True`, `False` or `None`.
    - `hashed`: hash the key now, so that an unhashable static leaf is reported here (as
        `filterjax.UnhashableStaticError`, with its path). With `False` the key is hashed on
        first use, if ever.

    **Returns:**

    `(dynamic_leaves, key)`.

    **Raises:**

    Whatever `filterjax._diagnose.raise_flatten_error` raises for a tree that cannot be
    flattened (bad custom flatten function, unsortable dict keys, cycles, nesting deeper
    than `sys.getrecursionlimit()`, an exception from `is_leaf`), or what `predicate` raises.
    """

def rebuild(key: StaticKey, dynamic: Sequence[Any], statics: Sequence[Any] | None = None) -> Any:
    """Inverse of `flatten_split`: the tree with `dynamic` at the dynamic positions.

    **Arguments:**

    - `key`: a `StaticKey` from `flatten_split`.
    - `dynamic`: `key.num_dynamic` leaves (any sized iterable; lists and tuples are read in
        place).
    - `statics`: if given, `key.num_static` leaves replacing the key's static leaves (e.g.
        `[None] * key.num_static` to keep only the dynamic part).

    **Returns:**

    The rebuilt tree. Containers are rebuilt as `jax.tree_util.PyTreeDef.unflatten` does;
    custom nodes through their registered unflatten function, given the children as a tuple.

    **Raises:**

    `TypeError` if `key` is not a `StaticKey`; `ValueError` if a leaf count is wrong.
    """

@disjoint_base
class Dispatcher:
    """The per-call path of a `filter_jit` function (twin of `_pycore.Dispatcher`).

    A call whose shape (`len(args)`, or `(len(args), tuple(kwargs))` with keywords) has a
    plan in `plans` is bound by it (`identity_plan`, or `(argument sources, ((keyword,
    source), ...))` where a source is a position in `args` or a name in `kwargs`),
    partitioned as `(args, kwargs)`, and its `StaticKey` looked up in `programs`. The
    program found is called with `(leading, dynamic)` (`(dynamic,)` if `leading` is
    empty): flat array leaves only, no static argument. An output `{spec: leaves}` with
    `type(spec) is output_spec` is rebuilt as
    `rebuild(spec.key, leaves)`. Everything else (a new shape or key, a partition or key
    comparison that raises, `fast=False`) goes to `fallback(leading, args, kwargs)`. An
    exception the program raises is replaced by `on_error(exception)` unless that returns
    None. Subclassable; binds as a method like a function; instances accept attributes
    and weakrefs.
    """

    def __new__(
        cls,
        plans: dict[Any, Any],
        programs: dict[Any, Any],
        identity_plan: Any,
        fallback: Callable[[tuple[Any, ...], tuple[Any, ...], dict[str, Any]], Any],
        output_spec: type,
        leading: Any = None,
        fast: bool = True,
        on_error: Callable[[BaseException], BaseException | None] | None = None,
    ) -> Self: ...
    @property
    def leading(self) -> tuple[Any, ...]:
        """The wrapped function's array leaves, in `jax.tree_util` order."""

    def __call__(self, /, *args: Any, **kwargs: Any) -> Any: ...
    def __get__(self, instance: Any, owner: type | None = None, /) -> Any: ...

def dispatcher_subclass(bases: tuple[type, ...]) -> type:
    """A subclass of `bases` (which include `Dispatcher`), made like `type(
    "_DispatcherSubclass", bases, {"__slots__": ()})`, whose calls enter the Dispatcher
    with the call's own arguments: by vectorcall (the caller's argument array, no tuple or
    keyword dict), or with a tuple and a dict from callers that have those."""

def tree_partition(
    pytree: Any,
    filter_spec: Any,
    replace: Any = None,
    is_leaf: Callable[[Any], bool | None] | None = None,
) -> tuple[Any, Any]:
    """`equinox.partition(pytree, filter_spec, replace, is_leaf)`: `(matching, rest)`.

    `filter_spec` is a bool, a callable `leaf -> truthy` (`filterjax.is_array` and
    `equinox.is_array` run natively, without a call per leaf), or a PyTree prefix of `pytree`
    with those as leaves (its own structure is matched as `PyTreeDef.flatten_up_to` does,
    then each subtree is flattened with `is_leaf`). The outputs have the structure of
    `pytree` (of `filter_spec` down to its leaves) and the very same leaf objects, `replace`
    where a leaf went to the other side.

    **Raises:** `ValueError` naming the path for a filter_spec that is not a prefix of
    `pytree` or has a leaf that is neither a bool nor a callable; what a callable raises, with
    a note naming the leaf; flatten errors as `flatten_split` raises them.
    """

def tree_filter(
    pytree: Any,
    filter_spec: Any,
    inverse: Any = False,
    replace: Any = None,
    is_leaf: Callable[[Any], bool | None] | None = None,
) -> Any:
    """`equinox.filter(...)`: one side of `tree_partition` (the other with `inverse`)."""

def tree_combine(
    pytrees: tuple[Any, ...], is_leaf: Callable[[Any], bool | None] | None = None
) -> Any:
    """`equinox.combine(*pytrees, is_leaf=is_leaf)`.

    The first tree's structure, with None as a leaf (`is_leaf` is not asked about None); each
    leaf is the first non-None one among the trees, whose structure must match the first's
    up to its None leaves (which may stand for whole subtrees). `ValueError` naming the path
    otherwise; `TypeError` for no trees.
    """

def register_array_predicate(predicate: Callable[[Any], bool]) -> None:
    """Make `predicate` a filter_spec the core answers with its own array test, without
    calling it per leaf. It must answer exactly as `is_array` does. A later registration
    replaces it.

    **Raises:** `TypeError` if `predicate` is not callable.
    """

def tree_apply_updates(model: Any, updates: Any) -> Any:
    """`equinox.apply_updates(model, updates)`: `leaf + update` where the update is not None;
    `updates` is a prefix of `model` (None for a whole subtree)."""
