"""Branch-tree builder/extender: C++ vs the Python reference, tree invariants, and the tree
attention over it equals plain causal attention along every branch."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from mirror_rt.ops import branch_tree as bt
from mirror_rt.ops.reference import tree_attention_ref

_C = pytest.importorskip("mirror_rt._C")
if not hasattr(_C, "build_branch_tree"):
    pytest.skip("extension built without the branch-tree ops", allow_module_level=True)
from mirror_rt.ops.cpu import tree_attention_cpu  # noqa: E402

FIELDS = ("tokens", "parents", "positions", "mask_bits", "branch_pos", "branch_rank", "branch_tip")


def assert_same_tree(a, b):
    assert (a.gamma, a.num_nodes, a.step_start, a.capacity) == (b.gamma, b.num_nodes, b.step_start, b.capacity)
    n = a.num_nodes
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        if f in ("tokens", "parents", "positions", "mask_bits"):
            x, y = x[:n], y[:n]
        assert torch.equal(x, y), f"{f} differs:\n{x}\n{y}"


def check_invariants(tree, window, exit_ids, max_branches):
    n = tree.num_nodes
    par, pos = tree.parents[:n].tolist(), tree.positions[:n].tolist()
    dense = tree.dense_mask()
    for i in range(n):
        assert par[i] < i
        assert pos[i] == (pos[par[i]] + 1 if par[i] >= 0 else 0)
        anc, node = set(), i
        while node >= 0:
            anc.add(node)
            node = par[node]
        assert set(torch.nonzero(dense[i]).flatten().tolist()) == anc
    gamma, kappa = window.shape[0], exit_ids.shape[1]
    want = [(i, r) for i in range(gamma + 1) for r in range(kappa)
            if exit_ids[i, r] >= 0 and not (i < gamma and exit_ids[i, r] == window[i])]
    want = want if max_branches is None else want[:max_branches]
    assert list(zip(tree.branch_pos.tolist(), tree.branch_rank.tolist())) == want
    assert tree.tokens[:gamma].tolist() == window.tolist()
    for k, (i, r) in enumerate(want):
        path = tree.branch_nodes(k).tolist()
        assert [int(tree.tokens[j]) for j in path[: i + 1]] == window[:i].tolist() + [int(exit_ids[i, r])]


@settings(max_examples=60, deadline=None)
@given(gamma=st.integers(0, 7), kappa=st.integers(1, 8), vocab=st.integers(2, 12),
       cap=st.one_of(st.none(), st.integers(0, 70)), steps=st.lists(st.integers(1, 3), max_size=3),
       seed=st.integers(0, 2**16), int32=st.booleans())
def test_cpp_matches_reference(gamma, kappa, vocab, cap, steps, seed, int32):
    g = torch.Generator().manual_seed(seed)
    window = torch.randint(0, vocab, (gamma,), generator=g)
    exit_ids = torch.randint(-1, vocab, (gamma + 1, kappa), generator=g)  # -1: a hole (no branch)
    if int32:
        exit_ids = exit_ids.int()  # the exit head sends int32 ids
    fast = bt.build_branch_tree(window, exit_ids, max_branches=cap)
    slow = bt.build_branch_tree_ref(window, exit_ids, max_branches=cap)
    assert_same_tree(fast, slow)
    check_invariants(fast, window, exit_ids, cap)
    for n_new in steps:
        new = torch.randint(0, vocab, (fast.num_branches, n_new), generator=g)
        if fast.num_nodes + new.numel() > fast.capacity:
            with pytest.raises(ValueError, match="capacity"):
                bt.extend_branch_tree(fast, new)
            break
        bt.extend_branch_tree(fast, new)
        bt.extend_branch_tree_ref(slow, new)
        assert_same_tree(fast, slow)
        check_invariants(fast, window, exit_ids, cap)


def test_skip_rule_and_cap_order():
    window = torch.tensor([5, 6])
    exit_ids = torch.tensor([[5, 1], [2, 6], [7, 3]], dtype=torch.int32)
    tree = bt.build_branch_tree(window, exit_ids)
    assert tree.branch_pos.tolist() == [0, 1, 2, 2] and tree.branch_rank.tolist() == [1, 0, 0, 1]
    assert tree.branch_token.tolist() == [1, 2, 7, 3]
    assert tree.parents[:6].tolist() == [-1, 0, -1, 0, 1, 1]
    assert tree.positions[:6].tolist() == [0, 1, 0, 1, 2, 2]
    assert tree.find_branch(2, 3) == 3 and tree.find_branch(0, 5) == -1
    capped = bt.build_branch_tree(window, exit_ids, max_branches=2)
    assert capped.branch_pos.tolist() == [0, 1] and capped.num_nodes == 4
    holed = torch.tensor([[1, -1], [-1, -1], [-1, 3]])  # ranked allocation: rows of unequal length
    for build in (bt.build_branch_tree, bt.build_branch_tree_ref):
        tree = build(window, holed)
        assert tree.branch_pos.tolist() == [0, 2] and tree.branch_token.tolist() == [1, 3]
        assert tree.num_nodes == 4 and tree.find_branch(1, -1) == -1


def test_rollout_attention_equals_causal_attention_per_branch():
    """Draft step on the tree == running each branch alone with a causal mask (metamorphic)."""
    g = torch.Generator().manual_seed(0)
    Hq, Hkv, D, S, gamma = 6, 2, 16, 23, 3
    window, exit_ids = torch.tensor([4, 5, 6]), torch.randint(0, 9, (gamma + 1, 3), generator=g)
    tree = bt.build_branch_tree(window, exit_ids, max_branches=7)
    bt.extend_branch_tree(tree, torch.randint(0, 9, (tree.num_branches, 2), generator=g))
    T = tree.num_nodes
    kc, vc = torch.randn(1, S, Hkv, D, generator=g), torch.randn(1, S, Hkv, D, generator=g)
    kt, vt = torch.randn(1, T, Hkv, D, generator=g), torch.randn(1, T, Hkv, D, generator=g)
    q = torch.randn(1, T, Hq, D, generator=g)
    seqlens = torch.tensor([S], dtype=torch.int32)
    rows = slice(tree.step_start, T)
    out = tree_attention_cpu(q[:, rows], kc, vc, seqlens, kt, vt, tree.mask_bits[rows].unsqueeze(0))
    for k in range(tree.num_branches):
        path = tree.branch_nodes(k)
        L = len(path)
        causal = torch.ones(L, L, dtype=torch.bool).tril().unsqueeze(0)
        chain = tree_attention_ref(q[:, path], kc, vc, seqlens, kt[:, path], vt[:, path], causal)
        tips = torch.nonzero(torch.isin(torch.arange(tree.step_start, T), path)).flatten()
        torch.testing.assert_close(out[:, tips], chain[:, -len(tips):], atol=2e-5, rtol=2e-5)


def test_errors():
    w, e = torch.tensor([1, 2]), torch.zeros(3, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="exit_ids"):
        bt.build_branch_tree(w, torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="window"):
        bt.build_branch_tree(w.float(), e)
    with pytest.raises(ValueError, match="capacity"):
        bt.build_branch_tree(w, e, capacity=5)
    tree = bt.build_branch_tree(w, e, capacity=20)
    with pytest.raises(ValueError, match="new_tokens"):
        bt.extend_branch_tree(tree, torch.zeros(3, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="capacity"):
        bt.extend_branch_tree(tree, torch.zeros(tree.num_branches, 2, dtype=torch.int64))
    # the binding itself: a corrupt tip must not write out of bounds
    tip = tree.branch_tip.clone()
    tip[0] = 999
    with pytest.raises(ValueError, match="branch_tip"):
        _C.extend_branch_tree(torch.zeros(tree.num_branches, 1, dtype=torch.int64), tree.num_nodes, tree.tokens,
                              tree.parents, tree.positions, tree.mask_bits, tip)
    with pytest.raises(TypeError, match="parents"):
        _C.extend_branch_tree(torch.zeros(tree.num_branches, 1, dtype=torch.int64), tree.num_nodes, tree.tokens,
                              tree.parents.long(), tree.positions, tree.mask_bits, tree.branch_tip)
