"""gen.tree: the state's nested dicts, their leaf order, and rebuilding a tree from its leaves."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gen.tree import flatten, leaves, to_device, unflatten, with_leaves

names = st.text(alphabet="abcxyz.", min_size=1, max_size=4).filter(lambda s: "/" not in s)
trees = st.recursive(st.just(None), lambda children: st.dictionaries(names, children, max_size=4), max_leaves=12)


def with_tensors(shape_tree, counter=None):
    """A tree of distinct 0-d tensors numbered in visiting order (None marks a leaf)."""
    counter = counter if counter is not None else [0]
    out = {}
    for key, value in shape_tree.items():
        if isinstance(value, dict):
            out[key] = with_tensors(value, counter)
        else:
            out[key] = torch.tensor(float(counter[0]))
            counter[0] += 1
    return out


@settings(max_examples=60, deadline=None)
@given(trees.filter(lambda t: isinstance(t, dict)))
def test_leaves_follow_flatten_order_and_with_leaves_inverts_them(shape_tree):
    tree = with_tensors(shape_tree)
    found = leaves(tree)
    assert [t.item() for t in found] == [t.item() for t in flatten(tree).values()]
    assert [t.item() for t in found] == list(range(len(found)))          # depth first, key order
    rebuilt = with_leaves(tree, found)
    assert flatten(rebuilt).keys() == flatten(tree).keys()
    assert all(a is b for a, b in zip(leaves(rebuilt), found))
    doubled = with_leaves(tree, [2 * t for t in found])
    assert [t.item() for t in leaves(doubled)] == [2 * t.item() for t in found]


def test_with_leaves_keeps_empty_subtrees_and_flatten_round_trips():
    tree = {"params": {"w": torch.ones(2)}, "model_state": {}, "opt_state": {"count": torch.tensor(3)}}
    rebuilt = with_leaves(tree, [torch.zeros(2), torch.tensor(4)])
    assert list(rebuilt) == ["params", "model_state", "opt_state"] and rebuilt["model_state"] == {}
    assert rebuilt["opt_state"]["count"].item() == 4
    assert unflatten(flatten(tree))["params"]["w"].tolist() == [1.0, 1.0]


def test_unflatten_refuses_a_name_that_is_both_a_tensor_and_a_folder():
    for flat in ({"a/b": torch.ones(1), "a": torch.ones(1)}, {"a": torch.ones(1), "a/b": torch.ones(1)}):
        with pytest.raises(ValueError, match="'a"):
            unflatten(flat)


def test_to_device_gives_every_leaf_its_own_storage():
    """Two leaves sharing one tensor (or the caller's tensor itself) would be one buffer to a donated
    step and a shared tensor to safetensors, which refuses it."""
    shared = torch.ones(2)
    moved = to_device({"a": shared, "b": {"c": shared}}, "cpu")
    pointers = {moved["a"].untyped_storage().data_ptr(), moved["b"]["c"].untyped_storage().data_ptr()}
    assert len(pointers) == 2 and shared.untyped_storage().data_ptr() not in pointers
