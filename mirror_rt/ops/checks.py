"""Input validation for the public ops: every backend sees only inputs that passed these checks.

Errors name the argument and what was expected, so that a caller never meets a crash deep in a
kernel (or, worse, silently wrong numbers).
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_TREE_NODES = 256  # the packed tree mask holds one bit per node per row


def _need(cond, exc, msg):
    if not cond:
        raise exc(msg)


def check_rank(name, t, rank):
    _need(isinstance(t, torch.Tensor), TypeError, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _need(t.dim() == rank, ValueError, f"{name} must have {rank} dimensions, got shape {tuple(t.shape)}")


def check_tree_attention(q, k_cache, v_cache, cache_seqlens, k_tree, v_tree, tree_mask):
    for name, t, rank in (("q", q, 4), ("k_cache", k_cache, 4), ("v_cache", v_cache, 4),
                          ("cache_seqlens", cache_seqlens, 1), ("k_tree", k_tree, 4),
                          ("v_tree", v_tree, 4), ("tree_mask", tree_mask, 3)):
        check_rank(name, t, rank)
    B, Tq, Hq, D = q.shape
    _, S, Hkv, Dk = k_cache.shape
    T = k_tree.shape[1]
    _need(q.dtype in FLOAT_DTYPES, TypeError, f"q must be float16, bfloat16 or float32, got {q.dtype}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("k_tree", k_tree), ("v_tree", v_tree)):
        _need(t.dtype == q.dtype, TypeError, f"{name} dtype {t.dtype} differs from q's {q.dtype}")
        _need(t.device == q.device, ValueError, f"{name} is on {t.device} but q is on {q.device}")
    _need(tuple(v_cache.shape) == tuple(k_cache.shape), ValueError,
          f"v_cache shape {tuple(v_cache.shape)} must equal k_cache shape {tuple(k_cache.shape)}")
    _need(k_cache.shape[0] == B and Dk == D, ValueError,
          f"k_cache must be [B={B}, S, Hkv, D={D}], got {tuple(k_cache.shape)}")
    _need(Hkv > 0 and Hq % Hkv == 0, ValueError,
          f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    _need(tuple(k_tree.shape) == (B, T, Hkv, D), ValueError,
          f"k_tree must be [B={B}, T, Hkv={Hkv}, D={D}], got {tuple(k_tree.shape)}")
    _need(tuple(v_tree.shape) == tuple(k_tree.shape), ValueError,
          f"v_tree shape {tuple(v_tree.shape)} must equal k_tree shape {tuple(k_tree.shape)}")
    _need(1 <= T <= MAX_TREE_NODES, ValueError, f"tree size T must be in [1, {MAX_TREE_NODES}], got {T}")
    _need(1 <= Tq <= T, ValueError, f"q holds {Tq} tree nodes; it must hold between 1 and T={T}")
    _need(tree_mask.dtype == torch.bool, TypeError, f"tree_mask must be bool, got {tree_mask.dtype}")
    _need(tuple(tree_mask.shape) == (B, Tq, T), ValueError,
          f"tree_mask must be [B={B}, Tq={Tq}, T={T}], got {tuple(tree_mask.shape)}")
    _need(cache_seqlens.shape[0] == B, ValueError, f"cache_seqlens must be [B={B}], got {tuple(cache_seqlens.shape)}")
    _need(cache_seqlens.dtype in (torch.int32, torch.int64), TypeError,
          f"cache_seqlens must be int32, got {cache_seqlens.dtype}")
    _need(tree_mask.device == q.device and cache_seqlens.device == q.device, ValueError,
          "tree_mask and cache_seqlens must be on q's device")
    if B and not cache_seqlens.is_cuda:  # on a GPU this value check would cost a host sync per call
        lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
        _need(lo >= 0 and hi <= S, ValueError, f"cache_seqlens must lie in [0, S={S}], got [{lo}, {hi}]")


MODES = ("greedy", "match", "rejection")


def check_verify_accept(tokens, parents, target_logits, mode, temperature, top_k, top_p, draft_probs, uniforms):
    check_rank("tokens", tokens, 2)
    check_rank("parents", parents, 2)
    check_rank("target_logits", target_logits, 3)
    B, T = tokens.shape
    V = target_logits.shape[-1]
    _need(mode in MODES, ValueError, f"mode must be one of {MODES}, got {mode!r}")
    _need(tokens.dtype == torch.int64, TypeError, f"tokens must be int64, got {tokens.dtype}")
    _need(parents.dtype in (torch.int32, torch.int64), TypeError, f"parents must be int32, got {parents.dtype}")
    _need(tuple(parents.shape) == (B, T), ValueError, f"parents must be [B={B}, T={T}], got {tuple(parents.shape)}")
    _need(tuple(target_logits.shape[:2]) == (B, T), ValueError,
          f"target_logits must be [B={B}, T={T}, V], got {tuple(target_logits.shape)}")
    _need(target_logits.dtype in FLOAT_DTYPES, TypeError, f"target_logits must be a float tensor, got {target_logits.dtype}")
    _need(T >= 1 and V >= 1, ValueError, f"need at least one node and one vocabulary entry, got T={T}, V={V}")
    for name, t in (("tokens", tokens), ("parents", parents)):
        _need(t.device == target_logits.device, ValueError, f"{name} is on {t.device}, target_logits on {target_logits.device}")
    _need(bool((parents[:, 0] == -1).all()), ValueError, "parents[:, 0] must be -1 (node 0 is the root)")
    if T > 1:
        idx = torch.arange(1, T, device=parents.device)
        rest = parents[:, 1:]
        _need(bool(((rest >= 0) & (rest < idx)).all()), ValueError,
              "parents[b, i] must satisfy 0 <= parents[b, i] < i for i >= 1 (topological order)")
        _need(bool(((tokens[:, 1:] >= 0) & (tokens[:, 1:] < V)).all()), ValueError,
              f"tokens must lie in [0, V={V}) for every non-root node")
    if mode != "greedy":
        _need(temperature > 0, ValueError, f"temperature must be > 0 for mode {mode!r}, got {temperature}")
        _need(top_k >= 0, ValueError, f"top_k must be >= 0 (0 = off), got {top_k}")
        _need(0.0 < top_p <= 1.0, ValueError, f"top_p must be in (0, 1], got {top_p}")
        if uniforms is not None:
            _need(tuple(uniforms.shape) == (B, T), ValueError, f"uniforms must be [B={B}, T={T}], got {tuple(uniforms.shape)}")
            _need(uniforms.is_floating_point(), TypeError, f"uniforms must be float, got {uniforms.dtype}")
    if mode == "rejection":
        _need(draft_probs is not None, ValueError, "mode 'rejection' needs draft_probs [B, T, V]")
        _need(tuple(draft_probs.shape) == (B, T, V), ValueError,
              f"draft_probs must be [B={B}, T={T}, V={V}], got {tuple(draft_probs.shape)}")
        _need(draft_probs.is_floating_point(), TypeError, f"draft_probs must be float, got {draft_probs.dtype}")


def check_finite(name: str, t: torch.Tensor):
    """FloatingPointError when t holds NaN/inf (as the decoders raise for a model's logits): a NaN
    logit would otherwise verify silently (argmax of NaN rows is 0). One host sync on a GPU."""
    finite = torch.isfinite(t).flatten(1).all(1) if t.dim() > 1 else torch.isfinite(t).all()[None]
    if not bool(finite.all()):
        rows = (~finite).nonzero().flatten().tolist()
        raise FloatingPointError(f"{name} hold NaN/inf values (batch rows {rows}); refusing to verify tokens")
