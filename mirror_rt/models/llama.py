"""Llama-family decoder in plain torch with a split forward and token-tree attention.

The forward is cut into named pieces so that Mirror-SD can stop at the early-exit layer:

    h = model.embed(ids)                                   # [B, T, H]
    h = model.run_layers(h, 0, l_e, cache, positions)      # prefix, writes KV of layers [0, l_e)
    exit_logits = model.head(h)                            # logit lens (or an adapter's output)
    h = model.run_layers(h, l_e, N, cache, positions)      # suffix, writes KV of layers [l_e, N)
    logits = model.head(h)                                 # [B, T, V] float32

New tokens' K/V go to cache slots ``length + tree_offset + i`` and are not committed; the
decoder commits. Attention: with ``tree_mask=None`` the new tokens form a causal chain after the
committed prefix (and after ``tree_offset`` earlier uncommitted chain slots); with a tree mask
[B, T, tree_offset + T] the new tokens are the last T nodes of a tree whose nodes occupy the
slots after the committed prefix (``mirror_rt.ops.tree_attention``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mirror_rt import ops
from mirror_rt.ops.library import linear_in_graph
from mirror_rt.models.config import ModelConfig
from mirror_rt.models import sliding_window
from mirror_rt.models.kv_cache import StaticKVCache
from mirror_rt.models.rope import apply_rope, inverse_frequencies, rope_cos_sin


class Linear(nn.Linear):
    """nn.Linear through ``ops.linear``: a few rows of fp32 CPU input at inference (decoding
    steps, verification, rollouts) take the C++ small-row kernel, the rest torch's GEMM. Under
    torch.compile the same choice goes through ``torch.ops.mirror_rt.small_linear``."""

    def forward(self, x):
        if torch.compiler.is_compiling():  # the custom op, which the graph can hold
            return linear_in_graph(x, self.weight, self.bias)
        return ops.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)  # as Hugging Face does, so bf16 results match


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, self.nh * self.hd, bias=cfg.qkv_bias)
        self.k_proj = Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.qkv_bias)
        self.v_proj = Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.nh * self.hd, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.hd, cfg.rms_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.hd, cfg.rms_eps) if cfg.qk_norm else None

    def project(self, x, cos, sin):
        """x [B, T, H] -> q [B, T, Hq, D], k, v [B, T, Hkv, D], with q/k norm and RoPE applied."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, k_buf, v_buf, plan):
        """x [B, T, H] -> [B, T, H]; writes the new K/V into k_buf/v_buf [B, S, Hkv, D] where the
        plan says (an ``_AttentionPlan`` eagerly, a ``StaticAttentionPlan`` in compiled code)."""
        B, T, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        plan.write(k_buf, v_buf, k, v)
        out = plan.attend(q, k_buf, v_buf)
        return self.o_proj(out.reshape(B, T, self.nh * self.hd))


class _AttentionPlan:
    """What every layer of one eager forward shares, built once per forward (not once per layer):
    the first cache slot written, and either the chain's causal mask or the tree's inputs. Slices
    by the cache's Python-int length, so attention reads only the valid prefix."""

    def __init__(self, cache: StaticKVCache, B: int, T: int, tree_offset: int, tree_mask, device,
                 window: int | None = None, positions=None):
        self.length, self.start, self.end = cache.length, cache.length + tree_offset, cache.length + tree_offset + T
        self.tree_mask = tree_mask
        self.causal_mask = self.seqlens = self.dense_mask = None
        self.lo = 0  # the first slot a chain's queries read
        self.row_exact = _row_exact(cache, window)
        if self.row_exact:
            # what each row sees: slots [0, prefix), then `nodes` new slots, as a chain or as the tree's
            # packed mask bits say (no bool mask to build)
            if tree_mask is None:
                self.row_keys = (self.start, T, None)
            else:  # check_forward took a bool [B, T, tree_offset + T] mask
                self.row_keys = (self.length, self.end - self.length, ops.cpu_ops().pack_tree_mask(tree_mask))
            return
        if tree_mask is not None:
            self.seqlens = torch.full((B,), cache.length, dtype=torch.int32, device=device)
            if window is not None and sliding_window.tree_may_cross(cache.length, tree_offset, T, window):
                self.dense_mask = sliding_window.tree_window_mask(cache.length, tree_offset, positions, tree_mask,
                                                                  window)
        elif window is not None:  # a sliding-window layer's chain
            self.lo, self.causal_mask = sliding_window.chain_window(self.start, T, window, device)
        elif T > 1:  # a single new token sees every earlier slot: no mask at all
            self.causal_mask = torch.ones(T, self.end, dtype=torch.bool, device=device).tril(self.start)

    def write(self, k_buf, v_buf, k, v):
        k_buf[:, self.start:self.end] = k
        v_buf[:, self.start:self.end] = v

    def attend(self, q, k_buf, v_buf):
        if self.row_exact:
            return ops.cpu_ops().row_attention_unchecked(q, k_buf, v_buf, *self.row_keys)
        if self.tree_mask is None:
            return _causal_attention(q, k_buf[:, self.lo:self.end], v_buf[:, self.lo:self.end], self.causal_mask)
        if self.dense_mask is not None:  # a sliding window cuts the tree's view of the prefix
            return _dense_attention(q, k_buf[:, :self.end], v_buf[:, :self.end], self.dense_mask)
        tree = slice(self.length, self.end)
        return ops.tree_attention(q, k_buf, v_buf, self.seqlens, k_buf[:, tree], v_buf[:, tree], self.tree_mask)


class StaticAttentionPlan:
    """The same for a static-shape forward: every slot index and mask comes from the cache's
    device length ``length_t`` [1] int64, so no shape or branch depends on it and nothing waits
    for the device. Attention reads the whole capacity S under a mask (stale slots masked out);
    a tree's nodes are gathered by index and go to ``torch.ops.mirror_rt.tree_attention``."""

    def __init__(self, length_t, B: int, T: int, tree_offset: int, tree_mask, capacity: int, device,
                 window: int | None = None, positions=None):
        self.slots = length_t + tree_offset + torch.arange(T, device=device)  # [T] slots written
        self.tree_mask = tree_mask
        self.dense_mask = None
        if tree_mask is None:
            self.causal_mask = sliding_window.static_chain_mask(self.slots, capacity, window)  # [T, S]
        elif window is not None:  # a sliding-window layer: no branch on the length, always dense
            self.dense_mask = sliding_window.static_tree_window_mask(length_t, tree_offset, positions, tree_mask,
                                                                     window, capacity)
        else:
            self.tree_slots = length_t + torch.arange(tree_offset + T, device=device)
            self.seqlens = length_t.to(torch.int32).expand(B)

    def write(self, k_buf, v_buf, k, v):
        k_buf.index_copy_(1, self.slots, k)
        v_buf.index_copy_(1, self.slots, v)

    def attend(self, q, k_buf, v_buf):
        if self.tree_mask is None:
            return _causal_attention(q, k_buf, v_buf, self.causal_mask)
        if self.dense_mask is not None:
            return _dense_attention(q, k_buf, v_buf, self.dense_mask)
        k_tree, v_tree = k_buf.index_select(1, self.tree_slots), v_buf.index_select(1, self.tree_slots)
        return torch.ops.mirror_rt.tree_attention(q, k_buf, v_buf, self.seqlens, k_tree, v_tree, self.tree_mask)


def _row_exact(cache: StaticKVCache, window) -> bool:
    """Whether an eager forward's attention runs row-exact (csrc/core/row_attention.h): float32 CPU
    caches, no sliding window, and the C++ build present. Then a token's hidden state is the same
    bits whether it was decoded alone, verified inside a window or tree, or fed in a prefill (a
    prompt, or a prompt and earlier output fed again, as the ``auto`` decoder's pieces do), and
    speculative decoding equals autoregressive decoding exactly whatever rounding the linears do."""
    k = cache.k[0] if cache.k else None
    return (k is not None and k.device.type == "cpu" and k.dtype == torch.float32 and window is None
            and k.is_contiguous() and ops.cpu_ops() is not None)


_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def _causal_attention(q, k, v, mask):
    """q [B, T, Hq, D] over k, v [B, S, Hkv, D] with mask [T, S] bool or None (SDPA, GQA)."""
    group = q.shape[2] // k.shape[2]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if group > 1 and _SDPA_HAS_GQA:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    else:
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2)


def _dense_attention(q, k, v, mask):
    """Tree attention through SDPA with a full mask [B, 1, T, S]; a query that may attend to
    nothing gets zeros, as ``ops.tree_attention`` gives."""
    return _causal_attention(q, k, v, mask).nan_to_num(0.0)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, k_buf, v_buf, plan):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, k_buf, v_buf, plan)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Llama / Mistral / Qwen2 / Qwen3 decoder. Parameter names follow Hugging Face's."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling),
                             persistent=False)
        self.name = cfg.arch

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def new_cache(self, max_len: int, batch: int = 1) -> StaticKVCache:
        """A KV cache for this model holding up to max_len tokens (capped by the model's context)."""
        if max_len > self.config.max_position:
            raise ValueError(f"max_len {max_len} exceeds the model's context of {self.config.max_position} tokens")
        c = self.config
        return StaticKVCache(c.num_layers, max_len, c.num_kv_heads, c.head_dim, self.dtype, self.device, batch)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] int64 -> hidden [B, T, H]."""
        return self.embed_tokens(ids)

    def check_forward(self, hidden, start: int, end: int, cache: StaticKVCache, tree_mask, tree_offset: int):
        """The checks every forward makes before it runs (eager or compiled): layer range, room
        in the cache, the tree mask's shape. Raises ValueError naming the problem."""
        if not 0 <= start <= end <= self.num_layers:
            raise ValueError(f"layer range [{start}, {end}) must lie within [0, {self.num_layers}]")
        B, T, _ = hidden.shape
        cache.ensure_room(tree_offset + T)
        if tree_mask is not None and tuple(tree_mask.shape) != (B, T, tree_offset + T):
            raise ValueError(f"tree_mask must be [B={B}, T={T}, {tree_offset + T}], got {tuple(tree_mask.shape)}")

    def run_layers(self, hidden, start: int, end: int, cache: StaticKVCache, positions=None,
                   tree_mask=None, tree_offset: int = 0):
        """Run layers [start, end) on hidden [B, T, H]; positions [B, T] default to the chain after
        the committed prefix and tree_offset; tree_mask [B, T, tree_offset + T] bool or None."""
        self.check_forward(hidden, start, end, cache, tree_mask, tree_offset)
        B, T, _ = hidden.shape
        if positions is None:
            base = cache.length + tree_offset
            positions = torch.arange(base, base + T, device=hidden.device).expand(B, T)
        cos, sin = rope_cos_sin(positions, self.inv_freq, hidden.dtype)
        plan = _AttentionPlan(cache, B, T, tree_offset, tree_mask, hidden.device)
        sliding = self._sliding_layers(start, end)
        if sliding:
            window_plan = _AttentionPlan(cache, B, T, tree_offset, tree_mask, hidden.device,
                                         self.config.sliding_window, positions)
        one_call = plan.row_exact and B == 1 and hidden.dtype == torch.float32  # csrc/core/decoder_layer.h
        if one_call:
            from mirror_rt.models.cpu_layer import layer_step  # here: it imports the fused layers, which import this

            hidden = hidden.contiguous().clone()  # updated in place; the caller's tensor stays as it was
            cos_rows, sin_rows = cos[0, :, 0].contiguous(), sin[0, :, 0].contiguous()
        for i in range(start, end):
            step = layer_step(self.layers[i], self.config) if one_call and i not in sliding else None
            if step is not None:
                step.run(hidden, cos_rows, sin_rows, cache.k[i], cache.v[i], plan)
            else:
                hidden = self.layers[i](hidden, cos, sin, cache.k[i], cache.v[i],
                                        window_plan if i in sliding else plan)
        return hidden

    def _sliding_layers(self, start: int, end: int) -> frozenset:
        """The layers in [start, end) that attend through the sliding window (Mistral, Qwen2/3)."""
        c = self.config
        return frozenset(i for i in c.sliding_layers if start <= i < end) if c.sliding_window else frozenset()

    def run_layers_static(self, hidden, start: int, end: int, k_bufs, v_bufs, length_t, positions=None,
                          tree_mask=None, tree_offset: int = 0):
        """``run_layers`` for torch.compile: the cache comes as its buffers k_bufs/v_bufs (lists of
        [B, S, Hkv, D], one per layer) and its device length length_t [1] int64; nothing reads a
        host value of the cache, so the graph's shapes depend only on (B, T, S, tree_offset).
        The caller has made ``check_forward``'s checks."""
        B, T, _ = hidden.shape
        plan = StaticAttentionPlan(length_t, B, T, tree_offset, tree_mask, k_bufs[0].shape[1], hidden.device)
        if positions is None:
            positions = plan.slots.expand(B, T)
        cos, sin = rope_cos_sin(positions, self.inv_freq, hidden.dtype)
        sliding = self._sliding_layers(start, end)
        if sliding:
            window_plan = StaticAttentionPlan(length_t, B, T, tree_offset, tree_mask, k_bufs[0].shape[1],
                                              hidden.device, self.config.sliding_window, positions)
        for i in range(start, end):
            hidden = self.layers[i](hidden, cos, sin, k_bufs[i], v_bufs[i], window_plan if i in sliding else plan)
        return hidden

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head: hidden [B, T, H] -> logits [B, T, V] float32."""
        return self.lm_head(self.norm(hidden)).float()

    @torch.inference_mode()
    def forward(self, ids, cache: StaticKVCache, positions=None, tree_mask=None, tree_offset: int = 0):
        """Full forward of new tokens ids [B, T]: logits [B, T, V] float32 (K/V written, not committed)."""
        h = self.run_layers(self.embed(ids), 0, self.num_layers, cache, positions, tree_mask, tree_offset)
        return self.head(h)
