"""Row-exact CPU attention (``tree_attention_cpu(..., row_exact=True)``, csrc/core/row_attention.cpp):
close to the slow reference, and bitwise independent of the call a row comes in."""
import pytest
import torch

from mirror_rt.ops.cpu import tree_attention_cpu
from mirror_rt.ops.reference import tree_attention_ref



def rnd(g, *shape):
    return torch.randn(*shape, generator=g)


@pytest.mark.parametrize("B,Tq,T,S,Hq,Hkv,D", [(1, 1, 1, 0, 1, 1, 8), (2, 5, 7, 13, 6, 2, 20), (1, 3, 40, 37, 9, 3, 64),
                                                (3, 9, 9, 1, 4, 4, 3), (1, 2, 33, 70, 2, 1, 130)])
def test_matches_reference(B, Tq, T, S, Hq, Hkv, D):
    g = torch.Generator().manual_seed(B * 100 + T)
    q, kc, vc = rnd(g, B, Tq, Hq, D), rnd(g, B, S, Hkv, D), rnd(g, B, S, Hkv, D)
    kt, vt = rnd(g, B, T + 4, Hkv, D)[:, 2:2 + T], rnd(g, B, T, Hkv, D)
    mask = torch.rand(B, Tq, T, generator=g) < 0.5
    seqlens = torch.randint(0, S + 1, (B,), generator=g, dtype=torch.int32)
    seqlens[0] = 0  # a row with an empty prefix: sees only its tree nodes (or nothing: zeros)
    got = tree_attention_cpu(q, kc, vc, seqlens, kt, vt, mask, row_exact=True)
    want = tree_attention_ref(q, kc, vc, seqlens, kt, vt, mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _sequence(n, Hq=9, Hkv=3, D=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return rnd(g, 1, n, Hq, D), rnd(g, 1, n, Hkv, D), rnd(g, 1, n, Hkv, D)


@pytest.mark.parametrize("threads", [1, 2])
def test_row_alone_equals_row_in_a_window(threads):
    """Token p decoded alone (prefix p, itself the one tree node) equals row i of a causal window
    starting at p - i, bit for bit, for windows of any size and any thread count."""
    n, p0 = 47, 29
    q, k, v = _sequence(n)
    T = n - p0
    chain = torch.ones(1, T, T, dtype=torch.bool).tril()
    window = tree_attention_cpu(q[:, p0:], k, v, torch.tensor([p0], dtype=torch.int32), k[:, p0:], v[:, p0:],
                                chain, row_exact=True, num_threads=threads)
    for i in range(T):
        p = p0 + i
        alone = tree_attention_cpu(q[:, p:p + 1], k, v, torch.tensor([p], dtype=torch.int32), k[:, p:p + 1],
                                   v[:, p:p + 1], torch.ones(1, 1, 1, dtype=torch.bool), row_exact=True,
                                   num_threads=3 - threads)
        assert torch.equal(alone[0, 0], window[0, i]), f"row {i} differs"
    # (the flash kernel, row_exact=False, differs here in the last bits on most rows)


def test_tree_path_equals_chain():
    """A tree node whose ancestors are tokens p0..p-1 equals the same token decoded after them."""
    n, p0 = 30, 20
    q, k, v = _sequence(n, seed=1)
    # tree over slots p0..n-1: node j's parent is j - 2 for odd j > 1 (two interleaved chains)
    T = n - p0
    mask = torch.zeros(1, T, T, dtype=torch.bool)
    for j in range(T):
        a = j
        while a >= 0:
            mask[0, j, a] = True
            a = a - 2 if a >= 2 else -1
    tree = tree_attention_cpu(q[:, p0:], k, v, torch.tensor([p0], dtype=torch.int32), k[:, p0:], v[:, p0:], mask,
                              row_exact=True)
    for j in range(T):
        path = mask[0, j].nonzero().flatten() + p0  # the slots node j sees after the prefix, in order
        kk, vv = torch.cat([k[:, :p0], k[:, path]], 1), torch.cat([v[:, :p0], v[:, path]], 1)
        m = kk.shape[1]
        alone = tree_attention_cpu(q[:, p0 + j:p0 + j + 1], kk, vv, torch.tensor([m - 1], dtype=torch.int32),
                                   kk[:, m - 1:], vv[:, m - 1:], torch.ones(1, 1, 1, dtype=torch.bool), row_exact=True)
        assert torch.equal(alone[0, 0], tree[0, j]), f"node {j} differs"


def test_row_exact_rejects_bf16():
    q = torch.zeros(1, 1, 1, 8, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="float32"):
        tree_attention_cpu(q, q[:, :0], q[:, :0], torch.zeros(1, dtype=torch.int32), q, q,
                           torch.ones(1, 1, 1, dtype=torch.bool), row_exact=True)
