"""``torch.ops.mirror_rt.quant_linear`` (and ``dequantize_rows``, the quantized embedding's lookup):
the quantized-weight product as a torch custom op, so
``torch.compile`` traces through it (a fake implementation gives the output's shape) instead of
breaking the graph at the C++ call. Eager code calls ``mirror_rt.ops.quant.quant_linear``, which
skips the dispatcher's per-call cost."""
from __future__ import annotations

import torch

from mirror_rt.ops.quant import quant_linear_unchecked


@torch.library.custom_op("mirror_rt::quant_linear", mutates_args=())
def quant_linear_op(x: torch.Tensor, blocks: torch.Tensor, qtype: int, out_features: int,
                    bias: torch.Tensor | None = None, packed: bool = False) -> torch.Tensor:
    """x [M, in] float32 CPU, blocks uint8 [out_features, in/32*block_bytes] of GGML type qtype
    (``packed``: the 8-row interleaved layout), bias [out_features] float32 or None -> [M, out_features]
    float32."""
    from mirror_rt import _C

    out = torch.empty(x.shape[0], out_features, dtype=torch.float32)
    _C.quant_linear(x.contiguous(), blocks, qtype, None if bias is None else bias.contiguous(), out,
                    torch.get_num_threads(), packed)
    return out


@quant_linear_op.register_fake
def _(x, blocks, qtype, out_features, bias=None, packed=False):
    return x.new_empty(x.shape[0], out_features)


@torch.library.custom_op("mirror_rt::dequantize_rows", mutates_args=())
def dequantize_rows_op(blocks: torch.Tensor, qtype: int, ids: torch.Tensor, in_features: int,
                       packed: bool = False) -> torch.Tensor:
    """Rows ids (int64 [n]) of blocks uint8 [rows, in_features/32*block_bytes] (``packed``: 8-row
    interleaved) -> float32 [n, in_features] (a quantized embedding's lookup)."""
    from mirror_rt import _C

    out = torch.empty(ids.numel(), in_features, dtype=torch.float32)
    _C.dequantize_rows(blocks, qtype, ids.reshape(-1).contiguous(), out, torch.get_num_threads(), packed)
    return out


@dequantize_rows_op.register_fake
def _(blocks, qtype, ids, in_features, packed=False):
    return blocks.new_empty(ids.numel(), in_features, dtype=torch.float32)


__all__ = ["quant_linear_op", "dequantize_rows_op", "quant_linear_unchecked"]
