"""Trained exit head for Mirror-SD's early exit (DESIGN.md §4): a small adapter at layer l_e.

    z      = rms_in(h)                          (learned-weight RMSNorm of the layer-l_e hidden)
    delta  = up(act(down(z)))                   (low rank r; act = silu or identity)
    logits = lm_head(norm(h / rms(h) + delta))  (the target's final norm weights, copied and
                                                 trainable; the target's LM head, frozen, shared)

``up`` starts at zero, so an untrained head *is* the logit lens. The file stores only the adapter
(fp16 safetensors, well under 1 MB at rank 256, width 576) and its config; ``load_exit_head``
binds it to a target and returns a callable usable as ``MirrorConfig.exit_head``:

    head = load_exit_head("exit_head.safetensors", target)
    MirrorDecoder(target, draft, MirrorConfig(exit_layer=head.exit_layer, exit_head=head))
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import nn

from mirror_rt import ops
from mirror_rt.models.llama import RMSNorm

FORMAT = "mirror_rt.exit_head/1"
ACTIVATIONS = ("silu", "linear")


class ExitAdapter(nn.Module):
    """The trainable part: hidden [..., H] -> normalised hidden [..., H] ready for the LM head."""

    def __init__(self, hidden_size: int, rank: int, eps: float, act: str = "silu"):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        self.hidden_size, self.rank, self.eps, self.act = hidden_size, rank, eps, act
        self.rms_in = RMSNorm(hidden_size, eps)
        self.down = nn.Linear(hidden_size, rank, bias=False)
        self.up = nn.Linear(rank, hidden_size, bias=False)
        self.norm = RMSNorm(hidden_size, eps)
        nn.init.normal_(self.down.weight, 0, hidden_size ** -0.5)
        nn.init.zeros_(self.up.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.down(self.rms_in(h))
        delta = self.up(F.silu(z) if self.act == "silu" else z)
        hf = h.float()
        unit = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.norm(unit.to(delta.dtype) + delta)


class ExitHead(nn.Module):
    """Adapter + the target's frozen LM head: callable hidden [B, T, H] -> logits [B, T, V] float32."""

    def __init__(self, adapter: ExitAdapter, lm_head: nn.Module, exit_layer: int):
        super().__init__()
        self.adapter, self.exit_layer = adapter, exit_layer
        self._lm_head = [lm_head]  # a list: the shared head is not a submodule (not saved, not trained)

    @property
    def lm_head(self):
        return self._lm_head[0]

    def normed(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, H] -> the LM head's input [B, T, H] (in the LM head's dtype), so a caller
        can multiply by a subset of the head's rows (Mirror-SD's reduced exit vocabulary)."""
        return self.adapter(hidden.to(self.adapter.down.weight.dtype)).to(self.lm_head.weight.dtype)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return ops.linear(self.normed(hidden), self.lm_head.weight).float()


def new_exit_head(target, exit_layer: int, rank: int = 256, act: str = "silu") -> ExitHead:
    """An untrained head for ``target`` at ``exit_layer`` (equal to the logit lens until trained)."""
    c = target.config
    if not 1 <= exit_layer <= c.num_layers - 1:
        raise ValueError(f"exit_layer must be in [1, {c.num_layers - 1}], got {exit_layer}")
    adapter = ExitAdapter(c.hidden_size, rank, c.rms_eps, act).to(target.device)
    with torch.no_grad():
        adapter.norm.weight.copy_(target.norm.weight.float())
    return ExitHead(adapter, target.lm_head, exit_layer)


def save_exit_head(head: ExitHead, path: str, metadata: dict | None = None, dtype=torch.float16):
    """Write the adapter (not the shared LM head) and its config as safetensors."""
    from safetensors.torch import save_file

    a = head.adapter
    meta = {"format": FORMAT, "exit_layer": head.exit_layer, "rank": a.rank, "hidden_size": a.hidden_size,
            "eps": a.eps, "act": a.act}
    meta.update(metadata or {})
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in a.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(state, path, metadata={"meta": json.dumps(meta)})


def read_exit_meta(path: str) -> dict:
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"exit head file {path!r} not found")
    try:
        with safe_open(path, "pt") as f:
            raw = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises several kinds
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    meta = json.loads(raw.get("meta", "{}"))
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a mirror_rt exit head (format {meta.get('format')!r})")
    return meta


def load_exit_head(path: str, target, dtype=torch.float32) -> ExitHead:
    """Load an exit head file and bind it to ``target`` (its LM head). Returns an ExitHead:
    callable hidden [1, T, H] -> logits [1, T, V] float32, with ``.exit_layer``."""
    from safetensors.torch import load_file

    meta = read_exit_meta(path)
    c = target.config
    if meta["hidden_size"] != c.hidden_size:
        raise ValueError(f"{path}: exit head is for hidden size {meta['hidden_size']}, target has {c.hidden_size}")
    if not 1 <= meta["exit_layer"] <= c.num_layers - 1:
        raise ValueError(f"{path}: exit layer {meta['exit_layer']} does not fit a {c.num_layers}-layer target")
    adapter = ExitAdapter(meta["hidden_size"], meta["rank"], meta["eps"], meta.get("act", "silu"))
    adapter.load_state_dict({k: v.to(dtype) for k, v in load_file(path).items()})
    adapter = adapter.to(device=target.device, dtype=dtype).eval()
    for p in adapter.parameters():
        p.requires_grad_(False)
    head = ExitHead(adapter, target.lm_head, meta["exit_layer"])
    head.meta = meta
    return head.eval()
