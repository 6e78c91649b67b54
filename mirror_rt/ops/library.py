"""mirror_rt's kernels as torch custom ops: ``torch.ops.mirror_rt.<name>``.

Registered with ``torch.library`` so that ``torch.compile`` (and other stacks) can place them in a
graph: each op has a CPU kernel (the C++ operator where the extension is built, else the torch
reference), a CUDA kernel (the Triton launcher) and a fake kernel that only computes output
shapes. The ops take validated inputs: ``mirror_rt.ops.*`` stays the front door that checks them
(DESIGN.md §6) and, in eager code, calls the kernels directly, because a custom-op dispatch costs
more than some of those calls (``small_linear`` runs about 200 times a pass of a small model).
Compiled code calls the ops here (``linear_in_graph``, the static forward in models/llama.py).

``define`` is the registration pattern for every op of the namespace (other modules add theirs
with it): one schema, kernels by device type, one fake.
"""
from __future__ import annotations

from typing import Callable

import torch

from . import reference

NAMESPACE = "mirror_rt"


def define(name: str, schema: str, *, default: Callable, fake: Callable,
           kernels: dict[str, Callable] | None = None):
    """Register ``mirror_rt::name`` with the given schema ("(Tensor x, ...) -> Tensor"), a
    ``default`` kernel for every device, per-device-type ``kernels`` ({"cpu": fn, "cuda": fn})
    and a ``fake`` kernel (shapes/dtypes only). Returns the op's ``CustomOpDef``."""
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", default, mutates_args=(), schema=schema)
    for device_type, fn in (kernels or {}).items():
        op.register_kernel(device_type)(fn)
    op.register_fake(fake)
    return op


def _cpp():
    try:
        from mirror_rt import _C
    except ImportError:
        return None
    return _C


def _triton_available() -> bool:
    """Whether Triton and our kernels are installed, without importing them (this runs while the
    ops register, at import time, and importing Triton costs most of a second)."""
    import importlib.util

    return importlib.util.find_spec("triton") is not None and importlib.util.find_spec(
        "mirror_rt.triton_kernels") is not None


def _cuda_kernels(make: Callable[[], Callable]) -> dict[str, Callable]:
    """{"cuda": the Triton launcher} where Triton is importable (the launcher is imported on
    first use, so that importing this module never imports Triton)."""
    if not _triton_available():
        return {}

    def run(*args):
        return make()(*args)
    return {"cuda": run}


# --- tree attention ---------------------------------------------------------------------------

def _tree_attention_default(q, k_cache, v_cache, cache_seqlens, k_tree, v_tree, tree_mask, sm_scale=None):
    return reference.tree_attention_ref(q, k_cache, v_cache, cache_seqlens, k_tree, v_tree, tree_mask, sm_scale)


def _tree_attention_cpu(q, k_cache, v_cache, cache_seqlens, k_tree, v_tree, tree_mask, sm_scale=None):
    if not hasattr(_cpp() or object(), "tree_attention"):
        return _tree_attention_default(q, k_cache, v_cache, cache_seqlens, k_tree, v_tree, tree_mask, sm_scale)
    from mirror_rt.ops.cpu import tree_attention_cpu
    return tree_attention_cpu(q, k_cache, v_cache, cache_seqlens, k_tree, v_tree, tree_mask, sm_scale)


def _tree_attention_triton():
    from mirror_rt.triton_kernels.tree_attention import tree_attention
    return tree_attention


def _tree_attention_fake(q, k_cache, v_cache, cache_seqlens, k_tree, v_tree, tree_mask, sm_scale=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


tree_attention = define(
    "tree_attention",
    "(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, Tensor k_tree, Tensor v_tree, "
    "Tensor tree_mask, float? sm_scale=None) -> Tensor",
    default=_tree_attention_default, fake=_tree_attention_fake,
    kernels={"cpu": _tree_attention_cpu, **_cuda_kernels(_tree_attention_triton)})


# --- verify / accept --------------------------------------------------------------------------

def _verify_accept_default(tokens, parents, target_logits, mode, temperature, top_k, top_p, draft_probs,
                           uniforms):
    return reference.verify_accept_ref(tokens, parents, target_logits, mode, temperature=temperature, top_k=top_k,
                                       top_p=top_p, draft_probs=draft_probs, uniforms=uniforms)


def _verify_accept_triton():
    from mirror_rt.triton_kernels.verify_accept import verify_accept

    def run(tokens, parents, target_logits, mode, temperature, top_k, top_p, draft_probs, uniforms):
        return verify_accept(tokens, parents, target_logits, mode, temperature=temperature, top_k=top_k,
                             top_p=top_p, draft_probs=draft_probs, uniforms=uniforms)
    return run


def _verify_accept_fake(tokens, parents, target_logits, mode, temperature, top_k, top_p, draft_probs, uniforms):
    B, T = tokens.shape
    dev = target_logits.device
    return (torch.empty(B, dtype=torch.int32, device=dev), torch.empty(B, T, dtype=torch.int32, device=dev),
            torch.empty(B, dtype=torch.int64, device=dev))


verify_accept = define(
    "verify_accept",
    "(Tensor tokens, Tensor parents, Tensor target_logits, str mode, float temperature, int top_k, "
    "float top_p, Tensor? draft_probs, Tensor? uniforms) -> (Tensor, Tensor, Tensor)",
    default=_verify_accept_default, fake=_verify_accept_fake,
    kernels=_cuda_kernels(_verify_accept_triton))


# --- small-row linear -------------------------------------------------------------------------

def _small_linear_default(x, weight, bias):
    return torch.nn.functional.linear(x, weight, bias)


_SMALL_LINEAR_ROWS = None


def _small_linear_rows() -> int:
    """Rows the C++ small-row kernel takes (0 without the extension), looked up once: call it
    eagerly before compiling (``compiled.CompiledModel`` does), as an import can't be traced."""
    global _SMALL_LINEAR_ROWS
    if _SMALL_LINEAR_ROWS is None:
        _SMALL_LINEAR_ROWS = getattr(_cpp(), "small_linear_max_rows", 0)
    return _SMALL_LINEAR_ROWS


def small_linear_fits(x: torch.Tensor, weight: torch.Tensor, bias) -> bool:
    """Whether the C++ small-row kernel takes this call: float32 CPU x [..., in] with 1 to
    small_linear_max_rows rows, contiguous float32 weight [out, in], bias [out] or None. Reads
    shapes and dtypes only, so under torch.compile it is decided once per graph."""
    rows = _small_linear_rows()
    return (rows > 0 and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.device.type == "cpu" and weight.device.type == "cpu" and weight.dim() == 2
            and x.dim() >= 1 and x.shape[-1] == weight.shape[1] and weight.shape[0] > 0
            and 0 < x.numel() <= rows * x.shape[-1] and weight.is_contiguous()
            and (bias is None or (bias.dtype == torch.float32 and bias.device.type == "cpu"
                                  and tuple(bias.shape) == (weight.shape[0],) and bias.is_contiguous())))


def _small_linear_cpu(x, weight, bias):
    if not small_linear_fits(x, weight, bias):
        return _small_linear_default(x, weight, bias)
    from mirror_rt.ops.cpu import small_linear_unchecked
    return small_linear_unchecked(x, weight, bias)


def _small_linear_fake(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


small_linear = define(
    "small_linear", "(Tensor x, Tensor weight, Tensor? bias) -> Tensor",
    default=_small_linear_default, fake=_small_linear_fake, kernels={"cpu": _small_linear_cpu})


def linear_in_graph(x, weight, bias=None):
    """``ops.linear`` for compiled code: the small-row C++ kernel through its custom op where it
    fits, else ``F.linear`` (which inductor may fuse or lower). Same contract as ``ops.linear``."""
    if small_linear_fits(x, weight, bias):
        return torch.ops.mirror_rt.small_linear(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


__all__ = ["NAMESPACE", "define", "tree_attention", "verify_accept", "small_linear", "small_linear_fits",
           "linear_in_graph"]
