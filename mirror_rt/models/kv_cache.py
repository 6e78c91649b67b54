"""Static KV cache with position-indexed writes and commit/rollback by length.

Slots [0, length) hold committed tokens. A forward writes its new tokens' keys/values into the
slots after them (``length + tree_offset + i``) without committing: the decoder then commits
a chain by ``commit(n)``, or the accepted path of a tree by ``commit_path(node_slots)``, a
gather of at most window+1 entries. Entries past ``length`` are stale and simply overwritten.
"""
from __future__ import annotations

import torch


class StaticKVCache:
    def __init__(self, num_layers: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype=torch.float32, device="cpu", batch: int = 1):
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        shape = (batch, max_len, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.length = 0  # committed tokens
        self.length_t = torch.zeros(1, dtype=torch.int64, device=device)

    @property
    def device(self) -> torch.device:
        return self.k[0].device if self.k else self.length_t.device

    def ensure_room(self, extra: int):
        if self.length + extra > self.max_len:
            raise ValueError(f"KV cache full: {self.length} committed + {extra} new tokens exceed "
                             f"its capacity of {self.max_len}; raise max_len or shorten the prompt/generation")

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """k, v [B, T, Hkv, D] into slots [start, start + T)."""
        end = start + k.shape[1]
        self.k[layer][:, start:end] = k
        self.v[layer][:, start:end] = v

    def commit(self, n: int):
        """Commit the n slots after the committed prefix (a chain, already in place)."""
        self.ensure_room(n)
        self.length += n
        if n:
            self.length_t.add_(n)

    def rollback(self, length: int):
        if not 0 <= length <= self.length:
            raise ValueError(f"rollback length must be in [0, {self.length}], got {length}")
        if length != self.length:
            self.length_t.fill_(length)
        self.length = length

    def gather_region(self, node_slots):
        """Move the uncommitted entries at ``length + node_slots[i]`` to ``length + i`` (in place,
        every layer). node_slots must be strictly increasing; offsets already in place are skipped.
        Used to turn a tree's chosen path into a chain without committing it."""
        node_slots = [int(s) for s in node_slots]
        if any(b <= a for a, b in zip(node_slots, node_slots[1:])) or (node_slots and node_slots[0] < 0):
            raise ValueError(f"node_slots must be non-negative and strictly increasing, got {node_slots}")
        self.ensure_room(node_slots[-1] + 1 if node_slots else 0)
        moves = [(self.length + s, self.length + i) for i, s in enumerate(node_slots) if s != i]
        if moves:
            src = torch.tensor([a for a, _ in moves], device=self.k[0].device)
            dst = torch.tensor([b for _, b in moves], device=self.k[0].device)
            for buf in self.k + self.v:
                buf[:, dst] = buf[:, src]  # the right side is gathered (copied) before the write

    def commit_path(self, node_slots):
        """Commit tree nodes stored at ``length + node_slots[i]`` (root-first) as a chain: a
        gather of at most len(node_slots) entries per layer, then commit."""
        self.gather_region(node_slots)
        self.commit(len(node_slots))
