"""Slow, obviously-correct torch references for every op.

These are the ground truth: the Triton kernels, the C++ operators and the decoders are all
tested against them, and the benchmarks use them as the "eager" provider. Keep them simple;
speed does not matter here. Shapes and semantics are the public contracts of DESIGN.md §6.
"""
from __future__ import annotations

import torch


def tree_attention_ref(q, k_cache, v_cache, cache_seqlens, k_tree, v_tree, tree_mask, sm_scale=None):
    """Attention of tree nodes over (valid committed prefix) ∪ (allowed tree nodes).

    q            [B, Tq, Hq, D]   queries of the LAST Tq tree nodes (Tq <= T; usually Tq == T)
    k_cache      [B, S, Hkv, D]   committed prefix; row b valid for positions < cache_seqlens[b]
    v_cache      [B, S, Hkv, D]
    cache_seqlens [B] int32
    k_tree       [B, T, Hkv, D]   keys/values of the tree nodes
    v_tree       [B, T, Hkv, D]
    tree_mask    [B, Tq, T] bool  tree_mask[b, i, j]: query i may attend to tree node j
    returns      [B, Tq, Hq, D]   in q's dtype; softmax and accumulation in fp32.
    A query row that can see nothing (empty prefix and an all-False mask row) returns zeros.
    """
    B, Tq, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    scale = D ** -0.5 if sm_scale is None else sm_scale
    group = Hq // Hkv
    out = torch.zeros(B, Tq, Hq, D, dtype=torch.float32, device=q.device)
    for b in range(B):
        n = int(cache_seqlens[b])
        keys = torch.cat([k_cache[b, :n], k_tree[b]], 0).float()  # [n+T, Hkv, D]
        vals = torch.cat([v_cache[b, :n], v_tree[b]], 0).float()
        keys = keys.repeat_interleave(group, dim=1)  # [n+T, Hq, D]
        vals = vals.repeat_interleave(group, dim=1)
        allowed = torch.cat([torch.ones(Tq, n, dtype=torch.bool, device=q.device), tree_mask[b].bool()], 1)
        scores = torch.einsum("thd,khd->htk", q[b].float(), keys) * scale  # [Hq, Tq, n+T]
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows -> zeros
        out[b] = torch.einsum("htk,khd->thd", probs, vals)
    return out.to(q.dtype)


# ---------------------------------------------------------------------------------------------
# verify / accept
# ---------------------------------------------------------------------------------------------

def process_logits(logits, temperature=1.0, top_k=0, top_p=1.0):
    """Logits [..., V] -> probabilities [..., V] (fp32) after temperature, top-k, then top-p.

    top_k = 0 keeps every token; top_p = 1.0 keeps every token. top-p keeps the smallest set of
    highest-probability tokens whose mass reaches top_p (the top token is always kept).
    """
    x = logits.float() / temperature
    if top_k and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = sorted_p.cumsum(-1) - sorted_p
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_from(probs, u):
    """Inverse-CDF sample: the first token whose cumulative probability exceeds u * total.

    probs [V] (need not be normalised), u a float in [0, 1). Computed in float64 so that the
    reference is the exact answer the kernels approximate.
    """
    cdf = probs.double().cumsum(0)
    target = float(u) * float(cdf[-1])
    idx = int(torch.searchsorted(cdf, torch.tensor([target], dtype=torch.float64, device=cdf.device), right=True)[0])
    idx = min(idx, probs.shape[0] - 1)
    while idx > 0 and probs[idx] <= 0:  # never land on a zero-probability token at the edge
        idx -= 1
    return idx


def _children(parents_row):
    kids = [[] for _ in range(len(parents_row))]
    for i in range(1, len(parents_row)):
        kids[int(parents_row[i])].append(i)
    return kids


def _deepest(accepted_flags, depth):
    """Deepest accepted node, lowest id on ties."""
    best = 0
    for i, ok in enumerate(accepted_flags):
        if ok and depth[i] > depth[best]:
            best = i
    return best


def verify_accept_ref(tokens, parents, target_logits, mode="greedy", *, temperature=1.0, top_k=0,
                      top_p=1.0, draft_probs=None, uniforms=None):
    """Verify a token tree against the target and pick the accepted path and the next token.

    tokens        [B, T] int64   node 0 is the root (the pending token), always accepted
    parents       [B, T] int32   parents[:, 0] = -1, parents[b, i] < i
    target_logits [B, T, V]      logits at node j: the target's distribution of the token after j
    mode          "greedy" | "match" | "rejection"
    draft_probs   [B, T, V]      rejection only: q at node j, the probabilities the draft sampled
                                 node j's children from (after its own temperature/top-k/top-p)
    uniforms      [B, T] float   match: uniforms[b, j] samples the target token at node j;
                                 rejection: uniforms[b, i] (i >= 1) accepts node i and
                                 uniforms[b, 0] draws the final token. Drawn with torch.rand if None.
    returns (accept_len [B] int32, accepted [B, T] int32 root-first -1 padded, next_token [B] int64)

    greedy: node i accepted iff its parent is and tokens[i] == argmax(logits[parent]); the
    deepest accepted node wins (lowest id on ties); next_token = argmax(logits[last]).
    match: the same with the argmax replaced by a sample s_j ~ p_j drawn with uniforms[b, j].
    rejection: walk from the root; at an accepted node try its children in id order, accepting
    child x with probability min(1, p(x) / q(x)); after a rejection p <- norm(max(0, p - q)) and
    q <- q without x, renormalised (recursive rejection sampling without replacement). When no
    child is accepted, next_token ~ the current p (the residual, or the bonus distribution).
    """
    B, T = tokens.shape
    device = target_logits.device
    if mode != "greedy" and uniforms is None:
        uniforms = torch.rand(B, T, device=device)
    accept_len = torch.zeros(B, dtype=torch.int32, device=device)
    accepted = torch.full((B, T), -1, dtype=torch.int32, device=device)
    next_token = torch.zeros(B, dtype=torch.int64, device=device)
    for b in range(B):
        par = [int(p) for p in parents[b]]
        depth = [0] * T
        for i in range(1, T):
            depth[i] = depth[par[i]] + 1
        if mode in ("greedy", "match"):
            if mode == "greedy":
                target_tok = target_logits[b].float().argmax(-1).tolist()
            else:
                probs = process_logits(target_logits[b], temperature, top_k, top_p)
                target_tok = [sample_from(probs[j], uniforms[b, j]) for j in range(T)]
            ok = [True] + [False] * (T - 1)
            for i in range(1, T):
                ok[i] = ok[par[i]] and int(tokens[b, i]) == target_tok[par[i]]
            last = _deepest(ok, depth)
            nxt = target_tok[last]
        elif mode == "rejection":
            kids = _children(par)
            probs = process_logits(target_logits[b], temperature, top_k, top_p).double()
            q_all = draft_probs[b].double()
            last = 0
            while True:
                p = probs[last].clone()
                q = q_all[last].clone()
                moved = False
                for child in kids[last]:
                    x = int(tokens[b, child])
                    px, qx = float(p[x]), float(q[x])
                    ratio = 1.0 if qx <= 0 and px > 0 else (px / qx if qx > 0 else 0.0)
                    if float(uniforms[b, child]) < min(1.0, ratio):
                        last, moved = child, True
                        break
                    p = torch.clamp(p - q, min=0.0)
                    p = p / p.sum() if p.sum() > 0 else probs[last].clone()
                    q[x] = 0.0
                    q = q / q.sum() if q.sum() > 0 else q
                if not moved:
                    nxt = sample_from(p, uniforms[b, 0])
                    break
            ok = [False] * T
            node = last
            while node >= 0:
                ok[node] = True
                node = par[node]
        else:
            raise ValueError(f"mode must be 'greedy', 'match' or 'rejection', got {mode!r}")
        path = []
        node = last
        while node >= 0:
            path.append(node)
            node = par[node]
        path.reverse()
        accept_len[b] = len(path) - 1
        accepted[b, : len(path)] = torch.tensor(path, dtype=torch.int32)
        next_token[b] = nxt
    return accept_len, accepted, next_token


def linear_ref(x, weight, bias=None):
    """y[..., n] = sum_k x[..., k] * weight[n, k] (+ bias[n]), one output at a time in float64:
    the obvious reference of ``ops.linear``. x [..., in], weight [out, in], bias [out] or None."""
    xs = x.double().reshape(-1, x.shape[-1])
    w = weight.double()
    y = torch.stack([(xs * w[n]).sum(-1) for n in range(w.shape[0])], dim=-1)
    if bias is not None:
        y = y + bias.double()
    return y.reshape(*x.shape[:-1], w.shape[0]).to(x.dtype)
