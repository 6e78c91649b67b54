"""Public kernels, dispatched by device.

CUDA tensors go to the Triton kernels, CPU tensors to the C++ operators when the extension is
built, anything else to the torch reference. ``MIRROR_RT_BACKEND=ref|triton|cpp`` forces one
(``triton`` on CPU tensors needs ``TRITON_INTERPRET=1``). Every backend sees validated inputs.
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
    """Tree attention over a committed prefix plus the nodes of a token tree.

    q [B, Tq, Hq, D] (queries of the last Tq <= T tree nodes), k_cache/v_cache [B, S, Hkv, D]
    (row b valid below cache_seqlens[b]), cache_seqlens [B] int32, k_tree/v_tree [B, T, Hkv, D],
    tree_mask [B, Tq, T] bool. Returns [B, Tq, Hq, D] in q's dtype (fp32 accumulation).
    Hq % Hkv == 0; sm_scale defaults to D ** -0.5; T <= 256.
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
    """Verify a token tree (a chain is parents[i] = i - 1) against the target's logits.

    tokens [B, T] int64 (node 0 = the pending root), parents [B, T] int32, target_logits [B, T, V].
    Returns (accept_len [B] int32, accepted [B, T] int32 node ids root-first, -1 padded,
    next_token [B] int64). See reference.verify_accept_ref for each mode's exact rule.
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
    """
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
