"""Property-based tests (hypothesis) of verify/accept in every mode: random trees, vocabularies
and logits; the reference's invariants, and the Triton kernel (interpreter) against it."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mirror_rt.ops.reference import process_logits, sample_from, verify_accept_ref


@st.composite
def trees(draw, max_nodes=12, max_vocab=9):
    """A batch of random token trees with logits (ties made likely by a small integer range)."""
    B = draw(st.integers(1, 3))
    T = draw(st.integers(1, max_nodes))
    V = draw(st.integers(2, max_vocab))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    parents = torch.full((B, T), -1, dtype=torch.int32)
    for i in range(1, T):
        parents[:, i] = torch.randint(0, i, (B,), generator=g, dtype=torch.int32)
    logits = torch.randint(-3, 4, (B, T, V), generator=g).float() + 0.1 * torch.randn(B, T, V, generator=g)
    tokens = torch.randint(0, V, (B, T), generator=g)
    # Make acceptance likely: many nodes carry their parent's argmax.
    follow = torch.rand(B, T, generator=g) < 0.6
    for b in range(B):
        for i in range(1, T):
            if follow[b, i]:
                tokens[b, i] = logits[b, parents[b, i]].argmax()
    q = torch.softmax(torch.randn(B, T, V, generator=g), -1)
    u = torch.rand(B, T, generator=g)
    return tokens, parents, logits, q, u


def path_of(accept_len, accepted, parents, b):
    n = int(accept_len[b])
    path = accepted[b, : n + 1].tolist()
    assert path[0] == 0
    assert all(int(parents[b, path[k]]) == path[k - 1] for k in range(1, n + 1)), "not a root path"
    assert (accepted[b, n + 1:] == -1).all(), "padding after the path must be -1"
    return path


@settings(max_examples=150, deadline=None)
@given(trees(), st.sampled_from(["greedy", "match", "rejection"]), st.floats(0.3, 2.0), st.integers(0, 4),
       st.floats(0.3, 1.0))
def test_reference_invariants(tree, mode, temperature, top_k, top_p):
    tokens, parents, logits, q, u = tree
    B, T = tokens.shape
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, draft_probs=q, uniforms=u)
    accept_len, accepted, nxt = verify_accept_ref(tokens, parents, logits, mode, **kw)
    for b in range(B):
        path = path_of(accept_len, accepted, parents, b)
        last = path[-1]
        kids = [i for i in range(1, T) if int(parents[b, i]) == last]
        if mode == "greedy":
            assert all(int(tokens[b, i]) == int(logits[b, int(parents[b, i])].argmax()) for i in path[1:])
            assert int(nxt[b]) == int(logits[b, last].argmax())
            assert all(int(tokens[b, i]) != int(nxt[b]) for i in kids), "a matching child was left unaccepted"
        elif mode == "match":
            p = process_logits(logits[b], temperature, top_k, top_p)
            drawn = [sample_from(p[j], u[b, j]) for j in range(T)]
            assert all(int(tokens[b, i]) == drawn[int(parents[b, i])] for i in path[1:])
            assert int(nxt[b]) == drawn[last]
            assert all(int(tokens[b, i]) != drawn[last] for i in kids)
        else:
            p = process_logits(logits[b, last], temperature, top_k, top_p)
            assert p[int(nxt[b])] > 0, "the next token must be possible under the target"


def test_reference_rejects_nothing_when_draft_equals_target():
    """q == p: every chain node is accepted whatever the uniforms (min(1, p/q) = 1)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 7, generator=g)
    p = process_logits(logits)
    tokens = torch.randint(0, 7, (2, 6), generator=g)
    parents = (torch.arange(6, dtype=torch.int32) - 1).expand(2, 6).contiguous()
    accept_len, _, _ = verify_accept_ref(tokens, parents, logits, "rejection", draft_probs=p,
                                         uniforms=torch.rand(2, 6, generator=g) * 0.999)
    assert accept_len.tolist() == [5, 5]


@pytest.mark.slow
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees(max_nodes=9, max_vocab=7), st.sampled_from(["greedy", "match", "rejection"]))
def test_triton_kernel_equals_reference(tree, mode):
    from mirror_rt.triton_kernels.verify_accept import verify_accept

    tokens, parents, logits, q, u = tree
    kw = dict(temperature=0.8, top_k=0, top_p=1.0, draft_probs=q, uniforms=u)
    want = verify_accept_ref(tokens, parents, logits, mode, **kw)
    got = verify_accept(tokens, parents, logits, mode, **kw)
    for name, a, b in zip(("accept_len", "accepted", "next_token"), got, want):
        assert torch.equal(a.cpu().long(), b.long()), f"{mode}: {name} {a.tolist()} != reference {b.tolist()}"
