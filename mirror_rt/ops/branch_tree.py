"""Mirror-SD's batched rollout tree for the draft (DESIGN.md §1 step 3).

From the window ``w_1..w_gamma`` and the exit head's top-kappa ids ``E`` [gamma+1, kappa], every
branch (i, v) with v in E_i, v != w_{i+1}, has the context (committed prefix, w_1..w_i, v). All of
them share the prefix and the window, so the draft runs them as ONE token tree over its KV cache,
one forward per rollout step, with ``tree_attention``:

    tree = build_branch_tree(window, exit_ids, max_branches=32)
    # forward 1: queries = all nodes          (tree.step_start = 0)
    # forward s: queries = nodes appended by the last extend_branch_tree
    q_nodes = slice(tree.step_start, tree.num_nodes)
    tokens, pos = tree.tokens[q_nodes], committed_len + tree.positions[q_nodes]   # RoPE positions
    mask = tree.mask_bits[q_nodes].unsqueeze(0)          # [1, Tq, W] packed: tree_attention_cpu takes it
    k_tree = draft_k[:, committed_len : committed_len + tree.num_nodes]   # KV of every tree node so far
    ...                                                   # sample next tokens per branch tip
    extend_branch_tree(tree, next_tokens)                # [num_branches, n_new] int64

Node order: window chain (nodes 0..gamma-1), one root per branch (gamma..gamma+nb-1), then n_new
nodes per branch per step (branch-major, token-minor). A branch's KV cache after acceptance is the
gather of ``tree.branch_nodes(k)``.

The public functions dispatch to ``mirror_rt._C`` when built; ``*_ref`` are the slow, obvious
Python references they are tested against.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class BranchTree:
    """A rollout tree in buffers of ``capacity`` nodes; nodes [0, num_nodes) are valid.

    tokens       [capacity] int64   node tokens
    parents      [capacity] int32   parent node, -1 = hangs directly off the committed prefix
    positions    [capacity] int64   depth below the committed prefix (w_1 -> 0); RoPE position is
                                    committed_len + positions
    mask_bits    [capacity, W] int32  packed ancestor-or-self rows, W = ceil(capacity / 32):
                                    node j is bit j % 32 of word j // 32 (tree_attention's format)
    branch_pos   [nb] int32  i of branch k: its root follows w_1..w_i
    branch_rank  [nb] int32  rank r of its root token in E_i (0 = the exit head's best)
    branch_tip   [nb] int32  node id of each branch's deepest node
    gamma, num_nodes; step_start: first node of the latest build/extend (the next forward's queries)
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    positions: torch.Tensor
    mask_bits: torch.Tensor
    branch_pos: torch.Tensor
    branch_rank: torch.Tensor
    branch_tip: torch.Tensor
    gamma: int
    num_nodes: int
    step_start: int = 0

    @property
    def capacity(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_branches(self) -> int:
        return self.branch_pos.shape[0]

    @property
    def branch_token(self) -> torch.Tensor:
        """[nb] int64: the root token v of each branch."""
        return self.tokens[self.gamma: self.gamma + self.num_branches]

    def find_branch(self, pos: int, token: int) -> int:
        """Index of branch (pos, token) or -1 (Mirror reuse: is the correction c in E_A?)."""
        hit = ((self.branch_pos == pos) & (self.branch_token == token)).nonzero()
        return int(hit[0, 0]) if len(hit) else -1

    def branch_nodes(self, k: int) -> torch.Tensor:
        """[depth] int64 node ids of branch k's context root-first: w_1..w_i, v, its rollouts."""
        path, node = [], int(self.branch_tip[k])
        while node >= 0:
            path.append(node)
            node = int(self.parents[node])
        return torch.tensor(path[::-1], dtype=torch.int64)

    def dense_mask(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """bool [end - start, num_nodes] rows of the mask (for the reference / Triton kernels)."""
        end = self.num_nodes if end is None else end
        return unpack_mask(self.mask_bits[start:end], self.num_nodes)


# ---------------------------------------------------------------------------------------------
# mask packing
# ---------------------------------------------------------------------------------------------

def pack_mask_ref(mask: torch.Tensor, words: int | None = None) -> torch.Tensor:
    """bool [..., T] -> int32 [..., words] (default ceil(T/32)): node j is bit j % 32 of word j // 32."""
    T = mask.shape[-1]
    words = (T + 31) // 32 if words is None else words
    padded = torch.zeros(*mask.shape[:-1], words * 32, dtype=torch.int64)
    padded[..., :T] = mask.long()
    packed = (padded.view(*mask.shape[:-1], words, 32) << torch.arange(32)).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_mask(bits: torch.Tensor, T: int) -> torch.Tensor:
    """int32 [..., W] -> bool [..., T] (inverse of pack_mask_ref)."""
    j = torch.arange(T)
    return ((bits.long()[..., j // 32] >> (j % 32)) & 1).bool()


# ---------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------

def _empty_tree(capacity, gamma, nb):
    W = (capacity + 31) // 32
    return BranchTree(
        tokens=torch.zeros(capacity, dtype=torch.int64), parents=torch.full((capacity,), -1, dtype=torch.int32),
        positions=torch.zeros(capacity, dtype=torch.int64), mask_bits=torch.zeros(capacity, W, dtype=torch.int32),
        branch_pos=torch.zeros(nb, dtype=torch.int32), branch_rank=torch.zeros(nb, dtype=torch.int32),
        branch_tip=torch.zeros(nb, dtype=torch.int32), gamma=gamma, num_nodes=0)


def _branch_list(window, exit_ids, max_branches):
    gamma, kappa = len(window), exit_ids.shape[1]
    out = []
    for i in range(gamma + 1):
        for r in range(kappa):
            v = int(exit_ids[i, r])
            if v < 0 or (i < gamma and v == int(window[i])):
                continue  # a hole (no branch chosen), or the window itself
            out.append((i, r))
    return out if max_branches is None else out[:max_branches]


def _default_capacity(gamma, nb):
    # Room for gamma rollout steps of one token per branch, within the packed-mask limit of 256.
    return max(gamma + nb, min(256, gamma + nb * (1 + gamma)))


def _check(window, exit_ids, max_branches):
    for name, t in (("window", window), ("exit_ids", exit_ids)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be int32 or int64 token ids, got {t.dtype}")
    if window.dim() != 1:
        raise ValueError(f"window must be [gamma], got shape {tuple(window.shape)}")
    if exit_ids.dim() != 2 or exit_ids.shape[0] != window.shape[0] + 1:
        raise ValueError(f"exit_ids must be [gamma+1={window.shape[0] + 1}, kappa], got shape {tuple(exit_ids.shape)}")
    if max_branches is not None and max_branches < 0:
        raise ValueError(f"max_branches must be >= 0 or None, got {max_branches}")


def build_branch_tree_ref(window, exit_ids, max_branches=None, capacity=None) -> BranchTree:
    """Reference of build_branch_tree (same arguments and result)."""
    _check(window, exit_ids, max_branches)
    gamma = window.shape[0]
    branches = _branch_list(window, exit_ids, max_branches)
    capacity = _default_capacity(gamma, len(branches)) if capacity is None else capacity
    if gamma + len(branches) > capacity:
        raise ValueError(f"capacity {capacity} too small for the window and its branches")
    tree = _empty_tree(capacity, gamma, len(branches))
    nodes = [(int(window[k]), k - 1) for k in range(gamma)]
    nodes += [(int(exit_ids[i, r]), i - 1) for i, r in branches]
    for node, (tok, parent) in enumerate(nodes):
        _add_node_ref(tree, node, tok, parent)
    for k, (i, r) in enumerate(branches):
        tree.branch_pos[k], tree.branch_rank[k], tree.branch_tip[k] = i, r, gamma + k
    tree.num_nodes = gamma + len(branches)
    return tree


def _add_node_ref(tree, node, token, parent):
    ancestors = torch.zeros(tree.capacity, dtype=torch.bool)
    if parent >= 0:
        ancestors = unpack_mask(tree.mask_bits[parent], tree.capacity)
    ancestors[node] = True
    tree.mask_bits[node] = pack_mask_ref(ancestors, tree.mask_bits.shape[1])
    tree.tokens[node], tree.parents[node] = token, parent
    tree.positions[node] = tree.positions[parent] + 1 if parent >= 0 else 0


def extend_branch_tree_ref(tree: BranchTree, new_tokens) -> BranchTree:
    """Reference of extend_branch_tree (same arguments and result)."""
    new_tokens = _check_new(tree, new_tokens)
    start = tree.num_nodes
    for k in range(tree.num_branches):
        for s in range(new_tokens.shape[1]):
            _add_node_ref(tree, tree.num_nodes, int(new_tokens[k, s]), int(tree.branch_tip[k]))
            tree.branch_tip[k] = tree.num_nodes
            tree.num_nodes += 1
    tree.step_start = start
    return tree


def _check_new(tree, new_tokens):
    if not isinstance(new_tokens, torch.Tensor) or new_tokens.dtype not in (torch.int32, torch.int64):
        raise TypeError("new_tokens must be an int32/int64 torch.Tensor [num_branches, n_new]")
    if new_tokens.dim() == 1:
        new_tokens = new_tokens.unsqueeze(1)
    if new_tokens.dim() != 2 or new_tokens.shape[0] != tree.num_branches or new_tokens.shape[1] < 1:
        raise ValueError(f"new_tokens must be [num_branches={tree.num_branches}, n_new>=1], got shape {tuple(new_tokens.shape)}")
    if tree.num_nodes + new_tokens.numel() > tree.capacity:
        raise ValueError(f"tree capacity {tree.capacity} exceeded: {tree.num_nodes} nodes + {new_tokens.numel()} new")
    return new_tokens


# ---------------------------------------------------------------------------------------------
# public ops (C++ when built)
# ---------------------------------------------------------------------------------------------

def _cpp():
    try:
        from mirror_rt import _C
    except ImportError:
        return None
    return _C if hasattr(_C, "build_branch_tree") else None


def build_branch_tree(window, exit_ids, max_branches=None, capacity=None) -> BranchTree:
    """Rollout tree of the window chain plus one root node per branch.

    window      [gamma] int32/int64   the draft's window w_1..w_gamma
    exit_ids    [gamma+1, kappa] int32/int64   E_i, best first (row i: after w_1..w_i); an id < 0
                is a hole (no branch there), so rows may hold different numbers of candidates
    max_branches  keep the first branches in (position, rank) order; None = all
    capacity    node capacity for later extend_branch_tree calls; None = room for gamma steps of
                one token per branch, at most 256 nodes (tree_attention's limit) but never fewer
                than the built tree
    Branch (i, r) with token v = E[i, r] is skipped when v < 0 or v == window[i] (the window itself).
    Returns a BranchTree with num_nodes = gamma + num_branches and step_start = 0.
    """
    C = _cpp()
    if C is None:
        return build_branch_tree_ref(window, exit_ids, max_branches, capacity)
    _check(window, exit_ids, max_branches)
    gamma, kappa = window.shape[0], exit_ids.shape[1]
    w = window.to(torch.int64).contiguous()
    e = exit_ids.to(torch.int64).contiguous()
    nmax = (gamma + 1) * kappa
    if capacity is None:
        nb = nmax - int((e < 0).sum()) - int((e[:gamma] == w.unsqueeze(1)).sum())
        capacity = _default_capacity(gamma, nb if max_branches is None else min(nb, max_branches))
    tree = _empty_tree(capacity, gamma, nmax)
    nb = C.build_branch_tree(w, e, -1 if max_branches is None else int(max_branches), tree.tokens,
                             tree.parents, tree.positions, tree.mask_bits, tree.branch_pos,
                             tree.branch_rank, tree.branch_tip)
    tree.branch_pos, tree.branch_rank, tree.branch_tip = (
        tree.branch_pos[:nb], tree.branch_rank[:nb], tree.branch_tip[:nb])
    tree.num_nodes = gamma + nb
    return tree


def extend_branch_tree(tree: BranchTree, new_tokens) -> BranchTree:
    """Append n_new tokens to every branch, in place; returns the same tree.

    new_tokens  [num_branches, n_new] (or [num_branches]) int32/int64: new_tokens[k] continue
                branch k as a chain under its tip (n_new > 1: multi-stream drafts)
    New nodes: tree.num_nodes .. + num_branches * n_new (branch-major); positions = parent's + 1;
    mask row = parent's row + self. Sets step_start to the first new node. Raises ValueError when
    the capacity would be exceeded.
    """
    C = _cpp()
    if C is None:
        return extend_branch_tree_ref(tree, new_tokens)
    new_tokens = _check_new(tree, new_tokens).to(torch.int64).contiguous()
    start = tree.num_nodes
    tree.num_nodes = C.extend_branch_tree(new_tokens, start, tree.tokens, tree.parents, tree.positions,
                                          tree.mask_bits, tree.branch_tip)
    tree.step_start = start
    return tree
