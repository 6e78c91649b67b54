"""Thin wrappers over the C++ CPU operators in ``mirror_rt._C`` (tensors travel zero-copy by DLPack).

The binding re-checks every argument and raises ValueError/TypeError naming it; these wrappers only
bring inputs into the forms the core takes (packed mask bits, int32 seqlens, fp16 -> fp32).
"""
from __future__ import annotations

import torch

from mirror_rt import _C

MAX_TREE_NODES = _C.max_tree_nodes


def _threads(num_threads):
    # torch.set_num_threads does not reach our OpenMP pool; follow it unless told otherwise.
    return torch.get_num_threads() if num_threads is None else int(num_threads)


def pack_tree_mask(tree_mask: torch.Tensor) -> torch.Tensor:
    """bool [B, Tq, T] -> int32 [B, Tq, ceil(T/32)]: node j is bit j % 32 of word j // 32."""
    if not isinstance(tree_mask, torch.Tensor):
        raise TypeError(f"tree_mask must be a torch.Tensor, got {type(tree_mask).__name__}")
    if tree_mask.dim() != 3:
        raise ValueError(f"tree_mask must have 3 dimensions [B, Tq, T], got shape {tuple(tree_mask.shape)}")
    B, Tq, T = tree_mask.shape
    out = torch.empty(B, Tq, (T + 31) // 32, dtype=torch.int32)
    _C.pack_tree_mask(tree_mask.detach(), out)
    return out


def tree_attention_cpu(q, k_cache, v_cache, cache_seqlens, k_tree, v_tree, tree_mask, sm_scale=None,
                       *, num_threads=None, row_exact=False):
    """C++ tree attention; same contract as ``reference.tree_attention_ref``.

    q [B, Tq, Hq, D], k_cache/v_cache [B, S, Hkv, D], cache_seqlens [B] int32/int64,
    k_tree/v_tree [B, T, Hkv, D] (T <= 256), tree_mask either bool [B, Tq, T] or already packed
    int32 [B, Tq, W >= ceil(T/32)] (e.g. rows of ``BranchTree.mask_bits``; saves the packing).
    float32 and bfloat16 run natively (fp32 accumulation); float16 runs in fp32 and is cast back.
    Only the head dim must be contiguous: k_tree may be a slice of a larger cache along dim 1.
    num_threads: OpenMP threads (None: torch.get_num_threads()). Returns [B, Tq, Hq, D] in q's dtype.
    row_exact: float32 only; each row's result then depends on its q and the keys it sees alone,
    not on the other rows or where the prefix ends (csrc/core/row_attention.h): a token decoded
    alone and the same token inside a verified window get bitwise-equal outputs.
    """
    if sm_scale is None:
        sm_scale = q.shape[-1] ** -0.5
    if tree_mask.dtype == torch.bool:
        tree_mask = pack_tree_mask(tree_mask)
    if cache_seqlens.dtype != torch.int32:
        cache_seqlens = cache_seqlens.to(torch.int32)
    half = q.dtype == torch.float16
    args = [q, k_cache, v_cache, k_tree, v_tree]
    if half:
        args = [t.float() for t in args]
    # Only the head dim needs stride 1; fix anything else here rather than fail.
    args = [t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous() for t in args]
    q_, kc, vc, kt, vt = (t.detach() for t in args)
    out = torch.empty(q_.shape, dtype=q_.dtype)
    _C.tree_attention(q_, kc, vc, cache_seqlens, kt, vt, tree_mask, out, float(sm_scale), _threads(num_threads),
                     bool(row_exact))
    return out.half() if half else out


def row_attention_unchecked(q, k_buf, v_buf, prefix: int, T: int, mask_bits=None, sm_scale=None):
    """Row-exact attention (csrc/core/row_attention.h) for callers that have checked everything
    (the model's CPU attention): q [B, Tq, Hq, D] float32, k_buf/v_buf contiguous float32 KV-cache
    buffers [B, S, Hkv, D] whose slots [0, prefix) every row sees and whose slots [prefix,
    prefix + T) are the new nodes (Tq <= T: the queries are the last Tq). mask_bits None: the
    nodes form a causal chain; else packed int32 [B, Tq, W] (``pack_tree_mask``). Returns
    [B, Tq, Hq, D]. Addresses instead of DLPack: a layer's call costs a few microseconds."""
    q = q.contiguous()
    B, Tq, Hq, D = q.shape
    out = torch.empty_like(q)
    if mask_bits is not None:
        mask_bits = mask_bits.contiguous()  # held here until the call returns
    bits, W = (0, 0) if mask_bits is None else (mask_bits.data_ptr(), mask_bits.shape[-1])
    _C.row_attention_ptr(q.data_ptr(), B, Tq, Hq, D, k_buf.data_ptr(), v_buf.data_ptr(), k_buf.shape[1],
                         k_buf.shape[2], prefix, T, bits, W, out.data_ptr(),
                         D ** -0.5 if sm_scale is None else float(sm_scale), _threads(None))
    return out


SMALL_LINEAR_MAX_ROWS = _C.small_linear_max_rows


def small_linear_cpu(x, weight, bias=None, *, num_threads=None):
    """C++ y = x @ weight^T (+ bias) for at most SMALL_LINEAR_MAX_ROWS rows of float32 x [..., in]
    (weight [out, in], bias [out] or None; all float32, CPU): each row of weight is read once for
    all rows of x. Returns [..., out]."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], weight.shape[0], dtype=x.dtype)
    _C.small_linear(rows.detach(), weight.detach(), None if bias is None else bias.detach(), out,
                    _threads(num_threads))
    return out.reshape(*x.shape[:-1], weight.shape[0])


def small_linear_unchecked(x, weight, bias=None):
    """small_linear_cpu for callers that have checked everything (``ops.linear``): float32 CPU x
    [..., in] with at most SMALL_LINEAR_MAX_ROWS rows, contiguous weight [out, in] and bias [out].
    Addresses instead of DLPack: ops.linear then takes about 15 us a call instead of 70, and a
    pass of SmolLM2-135M makes about 210 such calls (bench/RESULTS.md)."""
    if not x.is_contiguous():
        x = x.contiguous()
    n, k = weight.shape
    out = torch.empty(*x.shape[:-1], n, dtype=torch.float32)  # unpacked sizes: the fastest to parse
    _C.small_linear_ptr(x.data_ptr(), x.numel() // k, k, weight.data_ptr(), n, 0 if bias is None else bias.data_ptr(),
                        out.data_ptr(), _threads(None))
    return out
