"""C++ CPU tree_attention (mirror_rt._C) against the torch reference, and its argument checks."""
import importlib.util
import os
import re

import pytest
import torch
from hypothesis import given, settings, strategies as st

import mirror_rt.ops as ops
from mirror_rt.ops.branch_tree import pack_mask_ref
from mirror_rt.ops.reference import tree_attention_ref

_C = pytest.importorskip("mirror_rt._C")
if not hasattr(_C, "tree_attention"):
    pytest.skip("extension built without tree_attention", allow_module_level=True)
from mirror_rt.ops.cpu import pack_tree_mask, tree_attention_cpu  # noqa: E402

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=2e-3, rtol=2e-3)}


def make_inputs(B, S, T, Tq, Hq, Hkv, D, dtype, seed=0, density=0.5):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    seqlens = torch.randint(0, S + 1, (B,), generator=g, dtype=torch.int32)
    mask = torch.rand(B, Tq, T, generator=g) < density
    return (rnd(B, Tq, Hq, D), rnd(B, S, Hkv, D), rnd(B, S, Hkv, D), seqlens, rnd(B, T, Hkv, D),
            rnd(B, T, Hkv, D), mask)


def assert_close(got, want, dtype, what=""):
    diff = (got.float() - want.float()).abs()
    where = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0]) if diff.numel() else ()
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype],
                               msg=lambda m: f"{what}: max |diff| {diff.max():.3g} at {where}\n{m}")


SHAPES = [  # B, S, T, Tq, Hq, Hkv, D
    (1, 128, 8, 8, 9, 3, 64),      # the embedded draft's heads
    (2, 70, 33, 5, 4, 2, 24),      # Tq < T, D not a multiple of 16
    (3, 0, 1, 1, 2, 1, 1),         # empty prefix, one node, D = 1
    (2, 131, 67, 67, 8, 2, 40),    # key blocks with ragged tails
    (1, 65, 256, 19, 6, 6, 17),    # T at the packed-mask limit, no GQA, odd D
    (2, 300, 17, 17, 32, 8, 128),  # 32/8 heads, D = 128
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, threads, dtype):
    ins = make_inputs(*shape, dtype=dtype)
    got = tree_attention_cpu(*ins, num_threads=threads)
    assert got.dtype == dtype and got.shape == ins[0].shape
    assert_close(got, tree_attention_ref(*ins), dtype, f"shape {shape} threads {threads}")


def test_thread_count_does_not_change_result():
    ins = make_inputs(2, 200, 40, 40, 9, 3, 64, torch.float32, seed=3)
    one = tree_attention_cpu(*ins, num_threads=1)
    assert torch.equal(one, tree_attention_cpu(*ins, num_threads=2))


def test_fp16_and_custom_scale():
    ins = make_inputs(2, 50, 12, 7, 4, 2, 32, torch.float16, seed=1)
    assert_close(tree_attention_cpu(*ins, 0.3), tree_attention_ref(*ins, 0.3), torch.float16)


def test_rows_that_see_nothing_are_zero():
    q, kc, vc, _, kt, vt, mask = make_inputs(2, 10, 6, 6, 4, 2, 16, torch.float32)
    mask[:, 2] = False
    seqlens = torch.zeros(2, dtype=torch.int32)
    got = tree_attention_cpu(q, kc, vc, seqlens, kt, vt, mask)
    assert torch.all(got[:, 2] == 0)
    assert_close(got, tree_attention_ref(q, kc, vc, seqlens, kt, vt, mask), torch.float32)


def test_strided_views_and_packed_mask():
    """k_tree/v_tree as slices of a bigger cache along dim 1, a stride-0 (expanded) batch prefix,
    and a packed mask with spare words, as the draft passes them."""
    B, S, T, Tq, Hq, Hkv, D = 3, 90, 20, 9, 6, 2, 32
    q, kc, vc, seqlens, _, _, mask = make_inputs(B, S, T, Tq, Hq, Hkv, D, torch.float32)
    big_k, big_v = torch.randn(B, 100, Hkv, D), torch.randn(B, 100, Hkv, D)
    kt, vt = big_k[:, 40:40 + T], big_v[:, 40:40 + T]
    kc1, vc1 = kc[:1].expand(B, -1, -1, -1), vc[:1].expand(B, -1, -1, -1)
    bits = torch.zeros(B, Tq, 8, dtype=torch.int32)
    bits[..., :1] = pack_tree_mask(mask)
    want = tree_attention_ref(q, kc1, vc1, seqlens, kt, vt, mask)
    assert_close(tree_attention_cpu(q, kc1, vc1, seqlens, kt, vt, bits), want, torch.float32)
    # head dim not contiguous: the wrapper copies
    qt = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert_close(tree_attention_cpu(qt, kc1, vc1, seqlens.long(), kt, vt, mask), want, torch.float32)


def test_public_op_dispatches_to_cpp(monkeypatch):
    monkeypatch.delenv("MIRROR_RT_BACKEND", raising=False)
    assert ops.pick_backend(torch.device("cpu"), "tree_attention") == "cpp"
    ins = make_inputs(2, 33, 9, 9, 4, 2, 16, torch.float32)
    assert_close(ops.tree_attention(*ins), tree_attention_ref(*ins), torch.float32)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None
                    or not os.path.exists(os.path.join(os.path.dirname(__file__), "..", "triton_kernels",
                                                       "tree_attention.py")),
                    reason="Triton tree_attention not available")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_triton_reference_agree(dtype):
    from mirror_rt.triton_kernels.tree_attention import tree_attention as triton_tree_attention
    ins = make_inputs(2, 40, 12, 7, 6, 2, 32, dtype, seed=5)
    ref = tree_attention_ref(*ins)
    cpp = tree_attention_cpu(*ins)
    tri = triton_tree_attention(*ins)
    assert_close(cpp, ref, dtype, "cpp vs ref")
    assert_close(tri, ref, dtype, "triton vs ref")
    assert_close(cpp, tri, dtype, "cpp vs triton")


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 3), Tq=st.integers(1, 5), T=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_pack_tree_mask_matches_reference(B, Tq, T, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, Tq, T, generator=g) < torch.rand(1, generator=g)
    assert torch.equal(pack_tree_mask(mask), pack_mask_ref(mask))
    # a non-contiguous mask view packs the same
    assert torch.equal(pack_tree_mask(mask.transpose(0, 1).contiguous().transpose(0, 1)), pack_mask_ref(mask))


# --- the binding's argument checks: an error naming the argument, never a crash ---------------

def raw_args(**over):
    q, kc, vc, seqlens, kt, vt, mask = make_inputs(2, 16, 8, 4, 4, 2, 8, torch.float32)
    args = dict(q=q, k_cache=kc, v_cache=vc, cache_seqlens=seqlens, k_tree=kt, v_tree=vt,
                tree_mask=pack_tree_mask(mask), out=torch.empty_like(q), sm_scale=0.35, num_threads=1)
    args.update(over)
    return args


BAD = [
    (dict(q=torch.zeros(2, 4, 4)), ValueError, "q"),
    (dict(q=torch.zeros(2, 4, 4, 8, dtype=torch.float64)), TypeError, "q"),
    (dict(q=torch.zeros(2, 4, 3, 8), out=torch.zeros(2, 4, 3, 8)), ValueError, "q heads"),
    (dict(v_cache=torch.zeros(2, 15, 2, 8)), ValueError, "v_cache"),
    (dict(k_tree=torch.zeros(2, 8, 2, 8, dtype=torch.bfloat16)), TypeError, "k_tree"),
    (dict(v_tree=torch.zeros(2, 9, 2, 8)), ValueError, "v_tree"),
    (dict(k_tree=torch.zeros(2, 300, 2, 8), v_tree=torch.zeros(2, 300, 2, 8)), ValueError, "256"),
    (dict(q=torch.zeros(2, 9, 4, 8), out=torch.zeros(2, 9, 4, 8)), ValueError, "q holds"),
    (dict(k_cache=torch.zeros(2, 16, 8, 2).transpose(-1, -2)), ValueError, "k_cache must be contiguous"),
    (dict(cache_seqlens=torch.tensor([3, 99], dtype=torch.int32)), ValueError, "cache_seqlens[1]"),
    (dict(cache_seqlens=torch.tensor([3, 4])), TypeError, "cache_seqlens"),
    (dict(tree_mask=torch.zeros(2, 4, 8, dtype=torch.bool)), TypeError, "tree_mask"),
    (dict(tree_mask=torch.zeros(2, 4, 0, dtype=torch.int32)), ValueError, "tree_mask"),
    (dict(out=torch.zeros(2, 4, 4, 7)), ValueError, "out"),
    (dict(q=[1, 2, 3]), TypeError, "q must be a tensor"),
    (dict(sm_scale=float("nan")), ValueError, "sm_scale"),
]


@pytest.mark.parametrize("over,exc,text", BAD, ids=lambda x: x if isinstance(x, str) else "")
def test_binding_rejects_bad_input(over, exc, text):
    with pytest.raises(exc, match=re.escape(text)):
        _C.tree_attention(**raw_args(**over))


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="tree_mask"):
        pack_tree_mask(torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="tree_mask"):
        _C.pack_tree_mask(torch.zeros(1, 4, 4), torch.zeros(1, 4, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="out"):
        _C.pack_tree_mask(torch.zeros(1, 4, 40, dtype=torch.bool), torch.zeros(1, 4, 1, dtype=torch.int32))
