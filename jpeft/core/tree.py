"""Parameter trees: path access, flattening, and the trainable/frozen split.

A parameter tree here is a nest of ``dict``s with ``str`` keys and array leaves, the
shape used by Flax linen (``params``), by transformers' Flax models and by NNX state
converted with ``nnx.to_pure_dict``. Paths are tuples of keys.

A path may hold a :class:`Row`: one position along the leading axis of every leaf below
it. That is how one layer of a stacked (``nnx.scan``/``nnx.vmap``-built) module is named:
``("layers", Row(3), "attn", "q", "kernel")`` is row 3 of the stacked ``layers.attn.q.kernel``,
and its dotted form ``layers.3.attn.q.kernel`` is the torch name of that layer.

``split``/``combine`` follow equinox's ``partition``/``combine``: ``None`` marks a hole,
so ``combine(*split(tree, mask)) == tree``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax

PyTree = Any
Path = tuple[str, ...]


class Row(str):
    """A path element selecting one row of the leading (stacked-layer) axis of the leaves below it.

    A ``str`` (its text is the row number) so that dotted names read as torch's do.
    """

    __slots__ = ("position",)
    position: int

    def __new__(cls, position: int) -> Row:
        row = super().__new__(cls, str(position))
        row.position = position
        return row

    def __reduce__(self) -> tuple[Any, ...]:
        return (Row, (self.position,))


def _split_rows(path: Path) -> tuple[Path, tuple[int, ...]]:
    """``path`` without its :class:`Row` elements, and the rows in order (outermost first)."""
    rows = tuple(key.position for key in path if isinstance(key, Row))
    if not rows:
        return path, ()
    return tuple(key for key in path if not isinstance(key, Row)), rows


def _take_rows(value: Any, rows: tuple[int, ...]) -> Any:
    return jax.tree.map(lambda leaf: leaf[rows], value)


def _put_rows(old: Any, rows: tuple[int, ...], new: Any) -> Any:
    import jax.numpy as jnp

    return jax.tree.map(lambda o, n: jnp.asarray(o).at[rows].set(jnp.asarray(n, jnp.asarray(o).dtype)), old, new)


def iter_leaves(tree: Mapping[str, Any], prefix: Path = ()) -> Iterator[tuple[Path, Any]]:
    """Yields ``(path, leaf)`` for every non-dict leaf, depth first, in key order."""
    for key in tree:
        value = tree[key]
        path = (*prefix, key)
        if isinstance(value, Mapping):
            yield from iter_leaves(value, path)
        else:
            yield path, value


def flatten(tree: Mapping[str, Any]) -> dict[Path, Any]:
    """Returns ``{path: leaf}`` for a nested-dict tree."""
    return dict(iter_leaves(tree))


def unflatten(flat: Mapping[Path, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten`."""
    tree: dict[str, Any] = {}
    for path, leaf in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return tree


def get_path(tree: Mapping[str, Any], path: Path) -> Any:
    """Returns the subtree or leaf at ``path``; raises ``KeyError`` naming the missing key.

    With :class:`Row` elements, the rows of every leaf below (a stacked layer's slice).
    """
    path, rows = _split_rows(path)
    if rows:
        return _take_rows(get_path(tree, path), rows)
    node: Any = tree
    for i, key in enumerate(path):
        if not isinstance(node, Mapping) or key not in node:
            raise KeyError(f"no entry {'/'.join(path[: i + 1])!r} in the parameter tree")
        node = node[key]
    return node


def has_path(tree: Mapping[str, Any], path: Path) -> bool:
    try:
        get_path(tree, path)
    except KeyError:
        return False
    return True


def set_path(tree: Mapping[str, Any], path: Path, value: Any) -> dict[str, Any]:
    """Returns a copy of ``tree`` with ``value`` at ``path``; the input is never mutated.

    Only the dicts along ``path`` are copied; every other subtree is shared. With
    :class:`Row` elements, ``value`` replaces those rows of the stacked leaves there.
    """
    stripped, rows = _split_rows(path)
    if rows:
        return set_path(tree, stripped, _put_rows(get_path(tree, stripped), rows, value))
    if not path:
        return value
    head, *rest = path
    new = dict(tree)
    new[head] = set_path(tree.get(head, {}), tuple(rest), value) if rest else value
    return new


def to_plain_dict(tree: Any) -> Any:
    """Converts ``FrozenDict`` (or any mapping) nests to plain ``dict`` nests."""
    if isinstance(tree, Mapping):
        return {key: to_plain_dict(value) for key, value in tree.items()}
    return tree


def _is_none(x: Any) -> bool:
    return x is None


def split(tree: PyTree, mask: PyTree) -> tuple[PyTree, PyTree]:
    """Splits ``tree`` by a boolean ``mask`` of the same structure.

    Returns:
      ``(selected, rest)``: two trees of the structure of ``tree`` where ``selected``
      holds the leaves whose mask is ``True`` and ``None`` elsewhere, and ``rest`` the
      opposite. ``combine(selected, rest)`` gives ``tree`` back.
    """
    selected = jax.tree.map(lambda m, x: x if m else None, mask, tree)
    rest = jax.tree.map(lambda m, x: None if m else x, mask, tree)
    return selected, rest


def combine(*trees: PyTree) -> PyTree:
    """Merges trees of one structure, taking at each leaf the first one that is not ``None``."""

    def pick(*leaves: Any) -> Any:
        for leaf in leaves:
            if leaf is not None:
                return leaf
        return None

    return jax.tree.map(pick, *trees, is_leaf=_is_none)


def count_params(tree: PyTree, where: Callable[[Any], bool] | None = None) -> int:
    """Number of scalar parameters in ``tree`` (optionally only leaves where ``where`` holds)."""
    total = 0
    # a quantized kernel counts its original elements, as PEFT counts bitsandbytes' 4-bit params
    for leaf in jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "dequantize")):
        if where is None or where(leaf):
            total += int(getattr(leaf, "size", 1))
    return total
