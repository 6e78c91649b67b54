"""Fused quantized projections: one kernel call where a decoder layer makes three (q, k, v) or two
(gate, up). The rows of the parts are stacked; each output row is computed as it was alone, so the
fused layer gives the same bits with fewer calls (each big enough to share among threads). The
loader and ``quantize_model`` fuse once, at load."""
from __future__ import annotations

import torch

from mirror_rt.models.llama import MLP, Attention
from mirror_rt.models.quant import QuantLinear
from mirror_rt.ops.quant import PACK_ROWS, row_bytes
from mirror_rt.models.rope import apply_rope

__all__ = ["Fused", "QuantAttention", "QuantMLP", "fuse_layers", "fused_slots"]

QKV = ("q_proj", "k_proj", "v_proj")  # QuantAttention's qkv_proj
GATE_UP = ("gate_proj", "up_proj")  # QuantMLP's gate_up_proj


class Fused(QuantLinear):
    """Rows of several same-input QuantLinears stacked: one call streams them all. ``parts`` names
    each part and its rows, in order (each output row is computed as it was alone, bit for bit)."""

    parts: tuple = ()

    @classmethod
    def stack(cls, named: list) -> "Fused":
        first = named[0][1]
        packed = all(m.packed for _, m in named)  # packed parts stack as they are (whole groups of 8 rows)
        blocks = _back_to_back([m.blocks for _, m in named]) if packed else None
        if blocks is None:
            blocks = torch.cat([m.blocks if packed else m.weight.row_blocks() for _, m in named])
        bias = None if first.bias is None else torch.cat([m.bias for _, m in named])
        fused = cls(blocks, first.qtype, (blocks.shape[0], first.in_features), bias, check_scales=False,
                    layout="packed" if packed else "auto")
        fused.parts = tuple((name, m.out_features) for name, m in named)
        return fused

    def unfused(self):
        """[(part name, QuantLinear)] with this module's rows (views of its blocks where the layout
        allows: row-major, or packed parts of whole 8-row groups)."""
        out, start = [], 0
        whole_groups = all(rows % PACK_ROWS == 0 for _, rows in self.parts)
        blocks = self.blocks if whole_groups or not self.packed else self.weight.row_blocks()
        layout = "packed" if self.packed and whole_groups else "rows"
        for name, rows in self.parts:
            bias = None if self.bias is None else self.bias[start:start + rows]
            out.append((name, QuantLinear(blocks[start:start + rows], self.qtype, (rows, self.in_features), bias,
                                          check_scales=False, layout=layout)))
            start += rows
        return out


def fused_slots(weights: dict) -> dict:
    """{weight name: its rows of a new uint8 buffer} for the parts ``fuse_layers`` stacks: each
    decoder layer's q/k/v and gate/up among ``weights`` ({"layers.0.self_attn.q_proj.weight":
    (qtype, (out, in)), ...}) of one type and width, each a multiple of 8 rows. A QuantLinear
    packed into its slot (``out=``) lies where the fused weight wants it: packing each part on its
    own and then concatenating them would make every such weight twice, and the freed copies stay
    with the process's allocator (peak memory)."""
    slots = {}
    layers = sorted({name.split(".")[1] for name in weights if name.startswith("layers.")})
    for layer in layers:
        for parent, parts in (("self_attn", QKV), ("mlp", GATE_UP)):
            names = [f"layers.{layer}.{parent}.{part}.weight" for part in parts]
            if not all(n in weights for n in names):
                continue
            qtypes, shapes = zip(*(weights[n] for n in names))
            if len(set(qtypes)) != 1 or len({s[1] for s in shapes}) != 1 or any(s[0] % PACK_ROWS for s in shapes):
                continue
            rows = [int(s[0]) for s in shapes]
            buffer = torch.empty(sum(rows), row_bytes(qtypes[0], shapes[0][1]), dtype=torch.uint8)
            slots.update(zip(names, buffer.split(rows)))
    return slots


def _back_to_back(parts: list):
    """The buffer whose rows are exactly ``parts``, in order (``fused_slots`` lays them out so), or
    None. Stacking them is then that buffer, without a copy."""
    base = parts[0]._base
    at = parts[0].data_ptr()
    for part in parts:
        if base is None or part._base is not base or not part.is_contiguous() or part.data_ptr() != at:
            return None
        at += part.numel() * part.element_size()
    whole = base.is_contiguous() and base.data_ptr() == parts[0].data_ptr()
    return base if whole and at == base.data_ptr() + base.numel() * base.element_size() else None


def _fusable(*mods) -> bool:
    return all(isinstance(m, QuantLinear) and not isinstance(m, Fused) for m in mods) and \
        len({(m.qtype, m.in_features, m.bias is None) for m in mods}) == 1


def fuse_layers(layers, replaced=None) -> int:
    """In each decoder layer whose q/k/v (and gate/up) projections are QuantLinears of one type,
    make one call of them: the attention and MLP become QuantAttention / QuantMLP (same results,
    bit for bit; fewer calls, and each call big enough to share among threads). Returns how many
    layers changed. Done once at load: nothing is decided per call. ``replaced``, if given, is
    called after each layer with the block tensors the fused copies replaced (the loader gives
    their file pages back)."""
    changed = 0
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        old = []
        if type(attn) is Attention and _fusable(attn.q_proj, attn.k_proj, attn.v_proj):
            layer.self_attn = QuantAttention.from_attention(attn)
            old += [attn.q_proj.blocks, attn.k_proj.blocks, attn.v_proj.blocks]
            changed += 1
        if type(mlp) is MLP and _fusable(mlp.gate_proj, mlp.up_proj):
            layer.mlp = QuantMLP.from_mlp(mlp)
            old += [mlp.gate_proj.blocks, mlp.up_proj.blocks]
        if replaced is not None and old:
            replaced(old)
    return changed


def _rebuilt(module, cls, drop: tuple, name: str, fused: Fused):
    """A copy of ``module`` as ``cls`` (its other attributes and submodules kept) with the modules
    ``drop`` replaced by ``name`` = fused."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    for key in ("_modules", "_parameters", "_buffers"):
        new.__dict__[key] = dict(module.__dict__[key])
    for d in drop:
        del new._modules[d]
    new._modules[name] = fused
    return new


class QuantAttention(Attention):
    """Attention whose q, k and v come from one QuantLinear call (``qkv_proj``)."""

    @classmethod
    def from_attention(cls, attn):
        fused = Fused.stack([(name, getattr(attn, name)) for name in QKV])
        return _rebuilt(attn, cls, QKV, "qkv_proj", fused)

    def project(self, x, cos, sin):
        """As Attention.project: x [B, T, H] -> q [B, T, Hq, D], k, v [B, T, Hkv, D]."""
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split([self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], dim=-1)
        q = q.reshape(B, T, self.nh, self.hd)
        k, v = k.reshape(B, T, self.nkv, self.hd), v.reshape(B, T, self.nkv, self.hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class QuantMLP(MLP):
    """The MLP with gate and up from one QuantLinear call (``gate_up_proj``)."""

    @classmethod
    def from_mlp(cls, mlp):
        fused = Fused.stack([(name, getattr(mlp, name)) for name in GATE_UP])
        return _rebuilt(mlp, cls, GATE_UP, "gate_up_proj", fused)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(torch.nn.functional.silu(gate) * up)
