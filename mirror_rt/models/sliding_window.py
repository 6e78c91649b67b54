"""Sliding-window attention masks (Mistral, and Qwen2 / Qwen3 with ``use_sliding_window``).

A query at position p may attend to the keys at positions k with ``p - window < k <= p``, as
transformers' ``sliding_window_overlay`` (``kv_idx > q_idx - sliding_window``). Committed cache
slots hold their own positions (slot i = position i). The tree kernels (``ops.tree_attention``)
have no window: when a window can cut a tree's view of the prefix, the runner attends through a
dense mask built here instead (SDPA), exact at every position.
"""
from __future__ import annotations

import torch


def chain_window(start: int, T: int, window: int, device):
    """A chain of T new tokens at slots start..start+T-1 (slot = position): (lo, mask) with keys
    read from slots [lo, start + T) and mask [T, start + T - lo] bool (True = may attend), or
    None when one token sees every key in its slice."""
    end = start + T
    lo = max(0, start - window + 1)  # the first key any of the T queries can see
    if T == 1:
        return lo, None
    k = torch.arange(lo, end, device=device)[None, :]
    q = torch.arange(start, end, device=device)[:, None]
    return lo, (k <= q) & (k > q - window)


def tree_may_cross(length: int, tree_offset: int, T: int, window: int) -> bool:
    """Whether a window can hide any key from a tree forward's queries. A tree node's position is
    its depth past the committed prefix, at most its slot, so every query sits below slot
    length + tree_offset + T and, within that many tokens, sees every key."""
    return length + tree_offset + T > window


def check_tree_depth(tree_offset: int, T: int, window: int):
    """Earlier uncommitted tree nodes (tree_offset > 0) have no positions here: their keys stay
    visible, exact while no tree is as deep as the window."""
    if tree_offset and tree_offset + T > window:
        raise ValueError(f"a token tree of {tree_offset + T} nodes built over several forwards can reach past the "
                         f"model's sliding window ({window} tokens); use a window or tree smaller than the "
                         "sliding window")


def tree_window_mask(length: int, tree_offset: int, positions, tree_mask, window: int):
    """Dense mask [B, 1, T, length + tree_offset + T] bool over cache slots [0, end) for T tree
    queries at ``positions`` [B, T] (their nodes at slots length + tree_offset + i), with
    ``tree_mask`` [B, T, tree_offset + T] saying which tree nodes each query may attend to."""
    check_tree_depth(tree_offset, positions.shape[1], window)
    lowest = positions[:, :, None] - window  # [B, T, 1]: keys must lie above this position
    prefix = torch.arange(length, device=positions.device)[None, None, :] > lowest
    tree = tree_mask.clone()
    tree[:, :, tree_offset:] &= positions[:, None, :] > lowest  # the new nodes' own positions
    return torch.cat([prefix, tree], dim=2)[:, None]


def static_chain_mask(slots, capacity: int, window: int | None):
    """[T, capacity] for a static-shape forward: keys at or before each query's slot (and
    inside the window when one is given); stale slots after the queries are masked out."""
    k = torch.arange(capacity, device=slots.device)[None, :]
    mask = k <= slots[:, None]
    return mask if window is None else mask & (k > slots[:, None] - window)


def static_tree_window_mask(length_t, tree_offset: int, positions, tree_mask, window: int, capacity: int):
    """``tree_window_mask`` over the whole capacity for a static-shape forward: [B, 1, T, capacity],
    with the committed length as a device tensor length_t [1] int64 (no host sync)."""
    check_tree_depth(tree_offset, positions.shape[1], window)
    B, T = positions.shape
    k = torch.arange(capacity, device=positions.device)
    lowest = positions[:, :, None] - window
    mask = (k[None, None, :] < length_t) & (k[None, None, :] > lowest)  # the committed prefix
    tree = tree_mask.clone()
    tree[:, :, tree_offset:] &= positions[:, None, :] > lowest
    tree_slots = length_t + torch.arange(tree_offset + T, device=positions.device)
    return mask.index_copy(2, tree_slots, tree)[:, None]
