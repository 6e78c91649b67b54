"""Fused verify/accept: per-node target decisions over T x V logits, then the walk, in one launch.

Contract: exactly `mirror_rt.ops.reference.verify_accept_ref` (inputs validated by
`mirror_rt.ops.checks`). Grid: (NSPLIT vocabulary chunks, B * T nodes).

1. Every program reads its chunk of one node's row once: greedy keeps (max, argmax); match
   keeps the chunk's softmax statistics (max, sum of exp).
2. The last program to finish a node (atomic counter per node) combines the chunks: greedy
   takes the argmax; match turns u * total into the chunk holding the inverse-CDF crossing and
   scans that chunk only (so the row is read about 1 + 1/NSPLIT times).
3. The last node program to finish a sequence (atomic counter per sequence) walks the tree:
   accepted flags along `parents`, deepest accepted node (lowest id on ties), -1 padded path.

Rejection mode runs one program per node (NSPLIT = 1): the node tries its children in id order
with recursive rejection without replacement, materialising the residual p and the reduced q
in fp64 scratch only after a rejection; the walk then follows each node's accepted child.

torch pre-processing (documented deviation from "one launch"): top-k / top-p need a sort, so
match with top_k/top_p, and rejection always, first turn logits into probabilities with the
reference's own `process_logits` (torch ops) and the kernel samples from those. Greedy and
plain-temperature match read the logits directly and are fully fused (one kernel after a small
memset of the counters).

Sampling is inverse-CDF in fp64 running sums like the reference; results match it exactly
except when u * total lands within fp32 rounding of a CDF boundary.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mirror_rt.ops.reference import process_logits

GREEDY, MATCH_LOGITS, MATCH_PROBS, REJECTION = 0, 1, 2, 3


@triton.jit
def _load_vals(A, B, use_b, idx, ok, m, temp, FROM_LOGITS: tl.constexpr):
    """Unnormalised probabilities at idx (fp64, 0 outside `ok`): from logits exp(x/temp - m),
    or from probability rows A (or B when use_b != 0; the masked load skips the other)."""
    if FROM_LOGITS:
        x = tl.load(A + idx, mask=ok, other=float("-inf")).to(tl.float32)
        y = tl.exp(x / temp - m).to(tl.float64)
    else:
        ya = tl.load(A + idx, mask=ok & (use_b == 0), other=0.0).to(tl.float64)
        yb = tl.load(B + idx, mask=ok & (use_b != 0), other=0.0).to(tl.float64)
        y = tl.where(use_b != 0, yb, ya)
    return tl.where(ok, y, 0.0)


@triton.jit
def _scan(A, B, use_b, lo, hi, target, running, m, temp,
          FROM_LOGITS: tl.constexpr, BLOCK_V: tl.constexpr):
    """First index in [lo, hi) whose running cumulative sum exceeds target; if rounding leaves
    none, the last index with positive probability (the reference's edge rule). Stops early."""
    offs = tl.arange(0, BLOCK_V)
    found = lo * 0 - 1  # int32 tensors for the loop-carried state
    last_pos = lo * 0 - 1
    v0 = lo
    while (v0 < hi) & (found < 0):
        idx = v0 + offs
        ok = idx < hi
        y = _load_vals(A, B, use_b, idx, ok, m, temp, FROM_LOGITS)
        c = running + tl.cumsum(y, 0)
        first = tl.min(tl.where(ok & (c > target), idx, 2**30))
        found = tl.where(first < 2**30, first, found)
        last_pos = tl.maximum(last_pos, tl.max(tl.where(y > 0, idx, -1)))
        running += tl.sum(y)
        v0 += BLOCK_V
    return tl.where(found >= 0, found, last_pos)


@triton.jit
def _walk(b, T, TOKENS, PARENTS, TT, RS, ACCEPT_LEN, ACCEPTED, NEXT,
          MODE: tl.constexpr, BLOCK_T: tl.constexpr):
    """Pick the last accepted node of sequence b and write its path and next token."""
    offs = tl.arange(0, BLOCK_T)
    base = b * T
    if MODE == 3:  # rejection: follow each node's accepted child (TT) from the root
        last = b * 0
        nxt = tl.load(TT + base, volatile=True)
        while nxt >= 0:
            last = nxt
            nxt = tl.load(TT + base + nxt, volatile=True)
        token = tl.load(RS + base + last, volatile=True)
    else:  # greedy / match: node i accepted iff its parent is and tokens[i] == TT[parent]
        ok = (offs == 0).to(tl.int32)
        depth = offs * 0
        for i in range(1, T):
            p = tl.load(PARENTS + base + i)
            tok = tl.load(TOKENS + base + i)
            ok_p = tl.sum(tl.where(offs == p, ok, 0))
            d_p = tl.sum(tl.where(offs == p, depth, 0))
            ok_i = ((ok_p > 0) & (tok == tl.load(TT + base + p, volatile=True))).to(tl.int32)
            ok = tl.where(offs == i, ok_i, ok)
            depth = tl.where(offs == i, d_p + 1, depth)
        score = tl.where((ok > 0) & (offs < T), depth, -1)
        last = tl.min(tl.where(score == tl.max(score), offs, BLOCK_T))  # deepest, lowest id
        token = tl.load(TT + base + last, volatile=True)
    n = b * 0  # depth of `last`
    node = last
    while node > 0:
        n += 1
        node = tl.load(PARENTS + base + node)
    path = tl.full([BLOCK_T], -1, tl.int32)
    node = last
    d = n
    while node >= 0:
        path = tl.where(offs == d, node, path)
        node = tl.load(PARENTS + base + node)
        d -= 1
    tl.store(ACCEPTED + base + offs, path, mask=offs < T)
    tl.store(ACCEPT_LEN + b, n)
    tl.store(NEXT + b, token.to(tl.int64))


@triton.jit
def _reject_node(b, j, T, V, TOKENS, PARENTS, P, Q, UNIF, WP, WQ, BLOCK_V: tl.constexpr):
    """Rejection at node j: (accepted child or -1, sample from the final p when none is).

    p/q are kept unnormalised with scalar normalisers zp/zq, reading the original rows (P, Q)
    until a rejection forces residuals into the fp64 scratch rows (WP, WQ)."""
    offs = tl.arange(0, BLOCK_V)
    base = b * T
    u_root = tl.load(UNIF + base).to(tl.float64)
    zp = u_root * 0.0 + 1.0  # fp64 tensors for the loop-carried state
    zq = u_root * 0.0 + 1.0
    use_wp = j * 0
    use_wq = j * 0
    child = j * 0 - 1
    for c in range(j + 1, T):
        if (tl.load(PARENTS + base + c) == j) & (child < 0):
            x = tl.load(TOKENS + base + c)
            px = tl.where(use_wp != 0, tl.load(WP + x, mask=use_wp != 0, other=0.0),
                          tl.load(P + x, mask=use_wp == 0, other=0.0).to(tl.float64)) / zp
            qx = tl.where(use_wq != 0, tl.load(WQ + x, mask=use_wq != 0, other=0.0),
                          tl.load(Q + x, mask=use_wq == 0, other=0.0).to(tl.float64)) / zq
            ratio = tl.where((qx <= 0) & (px > 0), 1.0, tl.where(qx > 0, px / tl.where(qx > 0, qx, 1.0), 0.0))
            if tl.load(UNIF + base + c).to(tl.float64) < tl.minimum(ratio, 1.0):
                child = c + j * 0
            else:
                # p <- max(0, p - q) (renormalised; the original p if nothing is left),
                # q <- q without x (renormalised; all zero stays zero).
                sp = u_root * 0.0
                sq = u_root * 0.0
                for v0 in range(0, V, BLOCK_V):
                    idx = v0 + offs
                    ok = idx < V
                    pv = _load_vals(P, WP, use_wp, idx, ok, 0.0, 1.0, False) / zp
                    qv = _load_vals(Q, WQ, use_wq, idx, ok, 0.0, 1.0, False) / zq
                    r = tl.maximum(pv - qv, 0.0)
                    nq = tl.where(idx == x, 0.0, qv)
                    tl.store(WP + idx, r, mask=ok)
                    tl.store(WQ + idx, nq, mask=ok)
                    sp += tl.sum(r)
                    sq += tl.sum(nq)
                tl.debug_barrier()  # scalar reads of WP/WQ above may come from other threads
                use_wp = (sp > 0).to(tl.int32)
                zp = tl.where(sp > 0, sp, 1.0)
                use_wq = use_wq * 0 + 1
                zq = tl.where(sq > 0, sq, 1.0)
    token = j * 0
    if child < 0:
        total = u_root * 0.0
        for v0 in range(0, V, BLOCK_V):
            idx = v0 + offs
            total += tl.sum(_load_vals(P, WP, use_wp, idx, idx < V, 0.0, 1.0, False))
        token = _scan(P, WP, use_wp, j * 0, V, u_root * total, u_root * 0.0, 0.0, 1.0, False, BLOCK_V)
    return child, token


@triton.jit
def _verify_kernel(
    TOKENS, PARENTS, X, DRAFT, UNIF, PART, TT, RS, CNT, WP, WQ,
    ACCEPT_LEN, ACCEPTED, NEXT,
    sxb, sxt, sdb, sdt,
    B, T, V, NSPLIT, chunk, temp,
    MODE: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_T: tl.constexpr,
):
    split = tl.program_id(0)
    row = tl.program_id(1)  # = b * T + j
    b = row // T
    j = row % T
    xrow = X + b.to(tl.int64) * sxb + j.to(tl.int64) * sxt
    offs = tl.arange(0, BLOCK_V)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, V)

    # Phase 1: this chunk of the node's row.
    if MODE == 0:
        best_v = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32))
        best_i = lo
        for v0 in range(lo, hi, BLOCK_V):
            idx = v0 + offs
            x = tl.load(xrow + idx, mask=idx < hi, other=float("-inf")).to(tl.float32)
            bm = tl.max(x)
            take = bm > best_v  # strict: the lowest index wins ties, as torch.argmax does
            best_i = tl.where(take, v0 + tl.argmax(x, 0), best_i)
            best_v = tl.where(take, bm, best_v)
        stat_a = best_v
        stat_b = best_i.to(tl.float32)  # exact: V < 2**24
    elif MODE == 1:
        m = tl.max(tl.full([BLOCK_V], -1.0e30, tl.float32))
        tot = tl.sum(tl.zeros([BLOCK_V], tl.float32))
        for v0 in range(lo, hi, BLOCK_V):
            idx = v0 + offs
            x = tl.load(xrow + idx, mask=idx < hi, other=float("-inf")).to(tl.float32) / temp
            m_new = tl.maximum(m, tl.max(x))
            tot = tot * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new))
            m = m_new
        stat_a = m
        stat_b = tot
    elif MODE == 2:
        tot = tl.sum(tl.zeros([BLOCK_V], tl.float32))
        for v0 in range(lo, hi, BLOCK_V):
            idx = v0 + offs
            tot += tl.sum(tl.load(xrow + idx, mask=idx < hi, other=0.0))
        stat_a = tot * 0.0
        stat_b = tot
    else:
        child, token = _reject_node(b, j, T, V, TOKENS, PARENTS, xrow, DRAFT + b.to(tl.int64) * sdb + j.to(tl.int64) * sdt,
                                    UNIF, WP + row.to(tl.int64) * V, WQ + row.to(tl.int64) * V, BLOCK_V)
        stat_a = child.to(tl.float32)
        stat_b = token.to(tl.float32)
    tl.store(PART + (row * NSPLIT + split) * 2, stat_a)
    tl.store(PART + (row * NSPLIT + split) * 2 + 1, stat_b)

    # Phase 2: the node's last chunk program combines the chunks. The barrier orders every
    # thread's stores before the release of the atomic; volatile loads read other SMs' writes.
    tl.debug_barrier()
    if tl.atomic_add(CNT + row, 1, sem="acq_rel", scope="gpu") == NSPLIT - 1:
        if MODE == 0:
            # Fresh names: Triton (3.5+) rejects re-typing phase 1's int32 best_i as fp32 here.
            win_v = tl.load(PART + row * NSPLIT * 2, volatile=True)
            win_i = tl.load(PART + row * NSPLIT * 2 + 1, volatile=True)
            for s in range(1, NSPLIT):
                cand_v = tl.load(PART + (row * NSPLIT + s) * 2, volatile=True)
                cand_i = tl.load(PART + (row * NSPLIT + s) * 2 + 1, volatile=True)
                win_i = tl.where(cand_v > win_v, cand_i, win_i)
                win_v = tl.maximum(cand_v, win_v)
            tl.store(TT + row, win_i.to(tl.int32))
        elif MODE == 3:
            tl.store(TT + row, stat_a.to(tl.int32))
            tl.store(RS + row, stat_b.to(tl.int32))
        else:
            m_all = tl.load(PART + row * NSPLIT * 2, volatile=True)
            for s in range(1, NSPLIT):
                m_all = tl.maximum(m_all, tl.load(PART + (row * NSPLIT + s) * 2, volatile=True))
            total = (m_all * 0.0).to(tl.float64)
            for s in range(NSPLIT):
                w = tl.load(PART + (row * NSPLIT + s) * 2 + 1, volatile=True) * tl.exp(
                    tl.load(PART + (row * NSPLIT + s) * 2, volatile=True) - m_all)
                total += w.to(tl.float64)
            target = tl.load(UNIF + row).to(tl.float64) * total
            # The chunk holding the crossing (else the last chunk with any mass), and the mass before it.
            chosen = split * 0 - 1
            before = total * 0.0
            last_pos = split * 0
            before_last = total * 0.0
            cum = total * 0.0
            for s in range(NSPLIT):
                w = (tl.load(PART + (row * NSPLIT + s) * 2 + 1, volatile=True) * tl.exp(
                    tl.load(PART + (row * NSPLIT + s) * 2, volatile=True) - m_all)).to(tl.float64)
                hit = (chosen < 0) & (cum + w > target)
                before = tl.where(hit, cum, before)
                chosen = tl.where(hit, s, chosen)
                before_last = tl.where(w > 0, cum, before_last)
                last_pos = tl.where(w > 0, s, last_pos)
                cum += w
            before = tl.where(chosen >= 0, before, before_last)
            chosen = tl.where(chosen >= 0, chosen, last_pos)
            c_lo = chosen * chunk
            tok = _scan(xrow, xrow, 0, c_lo, tl.minimum(c_lo + chunk, V), target, before, m_all, temp,
                        MODE == 1, BLOCK_V)
            tl.store(TT + row, tok)
        # Phase 3: the sequence's last node walks the tree.
        tl.debug_barrier()
        if tl.atomic_add(CNT + B * T + b, 1, sem="acq_rel", scope="gpu") == T - 1:
            _walk(b, T, TOKENS, PARENTS, TT, RS, ACCEPT_LEN, ACCEPTED, NEXT, MODE, BLOCK_T)


def _plan(V, rows, device, mode, num_splits, block_v):
    """(BLOCK_V, NSPLIT, chunk, num_warps) for a launch."""
    on_gpu = device.type == "cuda"
    if block_v is None:
        block_v = min(4096 if on_gpu else 1024, max(16, triton.next_power_of_2(V)))
    if mode == REJECTION:
        num_splits = 1  # the sibling recursion needs the whole row in one program
    elif num_splits is None:
        num_splits = 1
        if on_gpu:  # enough programs to fill the card, each reading at least two blocks
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            num_splits = max(1, min(triton.cdiv(4 * sms, rows), triton.cdiv(V, 2 * block_v)))
    chunk = triton.cdiv(triton.cdiv(V, num_splits), block_v) * block_v
    return block_v, triton.cdiv(V, chunk), chunk, (8 if block_v >= 2048 else 4)


def verify_accept(tokens, parents, target_logits, mode="greedy", *, temperature=1.0, top_k=0,
                  top_p=1.0, draft_probs=None, uniforms=None, num_splits=None, block_v=None):
    """Verify a token tree against the target's logits (see `reference.verify_accept_ref`).

    tokens [B, T] int64 (node 0 = root), parents [B, T] int32 (parents[:, 0] = -1, parents[i] < i),
    target_logits [B, T, V] fp16/bf16/fp32, draft_probs [B, T, V] float (rejection), uniforms
    [B, T] float (match/rejection; drawn with torch.rand if None). num_splits / block_v override
    the vocabulary split (tests). Returns (accept_len [B] int32, accepted [B, T] int32 root-first,
    -1 padded, next_token [B] int64).
    """
    B, T, V = target_logits.shape
    dev = target_logits.device
    accept_len = torch.zeros(B, dtype=torch.int32, device=dev)
    accepted = torch.full((B, T), -1, dtype=torch.int32, device=dev)
    next_token = torch.zeros(B, dtype=torch.int64, device=dev)
    if B == 0:
        return accept_len, accepted, next_token
    if mode != "greedy" and uniforms is None:
        uniforms = torch.rand(B, T, device=dev)
    x, draft, kind = target_logits, None, GREEDY
    if mode == "match":
        kind = MATCH_LOGITS
        if (top_k and top_k < V) or top_p < 1.0:
            x, kind = process_logits(target_logits, temperature, top_k, top_p), MATCH_PROBS
    elif mode == "rejection":
        x, kind = process_logits(target_logits, temperature, top_k, top_p), REJECTION
        draft = draft_probs if draft_probs.stride(-1) == 1 else draft_probs.contiguous()
    elif mode != "greedy":
        raise ValueError(f"mode must be 'greedy', 'match' or 'rejection', got {mode!r}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if draft is None:
        draft = x  # unused
    rows = B * T
    blk, ns, chunk, warps = _plan(V, rows, dev, kind, num_splits, block_v)
    tokens = tokens.contiguous()
    parents = parents.to(torch.int32).contiguous()
    unif = uniforms.to(torch.float64).contiguous() if uniforms is not None else x
    part = torch.empty(rows * ns * 2, dtype=torch.float32, device=dev)
    tt = torch.empty(2, rows, dtype=torch.int32, device=dev)
    cnt = torch.zeros(rows + B, dtype=torch.int32, device=dev)
    if kind == REJECTION:
        wp = torch.empty(rows * V, dtype=torch.float64, device=dev)
        wq = torch.empty(rows * V, dtype=torch.float64, device=dev)
    else:
        wp = wq = part  # unused
    _verify_kernel[(ns, rows)](
        tokens, parents, x, draft, unif, part, tt[0], tt[1], cnt, wp, wq,
        accept_len, accepted, next_token,
        x.stride(0), x.stride(1), draft.stride(0), draft.stride(1),
        B, T, V, ns, chunk, float(temperature),
        MODE=kind, BLOCK_V=blk, BLOCK_T=max(16, triton.next_power_of_2(T)), num_warps=warps,
    )
    return accept_len, accepted, next_token
