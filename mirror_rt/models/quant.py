"""Quantized layers: linears and the embedding kept in GGUF's block formats (``mirror_rt.ops.quant``).

``load_model`` keeps a GGUF file's Q4_0 / Q4_1 / Q8_0 blocks as they are (``quant=None``, CPU) or
quantizes a float checkpoint (``quant="q8_0"`` / ``"q4_0"``) with ``quantize_model``: the decoder
layers' linears take the chosen type, the embedding and LM head Q8_0 (as llama.cpp's Q4 files do;
a 4-bit head costs more accuracy than its bytes save), norms and rotary tables stay float32.

``QuantLinear`` picks its kernel when it is built, not per call: the C++ quantized product for
float32 CPU input (any row count: rows past 8 go in chunks of 8, each computed as if alone, so
prefill and a verification window give the same rows a single-token step gives), the dequantized
weight elsewhere. Inference only: a gradient through a quantized weight is refused.
"""
from __future__ import annotations

import torch
from torch import nn

from mirror_rt.ops.quant import (BLOCK, PACK_ROWS, QTYPE_NAMES, QTYPES, QuantWeight, check_blocks, dequantize_ref,
                                 pack_rows8, qtype_id, quant_linear, quant_linear_unchecked)

__all__ = ["QuantLinear", "QuantEmbedding", "quantize", "quantize_q8_0", "quantize_q4_0", "quantize_q4_1",
           "dequantize", "quantize_model", "weight_bytes", "is_quantized"]


LAYOUTS = ("auto", "rows", "packed")


def _laid_out(blocks, qtype: int, shape, layout: str, name: str, check_scales: bool, out=None):
    """(blocks as kept, packed?) for a module's weight given in ``layout``: "auto" (row-major blocks,
    packed when the rows are a multiple of 8, into ``out`` if given), "rows" (row-major, kept so) or
    "packed" (already packed by ``pack_rows8``; its scales are not checked)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    blocks = check_blocks(blocks, qtype, shape, name, scales=check_scales and layout != "packed")
    if layout == "packed" and blocks.shape[0] % PACK_ROWS:
        raise ValueError(f"{name}: a packed weight needs a multiple of {PACK_ROWS} rows, got {blocks.shape[0]}")
    if layout == "auto" and blocks.shape[0] % PACK_ROWS == 0 and blocks.shape[0] and blocks.is_cpu:
        return pack_rows8(blocks, qtype, out=out), True
    return blocks, layout == "packed"


class QuantLinear(nn.Module):
    """y = x @ W^T (+ bias) with W [out, in] kept as blocks (uint8 [out, in/32*block_bytes]); a
    multiple of 8 rows on the CPU in the packed layout (``layout``: see ``_laid_out``). ``out``: a
    uint8 tensor of the blocks' shape to pack them into (rows of a fused weight:
    ``quant_fused.fused_slots``); a new one by default."""

    def __init__(self, blocks: torch.Tensor, qtype, shape, bias: torch.Tensor | None = None, check_scales=True,
                 layout: str = "auto", out: torch.Tensor | None = None):
        super().__init__()
        self.qtype = qtype_id(qtype)
        self.out_features, self.in_features = (int(s) for s in shape)
        blocks, self.packed = _laid_out(blocks, self.qtype, shape, layout, "weight", check_scales, out)
        self.register_buffer("blocks", blocks)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    @property
    def weight(self) -> QuantWeight:
        return QuantWeight(self.blocks, self.qtype, (self.out_features, self.in_features), self.packed)

    @classmethod
    def from_linear(cls, linear: nn.Linear, qtype) -> "QuantLinear":
        w = linear.weight.detach()
        return cls(quantize(w, qtype), qtype, w.shape, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("a quantized linear runs inference only; load the model with quant='dequantize' to train")
        if x.dtype is torch.float32 and x.is_cpu and self.blocks.is_cpu:
            if torch.compiler.is_compiling():  # traced: the custom op (its fake gives the shape)
                y = torch.ops.mirror_rt.quant_linear(x.reshape(-1, self.in_features), self.blocks, self.qtype,
                                                     self.out_features, self.bias, self.packed)
                return y.reshape(*x.shape[:-1], self.out_features)
            if x.shape[-1] != self.in_features:
                raise ValueError(f"x must be [..., {self.in_features}], got shape {tuple(x.shape)}")
            if x.numel():
                return quant_linear_unchecked(x.contiguous(), self.blocks, self.qtype, self.out_features, self.bias,
                                              self.packed)
        return quant_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"qtype={QTYPE_NAMES[self.qtype]}, bias={self.bias is not None}, packed={self.packed}")


class QuantEmbedding(nn.Module):
    """Embedding lookup in a table kept as blocks: each id's row dequantized to float32 (the table
    packed like QuantLinear's, so a tied LM head shares it; ``out`` as QuantLinear's)."""

    def __init__(self, blocks: torch.Tensor, qtype, shape, check_scales=True, layout: str = "auto",
                 out: torch.Tensor | None = None):
        super().__init__()
        self.qtype = qtype_id(qtype)
        self.num_embeddings, self.embedding_dim = (int(s) for s in shape)
        blocks, self.packed = _laid_out(blocks, self.qtype, shape, layout, "embedding", check_scales, out)
        self.register_buffer("blocks", blocks)

    @property
    def weight(self) -> QuantWeight:
        return QuantWeight(self.blocks, self.qtype, (self.num_embeddings, self.embedding_dim), self.packed)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] int64 -> [..., H] float32 (an id outside the table raises ValueError)."""
        if torch.compiler.is_compiling() and self.blocks.is_cpu:
            rows = torch.ops.mirror_rt.dequantize_rows(self.blocks, self.qtype, ids.reshape(-1), self.embedding_dim,
                                                       self.packed)
            return rows.reshape(*ids.shape, self.embedding_dim)
        rows = self.weight.dequantize(ids.reshape(-1).to("cpu"))
        return rows.reshape(*ids.shape, self.embedding_dim).to(ids.device)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={QTYPE_NAMES[self.qtype]}"


# --- quantizing float weights (ggml's reference rules, vectorized) ----------------------------

def _blocks_of(weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() != 2 or weight.shape[1] % BLOCK:
        raise ValueError(f"a quantized weight must be 2-D with rows a multiple of {BLOCK} values, got shape "
                         f"{tuple(weight.shape)}")
    return weight.detach().to("cpu", torch.float32).reshape(weight.shape[0], -1, BLOCK)


def _pack(*fields: torch.Tensor) -> torch.Tensor:
    """Per-block fields ([out, nb] fp16 scales, [out, nb, k] uint8 bytes) -> blocks [out, nb*bytes]."""
    parts = [f[..., None].contiguous().view(torch.uint8) if f.dtype == torch.float16 else f for f in fields]
    out = torch.cat(parts, dim=-1)
    return out.reshape(out.shape[0], -1).contiguous()


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """q [out, nb, 32] in 0..15 -> [out, nb, 16] bytes: value j low, value j + 16 high."""
    return (q[..., :16] | (q[..., 16:] << 4)).to(torch.uint8)


def quantize_q8_0(weight: torch.Tensor) -> torch.Tensor:
    """float [out, in] -> Q8_0 blocks uint8 [out, in/32*34]: d = max|w| / 127, q = round(w / d)."""
    w = _blocks_of(weight)
    d = w.abs().amax(-1) / 127.0
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = w * inv[..., None]
    q = q.round_().clamp_(-127, 127).to(torch.int8).view(torch.uint8)  # in place: one float temporary, not three
    return _pack(d.half(), q)


def quantize_q4_0(weight: torch.Tensor) -> torch.Tensor:
    """float [out, in] -> Q4_0 blocks uint8 [out, in/32*18]: d = (the value of largest magnitude) / -8,
    q = min(15, trunc(w / d + 8.5))."""
    w = _blocks_of(weight)
    idx = w.abs().argmax(-1, keepdim=True)
    d = torch.gather(w, -1, idx)[..., 0] / -8.0
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = torch.clamp((w * inv[..., None] + 8.5).trunc(), 0, 15).to(torch.int32)
    return _pack(d.half(), _nibbles(q))


def quantize_q4_1(weight: torch.Tensor) -> torch.Tensor:
    """float [out, in] -> Q4_1 blocks uint8 [out, in/32*20]: m = min, d = (max - min) / 15,
    q = min(15, trunc((w - m) / d + 0.5))."""
    w = _blocks_of(weight)
    lo, hi = w.amin(-1), w.amax(-1)
    d = (hi - lo) / 15.0
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = torch.clamp(((w - lo[..., None]) * inv[..., None] + 0.5).trunc(), 0, 15).to(torch.int32)
    return _pack(d.half(), lo.half(), _nibbles(q))


_QUANTIZERS = {QTYPES["q8_0"]: quantize_q8_0, QTYPES["q4_0"]: quantize_q4_0, QTYPES["q4_1"]: quantize_q4_1}
_QUANTIZE_ROWS = 256  # rows quantized at a time by ``quantize``


def quantize(weight: torch.Tensor, qtype) -> torch.Tensor:
    """float [out, in] -> blocks of ``qtype`` ("q8_0", "q4_0", "q4_1" or a GGML id). Rows are
    quantized independently, so a few at a time: the float32 temporaries are a chunk's, not a
    whole weight's (several times the weight's size in peak memory, for a half-precision one)."""
    q = qtype_id(qtype)
    if weight.dim() != 2 or weight.shape[0] <= _QUANTIZE_ROWS or weight.shape[1] % BLOCK:
        return _QUANTIZERS[q](weight)  # (a shape the quantizers refuse is refused whole)
    chunks = [_QUANTIZERS[q](weight[i:i + _QUANTIZE_ROWS]) for i in range(0, weight.shape[0], _QUANTIZE_ROWS)]
    return torch.cat(chunks)


def dequantize(blocks: torch.Tensor, qtype, shape) -> torch.Tensor:
    """blocks -> float32 [out, in] (the torch reference, ``mirror_rt.ops.quant.dequantize_ref``)."""
    return dequantize_ref(check_blocks(blocks, qtype, shape, scales=False), qtype, shape)


# --- whole models ---------------------------------------------------------------------------

def _quantizable(linear: nn.Module) -> bool:
    return isinstance(linear, nn.Linear) and linear.weight.shape[1] % BLOCK == 0


def quantize_layers(layers: nn.Module, qtype) -> int:
    """Swap every nn.Linear under ``layers`` (rows a multiple of 32) for a QuantLinear of
    ``qtype``, in place. Returns how many were swapped."""
    swapped = 0
    for parent in list(layers.modules()):
        for name, child in list(parent.named_children()):
            if _quantizable(child):
                setattr(parent, name, QuantLinear.from_linear(child, qtype))
                swapped += 1
    return swapped


def quantize_model(model, qtype, head_qtype="q8_0", fuse=True):
    """Quantize a float LlamaModel on the CPU in place: decoder-layer linears to ``qtype``, the
    embedding and LM head (tied: one table) to ``head_qtype``; ``fuse``: ``quant_fused.fuse_layers``. Returns
    the model."""
    if model.device.type != "cpu":
        raise ValueError(f"quantized weights run on the CPU; the model is on {model.device}")
    quantize_layers(model.layers, qtype)
    emb = model.embed_tokens
    if isinstance(emb, nn.Embedding) and emb.weight.shape[1] % BLOCK == 0:
        tied = model.lm_head.weight is emb.weight
        table = quantize(emb.weight, head_qtype)
        model.embed_tokens = QuantEmbedding(table, head_qtype, emb.weight.shape)
        if tied:
            model.lm_head = QuantLinear(table, head_qtype, emb.weight.shape)
    if _quantizable(model.lm_head):
        model.lm_head = QuantLinear.from_linear(model.lm_head, head_qtype)
    if fuse:
        from mirror_rt.models.quant_fused import fuse_layers

        fuse_layers(model.layers)
    return model


def is_quantized(model) -> bool:
    return any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules())


def weight_bytes(model) -> int:
    """Bytes of every parameter and persistent buffer of ``model``, each storage counted once
    (a tied head and embedding share theirs)."""
    seen, total = set(), 0
    tensors = list(model.parameters()) + [b for _, b in model.named_buffers()]
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        key = (t.data_ptr(), t.numel(), t.device)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


class KeptBlocks:
    """A weight read from a file as blocks (``load_model`` keeps them): uint8 [out, in/32*bytes].
    ``row_order``: None, or int64 [out], the rows of ``blocks`` in the order the weight has them
    (a Llama GGUF's q/k rows); taken when the weight is installed, so that the reordered copy of
    each weight lives only while that weight is packed."""

    __slots__ = ("blocks", "qtype", "shape", "row_order")

    def __init__(self, blocks, qtype, shape, row_order=None):
        self.blocks, self.qtype, self.shape = blocks, qtype_id(qtype), tuple(int(s) for s in shape)
        self.row_order = row_order

    def row_blocks(self) -> torch.Tensor:
        """The blocks in the weight's row order (a copy where ``row_order`` reorders them)."""
        blocks = torch.as_tensor(self.blocks)
        return blocks if self.row_order is None else blocks[torch.as_tensor(self.row_order)]


def install_blocks(model, kept: dict, tensors: dict, path: str = "model", copied=None):
    """Put the kept weights of a (meta-device) LlamaModel in place: ``kept`` maps parameter names
    ("layers.0.self_attn.q_proj.weight", "embed_tokens.weight", "lm_head.weight") to KeptBlocks;
    a linear's bias stays a float tensor in ``tensors``. A tied LM head shares the embedding's
    blocks. Each module is swapped once, here: QuantLinear / QuantEmbedding run their kernels
    without a per-call choice. ``copied``, if given, is called with [blocks] each time a module made
    its own copy of them (packing, reordering: the loader gives their file pages back at once). A
    layer's q/k/v (and gate/up) are packed into one buffer, back to back (``fused_slots``), which
    ``fuse_layers`` then takes as it is. Raises ValueError naming ``path`` and the tensor on bad blocks."""
    from mirror_rt.models.quant_fused import fused_slots

    slots = fused_slots({name: (k.qtype, k.shape) for name, k in kept.items()})

    def make(cls, name, k, *extra):
        try:
            module = cls(k.row_blocks(), k.qtype, k.shape, *extra, out=slots.get(name))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: tensor {name}: {e}") from None
        if copied is not None and (module.packed or k.row_order is not None):
            copied([torch.as_tensor(k.blocks)])
        return module

    for name, k in kept.items():
        module_name = name.removesuffix(".weight")
        if module_name == "embed_tokens":
            model.embed_tokens = make(QuantEmbedding, name, k)
            if model.config.tie_embeddings:
                model.lm_head = QuantLinear(model.embed_tokens.blocks, k.qtype, k.shape, check_scales=False,
                                            layout="packed" if model.embed_tokens.packed else "rows")
            continue
        parent_name, _, attr = module_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr)
        if not isinstance(old, nn.Linear) or tuple(old.weight.shape) != k.shape:
            raise ValueError(f"{path}: tensor {name} has shape {k.shape}, config expects "
                             f"{tuple(getattr(old, 'weight', torch.empty(0)).shape)}")
        setattr(parent, attr, make(QuantLinear, name, k, tensors.get(f"{module_name}.bias")))


def quant_note(model) -> str:
    """One line for the demo: the kernels that run ``model``'s linears and its weight bytes."""
    from collections import Counter

    from mirror_rt import _C

    kinds = Counter(QTYPE_NAMES[m.qtype] for m in model.modules() if isinstance(m, (QuantLinear, QuantEmbedding)))
    mb = weight_bytes(model) / 1e6
    if not kinds:
        return f"weights: float, {mb:.1f} MB in memory"
    parts = ", ".join(f"{n} x{k}" for n, k in sorted(kinds.items()))
    return f"linears: C++ quantized kernels ({_C.quant_linear_isa()}; {parts}), weights {mb:.1f} MB in memory"
