"""Fused verify/accept kernel vs the slow loop reference, invariants, and distribution checks.

CPU tests run the kernel under TRITON_INTERPRET=1 (slow per program, so batches stay small);
`gpu` tests run the compiled kernel on bf16 logits with real vocabulary sizes.
"""
import os

import pytest
import torch

import mirror_rt.ops as ops
from mirror_rt.ops.reference import process_logits, sample_from, verify_accept_ref
from mirror_rt.triton_kernels.verify_accept import verify_accept

interp = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                            reason="Triton on CPU tensors needs TRITON_INTERPRET=1")


def random_tree(B, T, g, chain=False):
    parents = torch.zeros(B, T, dtype=torch.int32)
    parents[:, 0] = -1
    for i in range(1, T):
        parents[:, i] = i - 1 if chain else torch.randint(0, i, (B,), generator=g)
    return parents


def make_case(B, T, V, mode, dtype=torch.float32, chain=False, seed=0, device="cpu", **kw):
    """Logits, and a tree whose tokens are drawn so that many nodes are accepted: greedy takes
    the parent's argmax and match the parent's target sample 70% of the time; otherwise
    children come from q (the draft's distribution, half target, half noise), which also makes
    min(1, p/q) large for rejection."""
    g = torch.Generator().manual_seed(seed)
    parents = random_tree(B, T, g, chain)
    logits = (3 * torch.randn(B, T, V, generator=g)).to(dtype)
    p = process_logits(logits, kw.get("temperature", 1.0), kw.get("top_k", 0), kw.get("top_p", 1.0))
    q = 0.5 * p + 0.5 * torch.softmax(2 * torch.randn(B, T, V, generator=g), -1)
    uniforms = torch.rand(B, T, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, V, (B, T), generator=g)
    for b in range(B):
        for i in range(1, T):
            par = int(parents[b, i])
            likely = torch.rand((), generator=g) < 0.7
            if mode == "greedy" and likely:
                tokens[b, i] = logits[b, par].float().argmax()
            elif mode == "match" and likely:
                tokens[b, i] = sample_from(p[b, par], uniforms[b, par])
            elif mode != "greedy":
                tokens[b, i] = torch.multinomial(q[b, par], 1, generator=g)
    extra = dict(kw)
    if mode != "greedy":
        extra["uniforms"] = uniforms.to(device)
    if mode == "rejection":
        extra["draft_probs"] = q.to(device)
    return tokens.to(device), parents.to(device), logits.to(device), extra


def assert_same(got, want, what):
    names = ("accept_len", "accepted", "next_token")
    for name, a, b in zip(names, got, want):
        assert a.dtype == b.dtype, f"{what}: {name} dtype {a.dtype} != {b.dtype}"
        if not torch.equal(a.cpu(), b.cpu()):
            rows = (a.cpu() != b.cpu()).reshape(a.shape[0], -1).any(1).nonzero().flatten().tolist()
            r = rows[0]
            raise AssertionError(f"{what}: {name} differs in batch rows {rows}; first row {r}: "
                                 f"got {a[r].tolist()}, want {b[r].tolist()}")


def check_invariants(out, parents, V):
    """accept_len, the -1 padded root-first path and next_token agree with each other."""
    accept_len, accepted, next_token = (t.cpu() for t in out)
    parents = parents.cpu()
    for b in range(accepted.shape[0]):
        n = int(accept_len[b])
        path = accepted[b, : n + 1].tolist()
        assert path[0] == 0, f"row {b}: path {path} does not start at the root"
        assert all(int(parents[b, path[k + 1]]) == path[k] for k in range(n)), f"row {b}: {path} is not a path"
        assert (accepted[b, n + 1:] == -1).all(), f"row {b}: padding {accepted[b].tolist()}"
        assert 0 <= int(next_token[b]) < V


# (mode, B, T, V, dtype, sampling kwargs, vocabulary splits). Odd V throughout; splits > 1
# exercise the chunked combine that the GPU uses for big vocabularies.
CASES = [
    ("greedy", 1, 1, 7, torch.float32, {}, None),
    ("greedy", 2, 8, 1001, torch.bfloat16, {}, None),
    ("greedy", 3, 7, 3001, torch.float16, {}, 3),
    ("greedy", 1, 33, 257, torch.float32, {}, 2),
    ("match", 2, 7, 999, torch.float32, {}, None),
    ("match", 2, 8, 2049, torch.bfloat16, dict(temperature=0.7), 3),
    ("match", 3, 2, 513, torch.float32, dict(top_k=20), 2),
    ("match", 1, 9, 301, torch.float16, dict(top_p=0.9, temperature=1.3), None),
    ("rejection", 2, 7, 301, torch.float32, {}, None),
    ("rejection", 2, 8, 1025, torch.bfloat16, dict(temperature=0.8), None),
    ("rejection", 1, 9, 101, torch.float32, dict(top_k=10, top_p=0.95), None),
]


@interp
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-B{c[1]}-T{c[2]}-V{c[3]}-{str(c[4])[6:]}-{c[5]}-s{c[6]}")
@pytest.mark.parametrize("chain", [False, True], ids=["tree", "chain"])
def test_matches_reference(case, chain):
    mode, B, T, V, dtype, kw, splits = case
    tokens, parents, logits, extra = make_case(B, T, V, mode, dtype, chain, seed=T + V, **kw)
    got = verify_accept(tokens, parents, logits, mode, num_splits=splits, **extra)
    want = verify_accept_ref(tokens, parents, logits, mode, **extra)
    assert_same(got, want, f"{mode} {'chain' if chain else 'tree'}")
    check_invariants(got, parents, V)
    if mode != "rejection" and T > 1:  # (rejection accepts often too, but a small case may not)
        assert int(got[0].sum()) > 0, "test data should accept some nodes"


@interp
@pytest.mark.parametrize("mode", ["greedy", "match", "rejection"])
def test_one_hot_target_reproduces_its_tokens(mode):
    """Target logits one-hot on a child's token: exactly that child is accepted at each node."""
    B, T, V = 2, 9, 11
    g = torch.Generator().manual_seed(5)
    parents = random_tree(B, T, g)
    tokens = torch.zeros(B, T, dtype=torch.int64)
    target = torch.zeros(B, T, dtype=torch.int64)
    for b in range(B):
        for j in range(T):
            kids = [i for i in range(T) if int(parents[b, i]) == j]
            toks = torch.randperm(V, generator=g)[: len(kids) + 1]  # distinct sibling tokens
            tokens[b, kids] = toks[: len(kids)]
            pick = int(torch.randint(0, len(kids) + 1, (), generator=g))  # == len(kids): no child
            target[b, j] = toks[pick]
    logits = torch.full((B, T, V), float("-inf")).scatter(-1, target[..., None], 0.0)
    extra = {}
    if mode != "greedy":
        extra["uniforms"] = torch.rand(B, T, generator=g)
    if mode == "rejection":
        extra["draft_probs"] = torch.zeros(B, T, V).scatter(-1, target[..., None], 1.0)
    accept_len, accepted, next_token = verify_accept(tokens, parents, logits, mode, **extra)
    for b in range(B):
        path, node = [0], 0
        while True:
            kids = [i for i in range(T) if int(parents[b, i]) == node and tokens[b, i] == target[b, node]]
            if not kids:
                break
            node = kids[0]
            path.append(node)
        assert accepted[b].tolist() == path + [-1] * (T - len(path)), f"row {b}"
        assert int(accept_len[b]) == len(path) - 1
        assert int(next_token[b]) == int(target[b, path[-1]])


@interp
def test_through_ops_dispatch(monkeypatch):
    monkeypatch.setenv("MIRROR_RT_BACKEND", "triton")
    assert ops.pick_backend(torch.device("cpu")) == "triton"
    for mode in ("greedy", "match", "rejection"):
        tokens, parents, logits, extra = make_case(2, 6, 257, mode, torch.bfloat16, seed=1)
        got = ops.verify_accept(tokens, parents, logits, mode, **extra)
        assert_same(got, verify_accept_ref(tokens, parents, logits, mode, **extra), f"ops {mode}")


# --- distribution: the emitted token follows the target --------------------------------------

P0 = torch.tensor([0.45, 0.45, 0.04, 0.03, 0.03])  # target at the root
Q0 = torch.tensor([0.90, 0.02, 0.02, 0.03, 0.03])  # draft at the root
CHI2_CRIT_DF4 = 18.467  # chi-square, 4 degrees of freedom, p = 0.001


def chi_square(counts, probs):
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def first_tokens(run, mode, n, seed):
    """First emitted token of n independent steps on a 3-node chain root -> x1 -> x2, with x1 ~ Q0
    and x2 ~ a fixed draft; run(tokens, parents, logits, mode, **kw) is the rule under test."""
    g = torch.Generator().manual_seed(seed)
    V, T = P0.numel(), 3
    q = torch.stack([Q0, torch.full((V,), 1.0 / V), torch.full((V,), 1.0 / V)])[None].expand(n, T, V).contiguous()
    tokens = torch.zeros(n, T, dtype=torch.int64)
    tokens[:, 1] = torch.multinomial(Q0, n, replacement=True, generator=g)
    tokens[:, 2] = torch.randint(0, V, (n,), generator=g)
    parents = torch.tensor([-1, 0, 1], dtype=torch.int32).expand(n, T).contiguous()
    logits = torch.stack([P0.log(), torch.randn(V, generator=g), torch.randn(V, generator=g)])[None].expand(n, T, V)
    kw = dict(uniforms=torch.rand(n, T, generator=g), draft_probs=q if mode == "rejection" else None)
    accept_len, _, next_token = run(tokens, parents, logits.contiguous(), mode, **kw)
    first = torch.where(accept_len > 0, tokens[:, 1], next_token)
    return torch.bincount(first, minlength=V).double()


def wrong_rejection(tokens, parents, logits, mode, uniforms, draft_probs):
    """A classic bug: accept with min(1, p/q) but, on rejection, resample from p itself instead
    of the residual norm(max(0, p - q)). Only the first step matters for the test."""
    p = torch.softmax(logits[:, 0].float(), -1)
    x = tokens[:, 1]
    ratio = (p.gather(1, x[:, None]) / draft_probs[:, 0].gather(1, x[:, None])).squeeze(1)
    accept = uniforms[:, 1] < ratio.clamp(max=1)
    resample = torch.searchsorted(p.double().cumsum(1), uniforms[:, :1].double(), right=True).squeeze(1)
    return accept.int(), None, torch.where(accept, x, resample.clamp(max=p.shape[1] - 1))


N_STAT = 240  # the interpreter runs ~20 programs/s; 240 steps already separate right from wrong


@interp
@pytest.mark.parametrize("mode", ["match", "rejection"])
def test_first_token_follows_target(mode):
    counts = first_tokens(verify_accept, mode, N_STAT, seed=1)
    stat = chi_square(counts, P0.double())
    assert stat < CHI2_CRIT_DF4, f"{mode}: chi2={stat:.1f}, counts {counts.tolist()} vs p {P0.tolist()}"


def test_chi_square_detects_a_wrong_rule():
    """The same check, same sample size, rejects a rule that resamples from p (seeds vary)."""
    for seed in range(5):
        counts = first_tokens(wrong_rejection, "rejection", N_STAT, seed=seed)
        stat = chi_square(counts, P0.double())
        assert stat > CHI2_CRIT_DF4, f"seed {seed}: wrong rule passed, chi2={stat:.1f}, counts {counts.tolist()}"
    # ...and the reference itself (same rule as the kernel) passes at a larger sample.
    counts = first_tokens(verify_accept_ref, "rejection", 2000, seed=0)
    assert chi_square(counts, P0.double()) < CHI2_CRIT_DF4


# --- compiled kernel on a GPU --------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["greedy", "match", "rejection"])
@pytest.mark.parametrize("B,T,V", [(1, 8, 32000), (4, 33, 151936), (16, 8, 4097)])
def test_gpu_bf16(mode, B, T, V):
    kw = dict(temperature=0.8, top_k=50) if (mode == "match" and T == 8) else {}
    tokens, parents, logits, extra = make_case(B, T, V, mode, torch.bfloat16, seed=B, device="cuda", **kw)
    got = verify_accept(tokens, parents, logits, mode, **extra)
    want = verify_accept_ref(tokens, parents, logits, mode, **extra)
    assert_same(got, want, f"gpu {mode} B{B} T{T} V{V}")
    check_invariants(got, parents, V)
