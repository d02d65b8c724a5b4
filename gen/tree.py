"""Nested dicts of tensors ("trees"): the one container gen's state lives in.

A model's parameters are a flat `dict[str, Tensor]` with dotted torch-style
names (`encoder.fc1.weight`). A training state nests such dicts
(`{"params": {...}, "opt_state": {"mu": {...}}}`); `flatten` joins the levels
with "/" so the whole state is one safetensors file, and `unflatten` undoes it.
"""

from typing import Callable

import torch
from torch import Tensor

Params = dict[str, Tensor]
Tree = dict  # str -> Tensor | Tree


def with_prefix(prefix: str, params: Params) -> Params:
    """{"weight": w} -> {"prefix.weight": w}: how layers compose into a model."""
    return {f"{prefix}.{name}": value for name, value in params.items()}


def take(params: Params, prefix: str) -> Params:
    """The inverse of `with_prefix`: the entries under `prefix.`, prefix removed."""
    start = prefix + "."
    return {name[len(start):]: value for name, value in params.items() if name.startswith(start)}


def flatten(tree: Tree, separator: str = "/") -> dict[str, Tensor]:
    """{"a": {"b.c": t}} -> {"a/b.c": t}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            for sub_key, leaf in flatten(value, separator).items():
                flat[f"{key}{separator}{sub_key}"] = leaf
        else:
            flat[key] = value
    return flat


def unflatten(flat: dict[str, Tensor], separator: str = "/") -> Tree:
    """{"a/b.c": t} -> {"a": {"b.c": t}}. A ValueError where one name is both a tensor and a
    folder of others ({"a": t, "a/b": u}): no tree flattens to that."""
    tree: Tree = {}
    for key, value in flat.items():
        *parents, leaf = key.split(separator)
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
            if not isinstance(node, dict):
                raise ValueError(f"'{key}' lies under '{parent}', which is a tensor")
        if isinstance(node.get(leaf), dict):
            raise ValueError(f"'{key}' is a tensor and also holds others")
        node[leaf] = value
    return tree


def tree_map(fn: Callable[[Tensor], Tensor], tree: Tree) -> Tree:
    """Apply `fn` to every tensor, keeping the nesting and key order."""
    return {k: tree_map(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def leaves(tree: Tree) -> list[Tensor]:
    """Every tensor of the tree, depth first in key order (the order of `flatten`).

    Written without key strings or torch's pytree: compiled steps call it, and
    Dynamo traces every Python line it runs (see `with_leaves`)."""
    found = []
    for value in tree.values():
        if isinstance(value, dict):
            found.extend(leaves(value))
        else:
            found.append(value)
    return found


def with_leaves(tree: Tree, new_leaves) -> Tree:
    """The tree with its leaves replaced, in `leaves` order: `with_leaves(t, leaves(t))` equals t.

    For a compiled function that must pass a tree through a tensors-only boundary
    (gen/gan.py's critic update). torch.utils._pytree does the same, but Dynamo
    traces its TreeSpec objects line by line (gen/compilation.py)."""
    remaining = iter(new_leaves)
    return tree_map(lambda _: next(remaining), tree)  # tree_map visits leaves in `leaves` order


def to_device(tree: Tree, device: torch.device | str) -> Tree:
    # .contiguous().clone() makes every leaf its own storage: Dynamo guards on
    # tensor identity and safetensors refuses shared tensors.
    return tree_map(lambda t: t.to(device).contiguous().clone(), tree)
