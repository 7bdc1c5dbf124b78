"""The base of every callable filterjax's transforms return.

As in Equinox, a transformed function is a PyTree: its children are the wrapped callable
(so the arrays of a wrapped Module are leaves that gradients, `tree_at`, optimisers and
serialisation reach) and the transform's options, laid out as Equinox lays out its own
wrappers, so leaf counts and order agree. Wrappers around equal functions with equal
options compare equal (and hash equal where their leaves are hashable); they copy,
deep-copy and pickle whenever the wrapped callable does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.tree_util as jtu
import numpy as np

__all__ = [
    "Wrapper",
    "BoundWrapper",
    "copy_metadata",
    "metadata_of",
    "tree_equal",
    "callable_name",
]


class _NoFunction:
    """The default of a transform's `fun`: called without one, a transform returns a
    decorator taking the function (`@filter_jit(donate="all")`)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<no function given>"


NO_FUNCTION: Any = _NoFunction()


def callable_name(fun: Any) -> str:
    name = getattr(fun, "__name__", None)
    return name if isinstance(name, str) else type(fun).__name__


def metadata_of(fun: Any) -> dict[str, Any]:
    """What `functools.update_wrapper(wrapper, fun, updated=())` copies, less
    `__wrapped__` (a property of every wrapper, so that it follows the children), and
    without failing on callables that lack some of the attributes."""
    metadata = {}
    for name in ("__module__", "__name__", "__qualname__", "__doc__", "__annotations__"):
        try:
            metadata[name] = getattr(fun, name)
        except AttributeError:
            if name in ("__name__", "__qualname__"):
                metadata[name] = callable_name(fun)
    return metadata


def copy_metadata(wrapper: Any, fun: Any) -> None:
    """Give `wrapper` the name, qualified name, module, docstring and annotations of `fun`."""
    wrapper.__dict__.update(metadata_of(fun))


def _is_array(x: Any) -> bool:
    return isinstance(x, jax.Array | np.ndarray | np.generic)


def _leaf_equal(x: Any, y: Any) -> bool:
    if x is y:
        return True
    if _is_array(x) or _is_array(y):
        if not (_is_array(x) and _is_array(y)):
            return False
        if isinstance(x, jax.core.Tracer) or isinstance(y, jax.core.Tracer):
            return False  # only the same tracer is known to be equal
        if np.shape(x) != np.shape(y) or x.dtype != y.dtype:
            return False
        return bool(np.array_equal(np.asarray(x), np.asarray(y)))
    try:
        return bool(x == y)
    except Exception:
        return False


def tree_equal(a: Any, b: Any) -> bool:
    """Same structure, and leaves pairwise equal (arrays by shape, dtype and value)."""
    def_a: Any  # jaxlib ships no stub for PyTreeDef
    leaves_a, def_a = jtu.tree_flatten(a)
    leaves_b, def_b = jtu.tree_flatten(b)
    try:
        if def_a != def_b:
            return False
    except Exception:
        return False
    return all(_leaf_equal(x, y) for x, y in zip(leaves_a, leaves_b, strict=True))


class Wrapper:
    """A transformed function: callable, and a PyTree node.

    Subclasses set `_transform` (the public name, for reprs) and `_child_names` (the
    attributes that are PyTree children, in Equinox's field order), and override where the
    defaults below do not fit: `_tree_flatten() -> (children, aux)`,
    `_tree_unflatten(aux, children)` (cheap: no work that could fail on placeholder
    leaves), `_wrapped()` (the callable as given) and `_reduce()` (how to make an equal
    wrapper again, for copy and pickle).
    """

    __slots__ = ()
    _transform = "wrapper"
    _child_names: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        keys = tuple(jtu.GetAttrKey(name) for name in cls._child_names)

        def flatten_with_keys(wrapper):
            children, aux = wrapper._tree_flatten()
            return tuple(zip(keys, children, strict=True)), aux

        jtu.register_pytree_with_keys(
            cls, flatten_with_keys, cls._tree_unflatten, flatten_func=cls._tree_flatten
        )

    # Defaults for wrappers whose children are exactly their `_child_names` attributes,
    # whose static part is empty, whose `__init__` takes the children in that order and
    # whose first child is the wrapped callable.

    def __init__(self, *children: Any) -> None:
        for name, child in zip(self._child_names, children, strict=True):
            setattr(self, name, child)
        copy_metadata(self, self._wrapped())

    def _tree_flatten(self) -> tuple[tuple, Any]:
        return tuple(getattr(self, name) for name in self._child_names), None

    @classmethod
    def _tree_unflatten(cls, aux: Any, children: Any) -> Any:
        return cls(*children)

    def _wrapped(self) -> Any:
        return getattr(self, self._child_names[0])

    def _reduce(self) -> tuple[Callable, tuple]:
        return type(self), self._tree_flatten()[0]

    @property
    def __wrapped__(self) -> Any:
        return self._wrapped()

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Wrapper)
        children, aux = self._tree_flatten()
        other_children, other_aux = other._tree_flatten()
        try:
            same_aux = bool(aux == other_aux)
        except Exception:
            return False
        return same_aux and tree_equal(children, other_children)

    def __hash__(self) -> int:
        children, aux = self._tree_flatten()
        return hash((type(self), aux, tuple(jtu.tree_leaves(children))))

    def __reduce__(self) -> tuple[Callable, tuple]:
        return self._reduce()

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        return BoundWrapper(self, instance)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"<{self._transform}({callable_name(self._wrapped())})>"


class BoundWrapper:
    """`wrapper.__get__(instance)`: the wrapper with `instance` as its first argument.

    A PyTree (both the wrapper and the instance are children), like the bound methods of
    Equinox Modules, so that arrays held by the instance are seen by outer transforms.
    """

    __slots__ = ("__func__", "__self__")

    def __init__(self, func: Callable, instance: Any):
        self.__func__ = func
        self.__self__ = instance

    def __call__(self, *args, **kwargs):
        return self.__func__(self.__self__, *args, **kwargs)

    @property
    def __wrapped__(self):
        return self.__func__

    def __eq__(self, other: object) -> bool:
        if type(other) is not BoundWrapper:
            return NotImplemented
        return self.__func__ == other.__func__ and tree_equal(self.__self__, other.__self__)

    def __hash__(self) -> int:
        return hash((self.__func__, tuple(jtu.tree_leaves(self.__self__))))

    def __reduce__(self):
        return BoundWrapper, (self.__func__, self.__self__)

    def __repr__(self) -> str:
        return f"<bound {self.__func__!r} of {self.__self__!r}>"


jtu.register_pytree_node(
    BoundWrapper,
    lambda b: ((b.__func__, b.__self__), None),
    lambda _, children: BoundWrapper(*children),
)
