"""Public kernels, dispatched by device: the front door for embedders.

``tree_attention`` (attention of token-tree nodes over a KV prefix), ``verify_accept`` (accept a
drafted tree against the target's logits) and ``linear``; each docstring is the whole contract
(shapes, dtypes, mask and tree conventions, the acceptance modes). CUDA tensors go to the Triton
kernels, CPU tensors to the C++ operators when the extension is built, anything else to the torch
reference (``mirror_rt.ops.reference``, the slow obvious ground truth). ``MIRROR_RT_BACKEND=
ref|triton|cpp`` forces one (``triton`` on CPU tensors needs ``TRITON_INTERPRET=1``); a forced
backend that cannot run here raises ValueError saying why. Every backend sees validated inputs.
"""
from __future__ import annotations

import os

import torch

from . import checks, reference

BACKENDS = ("ref", "triton", "cpp")


def _cpp():
    try:
        from mirror_rt import _C
    except ImportError:
        return None
    return _C


def cpu_ops():
    """``mirror_rt.ops.cpu`` (the C++ operators' thin wrappers) where the build has them and
    MIRROR_RT_BACKEND does not force another backend; else None."""
    if forced_backend() not in (None, "", "cpp") or not hasattr(_cpp() or object(), "row_attention_ptr"):
        return None
    from mirror_rt.ops import cpu

    return cpu


def _triton_ok():
    try:
        import triton  # noqa: F401
        from mirror_rt import triton_kernels  # noqa: F401
    except ImportError:
        return False
    return True


_FORCED = ("", "")  # (the variable's raw value, what it means): ops.linear reads it every call


def forced_backend() -> str:
    """MIRROR_RT_BACKEND ("" when unset); a value outside BACKENDS raises ValueError."""
    global _FORCED
    raw = os.environ.get("MIRROR_RT_BACKEND", "")
    if raw != _FORCED[0]:
        forced = raw.strip().lower()
        if forced and forced not in BACKENDS:
            raise ValueError(f"MIRROR_RT_BACKEND must be one of {BACKENDS}, got {forced!r}")
        _FORCED = (raw, forced)
    return _FORCED[1]


def _why_forced_cannot_run(forced: str, device: torch.device, cpp_op: str | None) -> str | None:
    """Why the forced backend cannot run this op on `device` here, or None when it can."""
    if forced == "triton":
        if not _triton_ok():
            return "Triton (or mirror_rt.triton_kernels) cannot be imported"
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            return ("the Triton kernels run on CUDA tensors; CPU tensors need TRITON_INTERPRET=1 "
                    "set before Triton is imported")
        if device.type not in ("cpu", "cuda"):
            return f"the Triton kernels do not run on {device.type} tensors"
    if forced == "cpp" and cpp_op is not None:  # an op without a C++ operator runs the reference
        if device.type != "cpu":
            return f"the C++ operators run on CPU tensors, these are on {device}"
        if not hasattr(_cpp() or object(), cpp_op):
            return (f"the C++ extension mirror_rt._C is not built here (or lacks {cpp_op}); "
                    "reinstall the package to build it")
    return None


def pick_backend(device: torch.device, cpp_op: str | None = None) -> str:
    """Which backend runs an op on `device` (honours MIRROR_RT_BACKEND; a forced backend that
    cannot run here raises ValueError saying which and why)."""
    forced = forced_backend()
    if forced:
        why = _why_forced_cannot_run(forced, device, cpp_op)
        if why:
            raise ValueError(f"MIRROR_RT_BACKEND={forced} cannot run on {device.type} tensors here: {why}")
        return forced
    if device.type == "cuda" and _triton_ok():
        return "triton"
    if device.type == "cpu" and cpp_op is not None and hasattr(_cpp() or object(), cpp_op):
        return "cpp"
    return "ref"


def tree_attention(q, k_cache, v_cache, cache_seqlens, k_tree, v_tree, tree_mask, sm_scale=None):
    """Attention of token-tree nodes over a committed KV prefix plus the tree's own nodes.

    Shapes and dtypes (B batch rows, Tq queries, T tree nodes, S cache slots, D head size):
      q             [B, Tq, Hq, D]   float16 / bfloat16 / float32: queries of the LAST Tq of the
                                     T tree nodes (1 <= Tq <= T; usually Tq == T)
      k_cache       [B, S, Hkv, D]   q's dtype and device: the committed prefix; row b's keys at
      v_cache       [B, S, Hkv, D]   slots [0, cache_seqlens[b]) are used, the rest is ignored
      cache_seqlens [B] int32 (int64 accepted), each in [0, S]
      k_tree        [B, T, Hkv, D]   keys / values of the T tree nodes themselves (not in the cache)
      v_tree        [B, T, Hkv, D]
      tree_mask     [B, Tq, T] bool  tree_mask[b, i, j] True = query i (tree node T - Tq + i) MAY
                                     attend to tree node j; False = may not. A node normally
                                     attends to its ancestors and itself (a chain: lower triangle).
      sm_scale      float or None    score scale; None = D ** -0.5
    Returns out [B, Tq, Hq, D] in q's dtype: for each query, softmax over (every valid prefix slot)
    ∪ (the tree nodes its mask row allows), accumulated in float32. Grouped-query attention:
    Hq % Hkv == 0 and query head h reads KV head h // (Hq // Hkv). T <= 256. A query that may
    attend to nothing (empty prefix, all-False row) gets zeros. Every prefix slot is visible to
    every query: a sliding window is applied by the model (models/llama.py), not here.
    Bad shapes, dtypes or devices raise ValueError / TypeError before any kernel runs.

    Example: two tree nodes, the second masked from the first; an empty prefix.
    >>> kv = torch.randn(1, 2, 1, 4); q = torch.randn(1, 2, 2, 4)
    >>> mask = torch.tensor([[[True, False], [True, True]]])
    >>> out = tree_attention(q, kv[:, :0], kv[:, :0], torch.zeros(1, dtype=torch.int32), kv, kv, mask)
    >>> out.shape, torch.allclose(out[0, 0], kv[0, 0].expand(2, 4))  # node 0 sees only itself
    (torch.Size([1, 2, 2, 4]), True)
    """
    checks.check_tree_attention(q, k_cache, v_cache, cache_seqlens, k_tree, v_tree, tree_mask)
    backend = pick_backend(q.device, "tree_attention")
    if backend == "triton":
        from mirror_rt.triton_kernels.tree_attention import tree_attention as run
    elif backend == "cpp":
        from mirror_rt.ops.cpu import tree_attention_cpu as run
    else:
        run = reference.tree_attention_ref
    return run(q, k_cache, v_cache, cache_seqlens, k_tree, v_tree, tree_mask, sm_scale)


def verify_accept(tokens, parents, target_logits, mode="greedy", *, temperature=1.0, top_k=0,
                  top_p=1.0, draft_probs=None, uniforms=None):
    """Verify a drafted token tree against the target's logits: what is accepted, what comes next.

    Inputs (B batch rows, T tree nodes, V vocabulary):
      tokens        [B, T] int64    node 0 is the root: the pending token (committed, not yet fed
                                    to the target), always accepted; tokens of nodes 1.. lie in [0, V)
      parents       [B, T] int32    (int64 accepted) parents[:, 0] = -1 and 0 <= parents[b, i] < i
                                    (topological order); a chain is parents[i] = i - 1
      target_logits [B, T, V]       float16 / bfloat16 / float32: the target's logits AT node j,
                                    i.e. its distribution of the token that follows node j;
                                    NaN / inf raise FloatingPointError
      mode          "greedy" | "match" | "rejection" (all lossless: the output follows the target)
      temperature, top_k, top_p     applied to the target's p (and define q for the draft) before
                                    any sampling rule; ignored by "greedy"; temperature > 0,
                                    top_k >= 0 (0 = off), 0 < top_p <= 1 (1 = off)
      draft_probs   [B, T, V] float "rejection" only: q at node j, the probabilities the draft drew
                                    node j's children from (after its own temperature/top-k/top-p)
      uniforms      [B, T] float in [0, 1): the randomness, for reproducible runs; None draws
                                    torch.rand. "match": uniforms[b, j] samples the target token at
                                    node j; "rejection": uniforms[b, i] (i >= 1) decides node i and
                                    uniforms[b, 0] draws the final token
    Rules:
      greedy:    node i is accepted iff its parent is and tokens[i] == argmax(logits[parent]);
                 next_token = argmax(logits[last accepted node]).
      match:     the same with the argmax replaced by a sample s_j ~ p_j (inverse CDF of
                 uniforms[b, j]); next_token = s_last. Needs no draft probabilities.
      rejection: walk from the root; at an accepted node try its children in id order, accepting
                 child x with probability min(1, p(x) / q(x)); after a rejection p <- norm(max(0,
                 p - q)) and q loses x (recursive rejection sampling). When no child is accepted,
                 next_token ~ the current p (the residual, or the bonus distribution).
      The deepest accepted node wins (lowest node id on ties).
    Returns (accept_len, accepted, next_token):
      accept_len [B] int32          number of accepted NON-ROOT nodes (0..depth): the root is
                                    not counted
      accepted   [B, T] int32       the accepted path's node ids, root first (node 0), padded with -1
      next_token [B] int64          the token after the path: the correction, or the bonus token
                                    when the whole path was accepted
    Bad shapes, dtypes, devices or a broken tree raise ValueError / TypeError before any kernel runs.

    Example: a chain root -> 3 -> 2; the target's argmax is 3 after the root, 1 after token 3.
    >>> logits = torch.zeros(1, 3, 5); logits[0, 0, 3] = logits[0, 1, 1] = logits[0, 2, 4] = 9.0
    >>> tokens, parents = torch.tensor([[0, 3, 2]]), torch.tensor([[-1, 0, 1]], dtype=torch.int32)
    >>> accept_len, accepted, next_token = verify_accept(tokens, parents, logits)
    >>> accept_len.tolist(), accepted.tolist(), next_token.tolist()
    ([1], [[0, 1, -1]], [1])
    """
    checks.check_verify_accept(tokens, parents, target_logits, mode, temperature, top_k, top_p,
                               draft_probs, uniforms)
    checks.check_finite("target_logits", target_logits)
    if mode == "rejection":
        checks.check_finite("draft_probs", draft_probs)
    if mode != "greedy" and uniforms is None:
        uniforms = torch.rand(tokens.shape, device=target_logits.device)
    backend = pick_backend(target_logits.device)
    if backend == "triton":
        from mirror_rt.triton_kernels.verify_accept import verify_accept as run
    else:
        run = reference.verify_accept_ref
    return run(tokens, parents, target_logits, mode, temperature=temperature, top_k=top_k,
               top_p=top_p, draft_probs=draft_probs, uniforms=uniforms)


def linear(x, weight, bias=None):
    """y = x @ weight^T (+ bias), as ``torch.nn.functional.linear``: x [..., in], weight [out, in],
    bias [out] or None; returns [..., out] in x's dtype.

    Up to 8 rows of float32 CPU input, outside autograd, go to the C++ kernel, which reads each
    row of weight once for all rows. On a small model the target's verification pass and the
    draft's steps are such calls, and there a GEMM of 2-8 rows cost 1.5-2x a one-row product
    (bench/RESULTS.md). Everything else goes to torch (the reference is ``reference.linear_ref``).
    The test runs on every call of every layer, so it reads only cheap tensor attributes (is_cpu,
    not device.type; not pick_backend, which looks the extension up each time).
    MIRROR_RT_BACKEND=ref or triton sends every call to torch.
    A ``QuantWeight`` (weights kept in GGUF blocks; ``mirror_rt.ops.quant``) takes the quantized kernel.
    """
    if not isinstance(weight, torch.Tensor):
        from mirror_rt.ops.quant import quant_linear

        return quant_linear(x, weight, bias)
    if (x.dtype is torch.float32 and weight.dtype is torch.float32 and x.is_cpu and weight.is_cpu
            and weight.dim() == 2 and weight.shape[0] > 0 and x.dim() >= 1
            and 0 < x.numel() <= _small_linear_rows() * x.shape[-1] and x.shape[-1] == weight.shape[1]
            and weight.is_contiguous()
            and (bias is None or (bias.dtype is torch.float32 and bias.is_cpu
                                  and bias.shape == weight.shape[:1] and bias.is_contiguous()))
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad)))
            and forced_backend() in ("", "cpp")):
        return _small_linear_kernel(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


_SMALL_LINEAR_ROWS = None
_small_linear_kernel = None


def _small_linear_rows() -> int:
    """Rows the C++ small-row kernel takes (0 without the extension); looked up once."""
    global _SMALL_LINEAR_ROWS, _small_linear_kernel
    if _SMALL_LINEAR_ROWS is None:
        _SMALL_LINEAR_ROWS = getattr(_cpp(), "small_linear_max_rows", 0)
        if _SMALL_LINEAR_ROWS:
            from mirror_rt.ops.cpu import small_linear_unchecked as _small_linear_kernel
    return _SMALL_LINEAR_ROWS


__all__ = ["tree_attention", "verify_accept", "linear", "pick_backend", "reference", "checks"]
