"""Tree attention for decode-time verification: T tree nodes over a long committed prefix.

Contract: exactly `mirror_rt.ops.reference.tree_attention_ref` (inputs validated by
`mirror_rt.ops.checks`). Design, for small T and long S:

* GQA packing: one program owns one KV head and a block of the (query node, query head) rows
  that share it, so each KV tile is read once per KV head rather than once per query head.
* Flash-decoding split: the valid prefix of each sequence is cut into NS chunks handled by
  separate programs (so one sequence fills the GPU); each writes an unnormalised partial
  (acc, max, sum) and a small merge kernel combines them by log-sum-exp. With NS == 1 the
  attention kernel normalises and writes the output itself (no partials, one launch).
* The tree nodes are handled by the last split, after its prefix chunk. The mask travels as
  bits (int32 words, one row per query node; T <= 256 -> at most 8 words), and tree tiles that
  no row of the program may see are skipped.
* One online softmax in fp32 (base 2: the scale carries log2(e)); fp16/bf16/fp32 inputs.

Interpreter (TRITON_INTERPRET=1): bf16 `tl.dot` gives garbage there, so operands are cast to
fp32 when interpreting (a constexpr, so the GPU path keeps native bf16/fp16 tensor-core dots).
fp32 inputs use IEEE fp32 dots (no TF32) so that they match the fp32 reference closely.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pack_tree_mask(tree_mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool mask [B, Tq, T] into int32 words [B, Tq, ceil(T / 32)] (bit j%32 of word j//32).

    The mask is the same for every layer of a model step, so callers that run many layers can
    pack once and call `tree_attention_packed`.
    """
    B, Tq, T = tree_mask.shape
    W = triton.cdiv(T, 32)
    bits = torch.zeros(B, Tq, W * 32, dtype=torch.int64, device=tree_mask.device)
    bits[..., :T] = tree_mask
    weights = torch.ones(32, dtype=torch.int64, device=tree_mask.device) << torch.arange(32, device=tree_mask.device)
    words = (bits.view(B, Tq, W, 32) * weights).sum(-1)
    # Fold into int32's range explicitly (bit 31 set -> negative) instead of relying on wrap-around.
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32).contiguous()


@triton.jit
def _online_update(acc, m_i, l_i, s, v, DOT_FP32: tl.constexpr):
    """One online-softmax step. s: [M, N] scores in log2 units (-inf where masked); v: [N, D]."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if DOT_FP32:
        pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i


@triton.jit
def _tree_attn_kernel(
    Q, K, V, KT, VT, MASK, SEQLENS, O, OPART, MLPART,
    sqb, sqt, sqh, sqd,
    skb, sks, skh, skd,
    svb, svs, svh, svd,
    sktb, sktt, skth, sktd,
    svtb, svtt, svth, svtd,
    smb, smt,
    sob, sot, soh, sod,
    Tq, T, HKV, NS, qk_scale,
    G: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, SINGLE: tl.constexpr,
):
    pid_m = tl.program_id(0)  # fastest: programs sharing a KV tile run together (L2 reuse)
    pid_s = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // HKV).to(tl.int64)  # int64: b * stride overflows int32 on big caches
    kvh = pid_bh % HKV

    # Rows of this program: (query node tq, query head kvh*G + g) pairs, g fastest.
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Tq * G
    tq = rows // G
    head = kvh * G + rows % G
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_n = tl.arange(0, BLOCK_N)

    q = tl.load(Q + b * sqb + tq[:, None] * sqt + head[:, None] * sqh + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    # Finite start for the running max: an all-masked tile then leaves alpha = 1 and p = 0.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # This split's chunk of the valid prefix, sized per sequence (no host sync on seqlens).
    n = tl.load(SEQLENS + b).to(tl.int32)
    chunk = tl.cdiv(tl.cdiv(n, NS), BLOCK_N) * BLOCK_N
    start = pid_s * chunk
    end = tl.minimum(start + chunk, n)
    for k0 in range(start, end, BLOCK_N):
        pos = k0 + offs_n
        n_ok = pos < end
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K + b * skb + pos[:, None] * sks + kvh * skh + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
        v = tl.load(V + b * svb + pos[:, None] * svs + kvh * svh + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
        if DOT_FP32:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(n_ok[None, :], s * qk_scale, float("-inf"))
        acc, m_i, l_i = _online_update(acc, m_i, l_i, s, v, DOT_FP32)

    if pid_s == NS - 1:  # the tree nodes, once per (row block, KV head)
        for t0 in range(0, T, BLOCK_N):
            node = t0 + offs_n
            t_ok = node < T
            words = tl.load(MASK + b * smb + tq[:, None] * smt + (node // 32)[None, :],
                            mask=row_ok[:, None] & t_ok[None, :], other=0)
            allowed = ((words >> (node % 32)[None, :]) & 1) != 0
            if tl.max(allowed.to(tl.int32)) > 0:  # skip tiles no row of this program may see
                kv_mask = t_ok[:, None] & d_ok[None, :]
                k = tl.load(KT + b * sktb + node[:, None] * sktt + kvh * skth + offs_d[None, :] * sktd,
                            mask=kv_mask, other=0.0)
                v = tl.load(VT + b * svtb + node[:, None] * svtt + kvh * svth + offs_d[None, :] * svtd,
                            mask=kv_mask, other=0.0)
                if DOT_FP32:
                    s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
                else:
                    s = tl.dot(q, tl.trans(k))
                s = tl.where(allowed, s * qk_scale, float("-inf"))
                acc, m_i, l_i = _online_update(acc, m_i, l_i, s, v, DOT_FP32)

    out_mask = row_ok[:, None] & d_ok[None, :]
    if SINGLE:
        # A row that saw nothing has l = 0: write zeros, as the reference does.
        out = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
        tl.store(O + b * sob + tq[:, None] * sot + head[:, None] * soh + offs_d[None, :] * sod,
                 out.to(O.dtype.element_ty), mask=out_mask)
    else:
        # Partials are contiguous [B, NS, Tq, Hq, (D | 2)] fp32; row id = tq * Hq + head.
        prow = (b * NS + pid_s) * (Tq * HKV * G) + tq * (HKV * G) + head
        tl.store(OPART + prow[:, None] * D + offs_d[None, :], acc, mask=out_mask)
        tl.store(MLPART + prow * 2, m_i, mask=row_ok)
        tl.store(MLPART + prow * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _merge_kernel(OPART, MLPART, O, sob, sot, soh, sod, R, HQ, NS,
                  D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Log-sum-exp merge of the NS split partials of rows (tq, head) of sequence b."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    offs_d = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (offs_d < D)[None, :]
    m_all = tl.full([BLOCK_R], -1.0e30, tl.float32)
    for s in range(NS):
        m_all = tl.maximum(m_all, tl.load(MLPART + ((b * NS + s) * R + rows) * 2, mask=row_ok, other=-1.0e30))
    l_all = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for s in range(NS):
        prow = (b * NS + s) * R + rows
        m_s = tl.load(MLPART + prow * 2, mask=row_ok, other=-1.0e30)
        l_s = tl.load(MLPART + prow * 2 + 1, mask=row_ok, other=0.0)
        w = tl.exp2(m_s - m_all)
        l_all += w * l_s
        acc += w[:, None] * tl.load(OPART + prow[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
    out = tl.where(l_all[:, None] > 0, acc / tl.where(l_all > 0, l_all, 1.0)[:, None], 0.0)
    tq = rows // HQ
    head = rows % HQ
    tl.store(O + b * sob + tq[:, None] * sot + head[:, None] * soh + offs_d[None, :] * sod,
             out.to(O.dtype.element_ty), mask=mask)


def _num_splits(q, S, rows, block_m, B, Hkv):
    """How many programs share one sequence's prefix."""
    if S == 0:
        return 1
    if q.device.type != "cuda":
        return min(3, triton.cdiv(S, 128))  # exercise the split + merge path in CPU tests
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    per_split = triton.cdiv(rows, block_m) * B * Hkv
    # Each split writes rows*D fp32 partials per KV head; keep chunks long enough that this stays
    # small next to the chunk's KV bytes (chunk >= 4 * rows keys), and at least 256 keys.
    min_chunk = max(256, 4 * rows)
    return max(1, min(triton.cdiv(2 * sms, per_split), triton.cdiv(S, min_chunk), 64))


def tree_attention_packed(q, k_cache, v_cache, cache_seqlens, k_tree, v_tree, mask_bits,
                          sm_scale=None, num_splits=None):
    """`tree_attention` with the mask already packed by `pack_tree_mask` ([B, Tq, ceil(T/32)] int32).

    num_splits overrides the prefix split count (tests use it to cover both paths).
    """
    B, Tq, Hq, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    T = k_tree.shape[1]
    G = Hq // Hkv
    out = torch.empty(B, Tq, Hq, D, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    scale = (D ** -0.5 if sm_scale is None else sm_scale) * LOG2E
    rows = Tq * G
    interp = _interpreting()
    # 64 rows keeps the fp32 accumulator in registers on the GPU; the interpreter pays per
    # program instead, so it takes bigger blocks.
    block_m = min(128 if interp else 64, max(16, triton.next_power_of_2(rows)))
    block_n = 64
    block_d = max(16, triton.next_power_of_2(D))
    ns = num_splits or _num_splits(q, S, rows, block_m, B, Hkv)
    dot_fp32 = interp or q.dtype == torch.float32
    single = ns == 1
    if single:
        opart = mlpart = out  # unused
    else:
        opart = torch.empty(B, ns, Tq, Hq, D, dtype=torch.float32, device=q.device)
        mlpart = torch.empty(B, ns, Tq, Hq, 2, dtype=torch.float32, device=q.device)
    # Clamped on the device: checks.py skips the value check on GPUs (it would sync), and an
    # out-of-range length must never read past the cache.
    seqlens = cache_seqlens.to(torch.int32).clamp(0, k_cache.shape[1])
    grid = (triton.cdiv(rows, block_m), ns, B * Hkv)
    _tree_attn_kernel[grid](
        q, k_cache, v_cache, k_tree, v_tree, mask_bits, seqlens, out, opart, mlpart,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *k_tree.stride(), *v_tree.stride(),
        mask_bits.stride(0), mask_bits.stride(1), *out.stride(),
        Tq, T, Hkv, ns, scale,
        G=G, D=D, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_FP32=dot_fp32, SINGLE=single, num_warps=4, num_stages=2,
    )
    if not single:
        block_r = 32
        _merge_kernel[(triton.cdiv(Tq * Hq, block_r), B)](
            opart, mlpart, out, *out.stride(), Tq * Hq, Hq, ns,
            D=D, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
        )
    return out


def tree_attention(q, k_cache, v_cache, cache_seqlens, k_tree, v_tree, tree_mask, sm_scale=None):
    """Attention of the last Tq tree nodes over (valid prefix) ∪ (tree nodes allowed by the mask).

    q [B, Tq, Hq, D] fp16/bf16/fp32; k_cache, v_cache [B, S, Hkv, D] (row b valid below
    cache_seqlens[b]); cache_seqlens [B] int32; k_tree, v_tree [B, T, Hkv, D] (any strides, e.g. a
    slice of a bigger cache); tree_mask [B, Tq, T] bool. Returns [B, Tq, Hq, D] in q's dtype,
    fp32 softmax and accumulation; a row that sees nothing is zero. Same contract as
    `mirror_rt.ops.reference.tree_attention_ref`.
    """
    return tree_attention_packed(q, k_cache, v_cache, cache_seqlens, k_tree, v_tree,
                                 pack_tree_mask(tree_mask), sm_scale)
