"""Weights kept in GGUF's block formats (Q8_0, Q4_0, Q4_1) and the products against them.

A quantized weight [out, in] is a uint8 tensor [out, in / 32 * block_bytes]: each row is its
32-value blocks in order, laid out as GGUF files store them (ggml's block_q8_0 / q4_0 / q4_1):

    Q8_0: fp16 d, 32 x int8 q           value = q * d                 34 bytes
    Q4_0: fp16 d, 16 bytes of nibbles   value = (q - 8) * d           18 bytes
    Q4_1: fp16 d, fp16 m, 16 bytes      value = q * d + m             20 bytes

(nibbles: byte j's low half is value j, its high half value j + 16). ``QuantWeight`` wraps such a
tensor with its type and shape; ``ops.linear(x, quant_weight)`` takes the C++ kernel on CPU
(``mirror_rt._C.quant_linear``): x is quantized per 32-block to int8 as llama.cpp quantizes
activations (``quantize_x_ref``: d = max|x| / 127, q = round(x / d), d kept in fp32) and each block's
dot product runs in integers. The kernel computes each row of x the same way whatever rows come
with it, so a token decoded alone and inside a verification window give bitwise-equal logits
(given the same activations: the model's row-exact attention sees to that). Off the CPU the weight
is dequantized and x is not quantized. ``quant_linear_ref`` is the kernel's slow reference
(float64, x quantized), ``dequantize_ref`` the format's reference.

Modules keep weights with a multiple of 8 rows in a packed layout (``pack_rows8``): the same
bytes, the blocks of 8 rows interleaved so the kernel reads them with a few vector loads and its
lanes are output rows (twice as fast at one row on AVX2). ``QuantWeight.row_blocks()`` gives the
GGUF layout back.
"""
from __future__ import annotations

import numpy as np
import torch

BLOCK = 32
QTYPES = {"q4_0": 2, "q4_1": 3, "q8_0": 8}  # GGML type ids, as GGUF files store them
QTYPE_NAMES = {v: k for k, v in QTYPES.items()}
BLOCK_BYTES = {2: 18, 3: 20, 8: 34}


def qtype_id(qtype) -> int:
    """A GGML type id from a name ("q8_0"), an id (8) or a gguf GGMLQuantizationType."""
    if isinstance(qtype, str):
        if qtype.lower() not in QTYPES:
            raise ValueError(f"quantized type must be one of {sorted(QTYPES)}, got {qtype!r}")
        return QTYPES[qtype.lower()]
    value = int(qtype)
    if value not in BLOCK_BYTES:
        raise ValueError(f"quantized type id must be one of {sorted(BLOCK_BYTES)} (Q4_0, Q4_1, Q8_0), got {qtype!r}")
    return value


def row_bytes(qtype, in_features: int) -> int:
    return in_features // BLOCK * BLOCK_BYTES[qtype_id(qtype)]


def check_blocks(blocks, qtype, shape, name: str = "weight", scales: bool = True) -> torch.Tensor:
    """The blocks of a [out, in] weight as a uint8 tensor [out, in / 32 * block_bytes], checked:
    type, size (a truncated tensor is refused), and with ``scales`` every fp16 scale finite.
    Raises ValueError/TypeError naming ``name``."""
    q = qtype_id(qtype)
    out, in_ = (int(s) for s in shape)
    if in_ <= 0 or in_ % BLOCK:
        raise ValueError(f"{name}: in_features must be a positive multiple of {BLOCK} for {QTYPE_NAMES[q]}, got {in_}")
    if isinstance(blocks, np.ndarray):
        blocks = torch.from_numpy(blocks)
    if not isinstance(blocks, torch.Tensor):
        raise TypeError(f"{name}: blocks must be a uint8 tensor, got {type(blocks).__name__}")
    if blocks.dtype != torch.uint8:
        raise TypeError(f"{name}: blocks must be uint8, got {blocks.dtype}")
    want = (out, row_bytes(q, in_))
    if blocks.numel() != want[0] * want[1]:
        raise ValueError(f"{name}: {QTYPE_NAMES[q]} blocks of a [{out}, {in_}] weight take {want[0] * want[1]} bytes, "
                         f"got {blocks.numel()} (truncated or another type?)")
    blocks = blocks.reshape(want)
    if scales and out:
        bad = ~torch.isfinite(_fp16_field(blocks, q, 0))
        if q == QTYPES["q4_1"]:
            bad |= ~torch.isfinite(_fp16_field(blocks, q, 2))
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"{name}: {QTYPE_NAMES[q]} block scales must be finite; row {row} has inf/NaN (corrupt file?)")
    return blocks


def _fp16_field(blocks: torch.Tensor, q: int, offset: int) -> torch.Tensor:
    """The fp16 at byte ``offset`` of every block: float32 [out, in / 32]."""
    b = blocks.reshape(blocks.shape[0], -1, BLOCK_BYTES[q])[..., offset:offset + 2].contiguous()
    return b.view(torch.float16).reshape(blocks.shape[0], -1).float()


def dequantize_ref(blocks: torch.Tensor, qtype, shape) -> torch.Tensor:
    """The format's reference: blocks [out, in/32*block_bytes] uint8 -> float32 [out, in] (plain torch)."""
    q = qtype_id(qtype)
    out, in_ = (int(s) for s in shape)
    blk = blocks.reshape(out, in_ // BLOCK, BLOCK_BYTES[q])
    d = _fp16_field(blocks, q, 0)[..., None]
    if q == QTYPES["q8_0"]:
        vals = blk[..., 2:].contiguous().view(torch.int8).float() * d
    else:
        nib = blk[..., 4:] if q == QTYPES["q4_1"] else blk[..., 2:]
        qs = torch.cat([nib & 0x0F, nib >> 4], dim=-1).float()
        vals = qs * d + _fp16_field(blocks, q, 2)[..., None] if q == QTYPES["q4_1"] else (qs - 8) * d
    return vals.reshape(out, in_)


PACK_ROWS = 8  # rows interleaved by the packed layout
_TAKE_CHUNK = 1024  # rows QuantWeight.__getitem__ takes and packs at a time (a multiple of PACK_ROWS)


def _header_bytes(q: int) -> int:
    return 4 if q == 3 else 2  # fp16 d (and Q4_1's fp16 m)


def pack_rows8(blocks: torch.Tensor, qtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Row-major blocks [out, row_bytes] uint8 (out a multiple of 8) -> the same bytes in the packed
    layout the CPU kernel reads fastest (csrc/core/quant_linear.h): per group of 8 rows and block,
    the 8 rows' d (and m), then their payloads in 4-byte pieces, piece c of rows 0..7 in turn.
    CPU tensors are packed by the C++ core (``pack_rows8_ref`` is the same in torch). ``out``: a
    contiguous tensor of the blocks' shape to write them to (e.g. some rows of a fused weight, so
    that no packed copy is made only to be copied again); returned."""
    q = qtype_id(qtype)
    if blocks.is_cpu and blocks.dim() == 2 and blocks.shape[0] % PACK_ROWS == 0:
        from mirror_rt import _C

        if out is None:
            out = torch.empty_like(blocks, memory_format=torch.contiguous_format)
        _C.pack_rows8(blocks.contiguous(), q, out)
        return out
    packed = pack_rows8_ref(blocks, q)
    return packed if out is None else out.copy_(packed)


def pack_rows8_ref(blocks: torch.Tensor, qtype) -> torch.Tensor:
    """``pack_rows8`` in plain torch (reshapes and transposes): the reference."""
    q = qtype_id(qtype)
    out, rb = blocks.shape
    if out % PACK_ROWS:
        raise ValueError(f"the packed layout needs a multiple of {PACK_ROWS} rows, got {out}")
    nbytes, h = BLOCK_BYTES[q], _header_bytes(q)
    b = blocks.reshape(out // PACK_ROWS, PACK_ROWS, rb // nbytes, nbytes).transpose(1, 2)  # [G, nb, 8, bytes]
    heads = [b[..., i:i + 2].reshape(*b.shape[:2], 2 * PACK_ROWS) for i in range(0, h, 2)]
    pay = b[..., h:].reshape(*b.shape[:3], -1, 4).transpose(2, 3).reshape(*b.shape[:2], -1)
    return torch.cat([*heads, pay], dim=-1).reshape(out, rb).contiguous()


def unpack_rows8(packed: torch.Tensor, qtype) -> torch.Tensor:
    """The inverse of ``pack_rows8``: packed [out, row_bytes] uint8 -> row-major blocks."""
    q = qtype_id(qtype)
    out, rb = packed.shape
    nbytes, h = BLOCK_BYTES[q], _header_bytes(q)
    rec = packed.reshape(out // PACK_ROWS, rb // nbytes, PACK_ROWS * nbytes)  # [G, nb, 8 * bytes]
    heads = [rec[..., 2 * PACK_ROWS * i:2 * PACK_ROWS * (i + 1)].reshape(*rec.shape[:2], PACK_ROWS, 2)
             for i in range(h // 2)]
    pay = rec[..., PACK_ROWS * h:].reshape(*rec.shape[:2], -1, PACK_ROWS, 4).transpose(2, 3)
    pay = pay.reshape(*rec.shape[:2], PACK_ROWS, -1)
    b = torch.cat([*heads, pay], dim=-1)  # [G, nb, 8, bytes]
    return b.transpose(1, 2).reshape(out, rb).contiguous()


def quantize_x_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., in] (in a multiple of 32) -> (q int8 [..., in], d float32 [..., in / 32]): the
    kernel's activation quantization, per 32-block d = max|x| / 127 and q = round(x / d) with
    halves away from zero (ggml's quantize_row_q8_0 rule; d is not rounded to fp16)."""
    xb = x.float().reshape(*x.shape[:-1], -1, BLOCK)
    d = xb.abs().amax(-1) / 127.0
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    v = xb * inv.unsqueeze(-1)
    q = v.trunc() + torch.where((v - v.trunc()).abs() >= 0.5, v.sign(), torch.zeros_like(v))
    return q.to(torch.int8).reshape(x.shape), d


def int8_grid_ref(x: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """x [..., in] as the kernel sees it: quantized (``quantize_x_ref``) and back, q * d in dtype."""
    q, d = quantize_x_ref(x)
    return (q.to(dtype).reshape(*x.shape[:-1], -1, BLOCK) * d.to(dtype).unsqueeze(-1)).reshape(x.shape)


def quant_linear_ref(x: torch.Tensor, blocks: torch.Tensor, qtype, shape, bias=None) -> torch.Tensor:
    """The C++ kernel's result in float64: ``int8_grid_ref(x)`` @ dequantize_ref(blocks)^T (+ bias)
    -> [..., out] float32. x [..., in]."""
    w = dequantize_ref(blocks, qtype, shape).double()
    y = int8_grid_ref(x, torch.float64) @ w.T
    if bias is not None:
        y = y + bias.double()
    return y.float()


class QuantWeight:
    """A [out, in] weight kept as GGUF blocks: what ``QuantLinear.weight`` returns. Enough of a
    tensor's face for the code that reads a head's weight (``shape``, ``dtype`` (the compute dtype,
    float32), ``device``, ``detach()``, row selection ``w[ids]``); ``ops.linear(x, w)`` multiplies.
    ``packed``: the blocks are in the 8-row interleaved layout (``pack_rows8``)."""

    __slots__ = ("blocks", "qtype", "shape", "packed")

    def __init__(self, blocks: torch.Tensor, qtype, shape, packed: bool = False):
        self.qtype = qtype_id(qtype)
        self.shape = torch.Size((int(shape[0]), int(shape[1])))
        self.blocks = blocks
        self.packed = bool(packed)

    def row_blocks(self) -> torch.Tensor:
        """The blocks in the row-major (GGUF) layout: uint8 [out, in/32*block_bytes]."""
        return unpack_rows8(self.blocks, self.qtype) if self.packed else self.blocks

    dtype = torch.float32

    @property
    def device(self) -> torch.device:
        return self.blocks.device

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()

    def dim(self) -> int:
        return 2

    def detach(self) -> "QuantWeight":
        return self

    def __getitem__(self, ids) -> "QuantWeight":
        """Rows ``ids`` (an int64 tensor or list), still quantized (a copy of their blocks; packed
        when this weight is and the rows are a multiple of 8)."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.blocks.device)
        if ids.dim() != 1:
            raise ValueError(f"QuantWeight selects rows with a 1-D id tensor, got shape {tuple(ids.shape)}")
        shape = (ids.numel(), self.shape[1])
        if not self.packed:
            return QuantWeight(self.blocks[ids], self.qtype, shape)
        if not self.blocks.is_cpu:
            return QuantWeight(self.row_blocks()[ids], self.qtype, shape)
        from mirror_rt import _C

        ids = ids.contiguous()
        out = torch.empty(ids.numel(), self.blocks.shape[1], dtype=torch.uint8)
        if ids.numel() % PACK_ROWS or not ids.numel():
            _C.take_rows(self.blocks, self.qtype, ids, out, True)  # without unpacking the whole table
            return QuantWeight(out, self.qtype, shape)
        # Taken and packed a chunk of rows at a time: a row-major copy of all of them (a reduced
        # vocabulary's head: megabytes) would exist only to be packed (peak memory).
        rows = torch.empty(min(ids.numel(), _TAKE_CHUNK), self.blocks.shape[1], dtype=torch.uint8)
        for start in range(0, ids.numel(), _TAKE_CHUNK):
            chunk = ids[start:start + _TAKE_CHUNK]
            taken = rows[:chunk.numel()]
            _C.take_rows(self.blocks, self.qtype, chunk, taken, True)
            pack_rows8(taken, self.qtype, out=out[start:start + chunk.numel()])
        return QuantWeight(out, self.qtype, shape, packed=True)

    def dequantize(self, ids=None) -> torch.Tensor:
        """float32 [out, in] (or the rows ``ids`` [n] int64 only)."""
        from mirror_rt import _C

        ids = None if ids is None else torch.as_tensor(ids, dtype=torch.long).reshape(-1).contiguous()
        if self.blocks.device.type != "cpu":
            full = dequantize_ref(self.row_blocks(), self.qtype, self.shape)
            return full if ids is None else full[ids.to(full.device)]
        n = self.shape[0] if ids is None else ids.numel()
        out = torch.empty(n, self.shape[1], dtype=torch.float32)
        _C.dequantize_rows(self.blocks, self.qtype, ids, out, _threads(), self.packed)
        return out

    def float(self) -> torch.Tensor:
        return self.dequantize()

    def __repr__(self) -> str:
        layout = ", packed" if self.packed else ""
        return f"QuantWeight({QTYPE_NAMES[self.qtype]}, shape={tuple(self.shape)}, {self.nbytes} bytes{layout})"


def _threads() -> int:
    return torch.get_num_threads()  # torch.set_num_threads does not reach our OpenMP pool


def quant_linear(x: torch.Tensor, weight: QuantWeight, bias=None) -> torch.Tensor:
    """y = x @ W^T (+ bias) for a QuantWeight W [out, in]: x [..., in] (any float dtype; computed in
    float32), bias [out] or None; returns [..., out] in x's dtype. CPU tensors take the C++ kernel
    (any number of rows: more than 8 go in chunks of 8, each row computed as if alone); others
    multiply by the dequantized weight."""
    if not isinstance(weight, QuantWeight):
        raise TypeError(f"weight must be a QuantWeight, got {type(weight).__name__}")
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"x must be [..., {in_f}] for a [{out_f}, {in_f}] weight, got shape {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (out_f,):
        raise ValueError(f"bias must be [{out_f}], got shape {tuple(bias.shape)}")
    if x.device.type != "cpu" or weight.device.type != "cpu":
        w = weight.dequantize().to(x.device, x.dtype)
        return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
    if x.numel() == 0:
        return x.new_empty(*x.shape[:-1], out_f)
    xf = x.detach().float().contiguous()
    b = None if bias is None else bias.detach().float().contiguous()
    if torch.compiler.is_compiling():
        y = torch.ops.mirror_rt.quant_linear(xf.reshape(-1, in_f), weight.blocks, weight.qtype, out_f, b,
                                             weight.packed)
    else:
        y = quant_linear_unchecked(xf, weight.blocks, weight.qtype, out_f, b, weight.packed)
    return y.reshape(*x.shape[:-1], out_f).to(x.dtype)


def quant_linear_unchecked(x: torch.Tensor, blocks: torch.Tensor, qtype: int, out_features: int, bias=None,
                           packed: bool = False):
    """The kernel by address, for callers that checked everything (QuantLinear at build time): x
    contiguous float32 CPU [..., in], blocks contiguous checked uint8 (``packed``: 8-row interleaved),
    bias contiguous float32 or None. Returns float32 [..., out_features]."""
    from mirror_rt import _C

    k = x.shape[-1]
    out = torch.empty(*x.shape[:-1], out_features, dtype=torch.float32)
    _C.quant_linear_ptr(x.data_ptr(), x.numel() // k, k, blocks.data_ptr(), out_features, qtype,
                        0 if bias is None else bias.data_ptr(), out.data_ptr(), _threads(), packed)
    return out


from mirror_rt.ops import quant_library  # noqa: E402,F401  (registers torch.ops.mirror_rt.quant_linear)
