"""Parameter-tree helpers: split/combine, path access, flatten/unflatten."""

from __future__ import annotations

import copy

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jpeft
from jpeft.core import tree as T

SETTINGS = settings(
    derandomize=True, max_examples=150, deadline=None, suppress_health_check=list(HealthCheck)
)

keys = st.sampled_from(["a", "b", "kernel", "bias", "lora_A", "lora_B", "0", "1", "layers", "x.y"])


def _leaf(shape_seed):
    shape, seed = shape_seed
    return np.random.RandomState(seed).standard_normal(shape).astype(np.float32)


leaves = st.tuples(st.lists(st.integers(1, 3), max_size=2).map(tuple), st.integers(0, 2**16)).map(_leaf)


def trees(allow_empty: bool):
    """Nested dicts with str keys and array leaves (optionally with empty sub-dicts)."""
    min_size = 0 if allow_empty else 1
    return st.recursive(
        leaves,
        lambda children: st.dictionaries(keys, children, min_size=min_size, max_size=4),
        max_leaves=12,
    ).filter(lambda t: isinstance(t, dict))


@st.composite
def tree_and_mask(draw, allow_empty=True):
    t = draw(trees(allow_empty))
    n = len(jax.tree.leaves(t))
    bits = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    mask = jax.tree.unflatten(jax.tree.structure(t), bits)
    return t, mask


def _same_tree(a, b):
    """Same structure and the very same leaf objects."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x is y


@SETTINGS
@given(tree_and_mask())
def test_split_combine_round_trip(case):
    t, mask = case
    selected, rest = jpeft.split(t, mask)
    # both halves keep the structure of the tree, with None holes
    is_none = lambda x: x is None  # noqa: E731
    assert jax.tree.structure(selected, is_leaf=is_none) == jax.tree.structure(t)
    assert jax.tree.structure(rest, is_leaf=is_none) == jax.tree.structure(t)
    flat_t = T.flatten(t)
    flat_m = T.flatten(mask)
    flat_sel = dict(jax.tree_util.tree_flatten_with_path(selected, is_leaf=is_none)[0])
    flat_rest = dict(jax.tree_util.tree_flatten_with_path(rest, is_leaf=is_none)[0])
    assert len(flat_sel) == len(flat_rest) == len(flat_t)
    assert flat_m.keys() == flat_t.keys()
    for path, leaf in flat_t.items():
        m = flat_m[path]
        jpath = tuple(jax.tree_util.DictKey(k) for k in path)
        assert flat_sel[jpath] is (leaf if m else None)
        assert flat_rest[jpath] is (None if m else leaf)
    _same_tree(jpeft.combine(selected, rest), t)
    _same_tree(jpeft.combine(rest, selected), t)
    # the trainable half alone holds exactly the masked leaves
    assert len(jax.tree.leaves(selected)) == sum(jax.tree.leaves(mask))


@SETTINGS
@given(tree_and_mask())
def test_split_does_not_mutate(case):
    t, mask = case
    before = copy.deepcopy(t)
    jpeft.split(t, mask)
    assert T.flatten(t).keys() == T.flatten(before).keys()
    for x, y in zip(T.flatten(t).values(), T.flatten(before).values(), strict=True):
        np.testing.assert_array_equal(x, y)


def test_combine_first_non_none_wins():
    a = {"p": None, "q": {"r": 1}}
    b = {"p": 2, "q": {"r": 3}}
    assert T.combine(a, b) == {"p": 2, "q": {"r": 1}}
    assert T.combine({"p": None}, {"p": None}) == {"p": None}


@SETTINGS
@given(trees(allow_empty=False))
def test_flatten_unflatten_inverse(t):
    flat = T.flatten(t)
    assert all(isinstance(p, tuple) and p for p in flat)
    assert list(flat) == [p for p, _ in T.iter_leaves(t)]
    back = T.unflatten(flat)
    _same_tree(back, t)
    assert T.flatten(back).keys() == flat.keys()
    # key order is preserved too
    assert list(T.flatten(back)) == list(flat)


@SETTINGS
@given(trees(allow_empty=False), st.data())
def test_set_path_does_not_mutate_and_sets(t, data):
    paths = list(T.flatten(t))
    path = data.draw(st.sampled_from(paths))
    snapshot = copy.deepcopy(t)
    ids = {p: id(v) for p, v in T.flatten(t).items()}
    new_value = np.full((2,), 7.0, np.float32)
    new = T.set_path(t, path, new_value)
    # input untouched: same keys, same leaf objects, same values
    assert {p: id(v) for p, v in T.flatten(t).items()} == ids
    for x, y in zip(T.flatten(t).values(), T.flatten(snapshot).values(), strict=True):
        np.testing.assert_array_equal(x, y)
    assert T.get_path(new, path) is new_value
    assert new is not t
    # everything else is unchanged (and shared)
    for p, v in T.flatten(new).items():
        if p != path:
            assert v is T.get_path(t, p)


def test_set_path_copies_only_along_path_and_creates_missing():
    t = {"a": {"b": np.ones(2)}, "c": {"d": np.zeros(1)}}
    new = T.set_path(t, ("a", "x", "y"), 5)
    assert new["c"] is t["c"]  # untouched subtrees are shared
    assert new["a"] is not t["a"]
    assert "x" not in t["a"]
    assert T.get_path(new, ("a", "x", "y")) == 5
    assert T.get_path(new, ("a", "b")) is t["a"]["b"]
    assert T.set_path(t, (), 3) == 3


def test_get_path_error_names_the_path():
    t = {"transformer": {"h": {"0": {"kernel": np.ones(2)}}}}
    with pytest.raises(KeyError) as info:
        T.get_path(t, ("transformer", "h", "1", "kernel"))
    assert "transformer/h/1" in str(info.value)
    # walking into a leaf is the same error, naming the path up to the step that failed
    with pytest.raises(KeyError) as info:
        T.get_path(t, ("transformer", "h", "0", "kernel", "deeper"))
    assert "transformer/h/0/kernel/deeper" in str(info.value)
    assert T.get_path(t, ()) is t
    assert T.has_path(t, ("transformer", "h")) and not T.has_path(t, ("nope",))


def test_to_plain_dict_and_count_params():
    from flax.core import FrozenDict

    frozen = FrozenDict({"a": {"b": np.ones((2, 3))}, "c": np.ones(4)})
    plain = T.to_plain_dict(frozen)
    assert type(plain) is dict and type(plain["a"]) is dict
    assert T.count_params(plain) == 10
    assert T.count_params(plain, where=lambda x: x.ndim == 2) == 6
