"""Triton tree attention vs the torch reference, plus metamorphic checks.

CPU tests run the kernel under TRITON_INTERPRET=1 (conftest sets it when there is no GPU), on a
curated sample of the issue's grid so that the suite stays fast; `gpu` tests run the compiled
kernel in bf16 on realistic shapes.
"""
import os

import pytest
import torch
import torch.nn.functional as F

import mirror_rt.ops as ops
from mirror_rt.ops.reference import tree_attention_ref
from mirror_rt.triton_kernels.tree_attention import pack_tree_mask, tree_attention, tree_attention_packed

# Triton on CPU tensors needs the interpreter; on a GPU machine only the gpu tests apply.
interp = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                            reason="Triton on CPU tensors needs TRITON_INTERPRET=1")

TOL = {
    # fp32 in and out: only summation order differs (split merge, online softmax).
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    # fp16 output: one ulp is ~1e-3 at |x| ~ 1; inputs are read exactly, math is fp32.
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    # bf16 output: 8-bit mantissa, one ulp is ~8e-3 at |x| ~ 1; on the GPU, P is also rounded
    # to bf16 before the P @ V tensor-core dot, which adds about one more ulp.
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}


def assert_close(got, want, dtype, what=""):
    """Like torch.testing.assert_close, but names the first mismatching [b, t, h, d] index."""
    tol = TOL[dtype]
    got, want = got.float(), want.float()
    bad = (got - want).abs() > tol["atol"] + tol["rtol"] * want.abs()
    bad |= got.isnan() != want.isnan()
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements differ; first at [b,t,h,d]={list(idx)}: "
            f"got {got[idx].item():.6g}, want {want[idx].item():.6g} (tol {tol}); "
            f"max abs diff {(got - want).abs().nan_to_num(0).max().item():.3g}")


def make_inputs(B, T, S, D, Hq, Hkv, dtype, Tq=None, density=0.5, seed=0, device="cpu"):
    """Random inputs; k_tree is a strided slice of a bigger buffer, as a KV cache would give."""
    g = torch.Generator().manual_seed(seed)
    Tq = T if Tq is None else Tq

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    q = rnd(B, Tq, Hq, D)
    k_cache, v_cache = rnd(B, S, Hkv, D), rnd(B, S, Hkv, D)
    k_buf, v_buf = rnd(B, T + 9, Hkv, D), rnd(B, T + 9, Hkv, D)
    k_tree, v_tree = k_buf[:, 3:3 + T], v_buf[:, 5:5 + T]
    mask = (torch.rand(B, Tq, T, generator=g) < density).to(device)
    seqlens = torch.randint(0, S + 1, (B,), generator=g, dtype=torch.int32).to(device)
    if S:
        seqlens[0] = S  # one full row
    return q, k_cache, v_cache, seqlens, k_tree, v_tree, mask


def _grid():
    """A curated sample of B 1..3 x T {1,2,7,8,33,64} x S {0,1,17,300} x D {64,80,128} x Hq/Hkv
    {1,2,4,8} x dtypes: every value of each axis appears several times, in varied pairs."""
    Ts, Ss, Ds, Rs = (1, 2, 7, 8, 33, 64), (0, 1, 17, 300), (64, 80, 128), (1, 2, 4, 8)
    dts = (torch.float32, torch.float16, torch.bfloat16)
    cases = []
    for i in range(24):
        T, S, D, R = Ts[i % 6], Ss[(i // 2 + i) % 4], Ds[(i + i // 3) % 3], Rs[(i // 6 + i) % 4]
        Hkv = 1 if T * R >= 256 else 2  # keep the interpreter's work small for the big ones
        cases.append((1 + i % 3, T, S, D, R * Hkv, Hkv, dts[(i // 4 + i) % 3]))
    return cases


def _id(c):
    B, T, S, D, Hq, Hkv, dt = c
    return f"B{B}-T{T}-S{S}-D{D}-H{Hq}/{Hkv}-{str(dt)[6:]}"


@interp
@pytest.mark.parametrize("case", _grid(), ids=_id)
def test_matches_reference(case):
    B, T, S, D, Hq, Hkv, dtype = case
    args = make_inputs(B, T, S, D, Hq, Hkv, dtype, seed=T * 1000 + S)
    assert_close(tree_attention(*args), tree_attention_ref(*args), dtype, _id(case))


@interp
@pytest.mark.parametrize("T,Tq", [(8, 1), (33, 5), (64, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_partial_queries(T, Tq, dtype):
    """The draft's rollouts pass only the last Tq <= T nodes as queries."""
    args = make_inputs(2, T, 300, 64, 4, 2, dtype, Tq=Tq, seed=Tq)
    assert_close(tree_attention(*args), tree_attention_ref(*args), dtype, f"T={T} Tq={Tq}")


@interp
@pytest.mark.parametrize("num_splits", [1, 2, 5])
def test_split_counts_agree(num_splits):
    """Single pass (no merge) and split + log-sum-exp merge give the same answer."""
    q, kc, vc, sl, kt, vt, mask = make_inputs(2, 7, 300, 64, 4, 1, torch.float32, seed=3)
    got = tree_attention_packed(q, kc, vc, sl, kt, vt, pack_tree_mask(mask), num_splits=num_splits)
    assert_close(got, tree_attention_ref(q, kc, vc, sl, kt, vt, mask), torch.float32, f"splits={num_splits}")


@interp
def test_strided_query_and_sm_scale():
    q, kc, vc, sl, kt, vt, mask = make_inputs(1, 8, 17, 64, 2, 1, torch.float32)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, non-standard strides
    got = tree_attention(q, kc, vc, sl, kt, vt, mask, sm_scale=0.3)
    assert_close(got, tree_attention_ref(q, kc, vc, sl, kt, vt, mask, 0.3), torch.float32, "strided q")


def test_pack_tree_mask_bits():
    mask = torch.rand(2, 3, 70) < 0.5
    words = pack_tree_mask(mask)
    assert words.shape == (2, 3, 3) and words.dtype == torch.int32
    j = torch.arange(70)
    bits = (words[..., j // 32] >> (j % 32)) & 1
    assert torch.equal(bits.bool(), mask)


# --- metamorphic -------------------------------------------------------------------------------

@interp
@pytest.mark.parametrize("Tq", [8, 3])
def test_chain_equals_causal_attention(Tq):
    """A chain-shaped mask is plain causal attention over prefix + chain (torch SDPA)."""
    B, T, S, D, Hq, Hkv = 2, 8, 17, 64, 4, 2
    q, kc, vc, _, kt, vt, _ = make_inputs(B, T, S, D, Hq, Hkv, torch.float32, Tq=Tq)
    seqlens = torch.full((B,), S, dtype=torch.int32)
    chain = torch.ones(T, T, dtype=torch.bool).tril()[T - Tq:].expand(B, Tq, T)
    got = tree_attention(q, kc, vc, seqlens, kt, vt, chain)
    keys = torch.cat([kc, kt], 1).repeat_interleave(Hq // Hkv, 2).transpose(1, 2)  # [B, Hq, S+T, D]
    vals = torch.cat([vc, vt], 1).repeat_interleave(Hq // Hkv, 2).transpose(1, 2)
    # Queries sit at the last Tq positions of the full sequence; pad the front to use is_causal.
    full_q = torch.zeros(B, Hq, S + T, D)
    full_q[:, :, S + T - Tq:] = q.transpose(1, 2)
    want = F.scaled_dot_product_attention(full_q, keys, vals, is_causal=True)[:, :, S + T - Tq:]
    assert_close(got, want.transpose(1, 2), torch.float32, "chain vs causal SDPA")


@interp
def test_tree_equals_each_path():
    """Each node of a tree sees exactly what it would see as the end of its root-to-node chain."""
    B, T, S, D, Hq, Hkv = 1, 9, 17, 64, 2, 1
    q, kc, vc, sl, kt, vt, _ = make_inputs(B, T, S, D, Hq, Hkv, torch.float32, seed=7)
    parents = [-1, 0, 0, 1, 1, 2, 3, 3, 5]
    paths = []
    for i in range(T):
        path, node = [], i
        while node >= 0:
            path.insert(0, node)
            node = parents[node]
        paths.append(path)
    mask = torch.zeros(B, T, T, dtype=torch.bool)
    for i, path in enumerate(paths):
        mask[0, i, path] = True
    tree_out = tree_attention(q, kc, vc, sl, kt, vt, mask)
    for i, path in enumerate(paths):
        n = len(path)
        chain = torch.ones(n, n, dtype=torch.bool).tril()[None]
        out = tree_attention(q[:, i:i + 1].expand(B, n, Hq, D), kc, vc, sl,
                             kt[:, path], vt[:, path], chain)
        assert_close(tree_out[:, i], out[:, -1], torch.float32, f"node {i} path {path}")


@interp
def test_empty_prefix():
    """S = 0, and S > 0 with cache_seqlens = 0, both equal attention over the tree alone."""
    q, kc, vc, _, kt, vt, mask = make_inputs(2, 7, 17, 80, 4, 2, torch.float16)
    mask[:, :, 0] = True  # every row sees the root
    zero = torch.zeros(2, dtype=torch.int32)
    a = tree_attention(q, kc, vc, zero, kt, vt, mask)
    b = tree_attention(q, kc[:, :0], vc[:, :0], zero, kt, vt, mask)
    assert_close(a, b, torch.float16, "seqlens=0 vs S=0")
    assert_close(a, tree_attention_ref(q, kc, vc, zero, kt, vt, mask), torch.float16, "empty prefix")


@interp
def test_node_sees_only_itself():
    """With an empty prefix and an identity mask each query returns its own node's value;
    a row that sees nothing returns zeros."""
    B, T, D, Hq, Hkv = 2, 8, 64, 4, 2
    q, kc, vc, _, kt, vt, _ = make_inputs(B, T, 17, D, Hq, Hkv, torch.float32)
    mask = torch.eye(T, dtype=torch.bool).expand(B, T, T).clone()
    mask[1, 3] = False
    out = tree_attention(q, kc, vc, torch.zeros(B, dtype=torch.int32), kt, vt, mask)
    want = vt.repeat_interleave(Hq // Hkv, 2).clone()
    want[1, 3] = 0
    assert_close(out, want, torch.float32, "identity mask")


@interp
def test_through_ops_dispatch(monkeypatch):
    monkeypatch.setenv("MIRROR_RT_BACKEND", "triton")
    assert ops.pick_backend(torch.device("cpu")) == "triton"
    args = make_inputs(2, 7, 300, 64, 8, 2, torch.bfloat16, Tq=4, seed=11)
    assert_close(ops.tree_attention(*args), tree_attention_ref(*args), torch.bfloat16, "ops.tree_attention")


# --- compiled kernels on a GPU -----------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("B,T,Tq,S", [(1, 64, 64, 4096), (2, 16, 16, 1000), (3, 33, 7, 300), (8, 8, 8, 0)])
def test_gpu_bf16(B, T, Tq, S):
    args = make_inputs(B, T, S, 128, 32, 8, torch.bfloat16, Tq=Tq, seed=B + T, device="cuda")
    assert_close(tree_attention(*args), tree_attention_ref(*args), torch.bfloat16, f"gpu B{B} T{T} S{S}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("num_splits", [1, 7])
def test_gpu_dtypes_and_splits(dtype, num_splits):
    q, kc, vc, sl, kt, vt, mask = make_inputs(2, 33, 2000, 80, 8, 2, dtype, device="cuda")
    got = tree_attention_packed(q, kc, vc, sl, kt, vt, pack_tree_mask(mask), num_splits=num_splits)
    assert_close(got, tree_attention_ref(q, kc, vc, sl, kt, vt, mask), dtype, f"gpu {dtype} splits={num_splits}")
