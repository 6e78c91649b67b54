"""Speculative Streaming draft (DESIGN.md §2; arXiv 2402.11131), small and distilled from a target.

The draft reuses the target's token embedding, final norm and LM head (frozen, shared, never
saved) and adds ``num_layers`` decoder layers of its own. Its main stream is a plain
``LlamaModel`` forward, so every decoder can use it as an ordinary draft (``run_layers``,
``head``, ``embed``, ``new_cache``, ``__call__``). On top of that, the top ``stream_layers``
layers run *multi-stream attention* (MSA) for ``n_streams`` extra streams per anchor token:

* stream j of the token at position p starts as the main hidden state entering layer
  ``num_layers - stream_layers`` plus a learned stream embedding ``P_j``, sits at rotary
  position p + j, attends to the main-stream prefix up to p (keys/values of the main stream at
  the same layer, read from the KV cache) and to streams 1..j of its own token;
* stream j predicts token p + j + 1 through the shared final norm + LM head;
* stream keys/values are never written to the cache: ``stream_logits`` reads the cache only.

Self-verification (``propose_streams``): each pass feeds the pending token plus the previous
pass's stream guesses as one chain, accepts guesses while they equal the main stream's own
choice, emits those plus the main stream's next token, and draws new guesses from the streams
of the last accepted token. The emitted tokens are exactly what the draft's autoregressive
decoding would emit (greedy; with a sampler, the same draws in the same order), in fewer passes.

Optional reduced draft vocabulary (EAGLE-3 style): ``vocab_ids`` [Vd] target ids. The head then
multiplies by Vd rows of the LM head only and scatters into a full-vocabulary logit row filled
with a large finite negative (``check_finite``-safe), so decoders see target-vocabulary logits.

Quantized: with a quantized target (``load_model`` keeping a GGUF's blocks) the draft's own
linears run Q8_0 (``quantize_draft``; ``load_streaming_draft`` does it) and the reduced head takes
the target's quantized head rows; ``save_streaming_draft(quant="q8_0"|"q4_0")`` exports blocks.

Training forward: ``ss_forward`` (main logits + stream logits over whole sequences); the loss is
in ``mirror_rt.train.train_draft``. Weights: only what the draft adds (``added_state_dict``),
saved/loaded by ``save_streaming_draft`` / ``load_streaming_draft`` (fp16 safetensors, sharded
below a size cap).
"""
from __future__ import annotations

import copy
import glob
import json
import os

import torch
import torch.nn.functional as F
from torch import nn

from mirror_rt import ops
from mirror_rt.models.config import ModelConfig
from mirror_rt.models.file_pages import FilePages
from mirror_rt.models.llama import DecoderLayer, LlamaModel
from mirror_rt.models.meta_device import meta_device, to_empty
from mirror_rt.models.quant import QuantLinear, _quantizable, dequantize, is_quantized, quantize, quantize_layers
from mirror_rt.models.quant_fused import Fused, fuse_layers, fused_slots
from mirror_rt.ops.quant import QTYPE_NAMES, QuantWeight
from mirror_rt.models.rope import rope_cos_sin

NEG = -1e9  # logits outside the draft vocabulary: finite, so check_finite passes; softmax gives 0


class StreamingDraft(LlamaModel):
    """A Llama-style draft with its own layers, the target's embedding/norm/head, and MSA streams."""

    def __init__(self, cfg: ModelConfig, n_streams: int = 3, stream_layers: int = 1, vocab_ids=None):
        if n_streams < 0:
            raise ValueError(f"n_streams must be >= 0, got {n_streams}")
        if not 0 <= stream_layers <= cfg.num_layers or (n_streams > 0 and stream_layers == 0):
            raise ValueError(f"stream_layers must be in [1, {cfg.num_layers}] when n_streams > 0, got {stream_layers}")
        super().__init__(cfg)
        self.n_streams, self.stream_layers = n_streams, stream_layers if n_streams else 0
        self.stream_embed = nn.Parameter(torch.zeros(n_streams, cfg.hidden_size))
        self.register_buffer("vocab_ids", None if vocab_ids is None else torch.as_tensor(vocab_ids, dtype=torch.long))
        self.register_buffer("sub_head", None, persistent=False)
        self.name = f"ss-draft({cfg.num_layers} layers, {n_streams} streams)"

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_target(cls, target: LlamaModel, num_layers: int = 2, n_streams: int = 3, stream_layers: int = 1,
                    intermediate_size: int | None = None, vocab_ids=None, init: str = "first", seed: int = 0):
        """A new draft sharing ``target``'s embedding, final norm and LM head (frozen).

        init: "first" copies target layers 0..num_layers-1 (needs the same intermediate size),
        "spread" copies layers spread evenly over the target's depth, "random" initialises fresh."""
        cfg = copy.copy(target.config)
        cfg.num_layers = num_layers
        if intermediate_size:
            cfg.intermediate_size = intermediate_size
        with torch.device("meta"):
            draft = cls(cfg, n_streams, stream_layers)
        draft.to_empty(device=target.device)
        draft.to(target.dtype)
        torch.manual_seed(seed)
        with torch.no_grad():
            draft.stream_embed.normal_(0, 0.02 * float(target.embed_tokens.weight.float().std()) * 10)
            if init in ("first", "spread") and cfg.intermediate_size == target.config.intermediate_size:
                n = target.num_layers
                src = list(range(num_layers)) if init == "first" else \
                    [round(i * (n - 1) / max(num_layers - 1, 1)) for i in range(num_layers)]
                for dst, s in zip(draft.layers, src):
                    dst.load_state_dict(_float_state(target.layers[s]))
            else:
                for layer in draft.layers:
                    for name, p in layer.named_parameters():
                        if p.dim() == 1:
                            p.fill_(1.0)
                        else:
                            nn.init.normal_(p, 0, 0.02)
        draft.attach(target, vocab_ids)
        return draft

    def attach(self, target: LlamaModel, vocab_ids=None):
        """Share the target's embedding, final norm, LM head and rotary table (all frozen)."""
        self.embed_tokens, self.norm, self.lm_head = target.embed_tokens, target.norm, target.lm_head
        self.inv_freq = target.inv_freq
        for p in (*self.embed_tokens.parameters(), *self.norm.parameters(), *self.lm_head.parameters()):
            p.requires_grad_(False)
        for attr in ("source", "tokenizer_tokens"):
            if hasattr(target, attr):
                setattr(self, attr, getattr(target, attr))
        if vocab_ids is not None:
            self.vocab_ids = torch.as_tensor(vocab_ids, dtype=torch.long, device=self.device)
        self.refresh_head()
        return self

    def refresh_head(self):
        """Rebuild the reduced LM head (after attach or a device/dtype move)."""
        self._context_ids = None
        self.sub_head = self._quant_sub_head = None
        if self.vocab_ids is not None and not isinstance(self.lm_head.weight, QuantWeight):
            self.sub_head = self.lm_head.weight.detach()[self.vocab_ids.to(self.lm_head.weight.device)].clone()

    def added_state_dict(self) -> dict:
        """Only what the draft adds to the target: its layers, stream embeddings, vocabulary map."""
        out = {k: v for k, v in self.state_dict().items()
               if k.startswith("layers.") or k == "stream_embed"}
        if self.vocab_ids is not None:
            out["vocab_ids"] = self.vocab_ids
        return out

    @property
    def draft_vocab_size(self) -> int:
        return self.config.vocab_size if self.vocab_ids is None else int(self.vocab_ids.numel())

    # --- heads ----------------------------------------------------------------------------------

    def active_ids(self):
        """The draft vocabulary now in use: vocab_ids plus any context tokens (None: full vocabulary)."""
        return self.vocab_ids if getattr(self, "_context_ids", None) is None else self._context_ids

    def set_context_tokens(self, ids=None):
        """Add ``ids`` (e.g. the prompt: two thirds of a chat answer's tokens appear in its prompt)
        to the reduced draft vocabulary until the next call; ``None`` restores the trained set.
        Decoders call it once per generation, before the draft's prefill. No-op without vocab_ids."""
        if self.vocab_ids is None:
            return
        self._context_ids = None if ids is None else self.context_vocab(ids)
        if self._context_ids is not None and self._context_ids.numel() == self.vocab_ids.numel():
            self._context_ids = None  # nothing added: the trained set (and its cached head) serves
        self.sub_head = self._quant_sub_head = None

    def context_vocab(self, ids):
        """The draft vocabulary set_context_tokens(ids) would use, without setting it: int64 [Vd']
        target ids (vocab_ids, then the new ones in ``ids`` sorted), or None for a full vocabulary."""
        if self.vocab_ids is None:
            return None
        base = self.vocab_ids.tolist()
        extra = sorted(set(int(i) for i in ids) - set(base))
        return torch.tensor(base + extra, dtype=torch.long, device=self.vocab_ids.device)

    def head_draft(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + (reduced) LM head: [..., H] -> [..., Vd] logits in the draft vocabulary."""
        h = self.norm(hidden)
        ids = self.active_ids()
        if ids is None:
            return self.lm_head(h)
        head = self.lm_head.weight
        if isinstance(head, QuantWeight):  # the target's quantized head: its rows, still quantized
            sub = getattr(self, "_quant_sub_head", None)
            if sub is None or sub.shape[0] != ids.numel():
                sub = self._quant_sub_head = head[ids.to(head.device)]
            return ops.linear(h, sub)
        if self.sub_head is None or self.sub_head.device != h.device or self.sub_head.dtype != h.dtype \
                or self.sub_head.shape[0] != ids.numel():
            with torch.inference_mode(False):  # a normal tensor: training may reuse it
                self.sub_head = self.lm_head.weight.detach()[ids.to(h.device)].to(h.dtype).clone()
        return ops.linear(h, self.sub_head)  # the small-row kernel at inference on a CPU

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, H] -> logits [B, T, V] float32 in the target's vocabulary."""
        logits = self.head_draft(hidden).float()
        ids = self.active_ids()
        if ids is None:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.config.vocab_size), NEG)
        full[..., ids.to(full.device)] = logits
        return full

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        ids = self.active_ids()
        return draft_ids if ids is None else ids.to(draft_ids.device)[draft_ids]

    # --- multi-stream attention -----------------------------------------------------------------

    @property
    def split_layer(self) -> int:
        """First MSA layer: streams start from the main hidden state entering it."""
        return self.num_layers - self.stream_layers

    def stream_hidden(self, split_h, positions, cache, key_len: int, key_mask=None):
        """Final hidden states of the streams of A anchors.

        split_h   [B, A, H]  main hidden entering layer ``split_layer`` at each anchor
        positions [B, A]     rotary position of each anchor (stream j sits at position + j)
        cache     the KV cache whose slots [0, key_len) hold the main stream's keys/values
                  (at least of every MSA layer); read only, never written
        key_mask  [B, A, key_len] bool: which slots each anchor sees (None: all of them)
        returns   [B, A, n_streams, H]
        """
        B, A, H = split_h.shape
        n = self.n_streams
        x = (split_h[:, :, None, :] + self.stream_embed.to(split_h.dtype)).reshape(B, A * n, H)
        pos = (positions[:, :, None] + torch.arange(1, n + 1, device=positions.device)).reshape(B, A * n)
        cos, sin = rope_cos_sin(pos, self.inv_freq, x.dtype)
        # mask over [cache slots | streams]: anchor's visible slots, then its own streams 1..j
        if key_mask is None:
            key_mask = torch.ones(B, A, key_len, dtype=torch.bool, device=x.device)
        main = key_mask[:, :, None, :].expand(B, A, n, key_len).reshape(B, A * n, key_len)
        own = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        same = torch.eye(A, dtype=torch.bool, device=x.device)
        streams = (same[:, None, :, None] & own[None, :, None, :]).reshape(A * n, A * n)
        mask = torch.cat([main, streams[None].expand(B, -1, -1)], dim=-1)
        for layer_index in range(self.split_layer, self.num_layers):
            x = _msa_layer(self.layers[layer_index], x, cos, sin, cache.k[layer_index][:, :key_len],
                           cache.v[layer_index][:, :key_len], mask)
        return x.reshape(B, A, n, H)

    def ss_forward(self, ids: torch.Tensor, cache=None):
        """Training forward over whole sequences ids [B, T] (no committed prefix).
        Returns (main logits [B, T, Vd], stream logits [B, T, n_streams, Vd] or None), draft vocab."""
        B, T = ids.shape
        cache = cache if cache is not None else self.new_cache(T, batch=B)
        cache.rollback(0)
        h = self.run_layers(self.embed(ids), 0, self.split_layer, cache)
        top = self.run_layers(h, self.split_layer, self.num_layers, cache)
        main = self.head_draft(top)
        if not self.n_streams:
            return main, None
        positions = torch.arange(T, device=ids.device).expand(B, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()
        s = self.stream_hidden(h, positions, cache, T, causal[None].expand(B, T, T))
        return main, self.head_draft(s)

    # --- inference: self-verifying multi-token proposals ----------------------------------------

    @torch.inference_mode()
    def main_pass(self, ids: list[int], cache, offset: int = 0):
        """Feed ids as a chain at region offset ``offset``: (logits [T, V] float32, split hidden
        [1, T, H]). Writes the main stream's KV to region slots offset.. (uncommitted)."""
        x = torch.tensor([ids], device=self.device)
        h = self.run_layers(self.embed(x), 0, self.split_layer, cache, tree_offset=offset)
        top = self.run_layers(h, self.split_layer, self.num_layers, cache, tree_offset=offset)
        return self.head(top)[0], h

    @torch.inference_mode()
    def forward_split(self, ids: torch.Tensor, cache, positions=None, tree_mask=None, tree_offset: int = 0):
        """``__call__`` that also returns the hidden entering the MSA layers (for streams):
        ids [B, T] -> (logits [B, T, V] float32, split hidden [B, T, H]). Same cache semantics
        as ``run_layers`` (tree masks included), for tree rollouts."""
        h = self.run_layers(self.embed(ids), 0, self.split_layer, cache, positions, tree_mask, tree_offset)
        top = self.run_layers(h, self.split_layer, self.num_layers, cache, positions, tree_mask, tree_offset)
        return self.head(top), h

    @torch.inference_mode()
    def stream_guesses_at(self, split_h, positions, cache, key_len: int, key_mask=None) -> list[list[int]]:
        """Greedy stream tokens for A anchors at once (e.g. one per tree branch):
        split_h [1, A, H] (rows of ``forward_split``'s split hidden), positions [1, A] their rotary
        positions, key_mask [1, A, key_len] which cache slots each anchor sees (committed prefix and
        its own ancestors in the region, itself included). Returns A lists of n_streams ids."""
        if not self.n_streams:
            return [[] for _ in range(split_h.shape[1])]
        s = self.stream_hidden(split_h, positions, cache, key_len, key_mask)
        return self.to_target_ids(self.head_draft(s)[0].argmax(-1)).tolist()

    @torch.inference_mode()
    def stream_guesses(self, split_row, cache, slot: int) -> list[int]:
        """Greedy stream tokens for the chain token at region slot ``slot`` (split_row [1, 1, H]):
        guesses for the n_streams tokens after the main stream's next token."""
        if not self.n_streams:
            return []
        pos = cache.length + slot
        s = self.stream_hidden(split_row, torch.tensor([[pos]], device=self.device), cache, pos + 1)
        return self.to_target_ids(self.head_draft(s)[0, 0].argmax(-1)).tolist()

    @torch.inference_mode()
    def propose_streams(self, cache, first: int, n: int, offset: int = 0, pick=None, guesses=None,
                        keep_guesses: bool = False, stop=None):
        """n draft tokens after ``first`` (a token not yet in the cache), fed at region offset
        ``offset``; equal to n autoregressive draft steps (``MirrorDraft.fresh_window``):

        * returns (tokens list[int] of n, qs list of n q rows (None when greedy), info dict with
          ``passes`` (forwards of the main stream), ``guesses`` (stream guesses for the tokens
          after tokens[-1], to seed a following call; computed only with keep_guesses=True),
          ``proposed``/``accepted`` stream-guess counts);
        * leaves the main-stream KV of ``first, tokens[:n-1]`` in region slots offset..offset+n-1,
          exactly where n chain forwards would; stream KV is never written;
        * pick: callable logits [V] -> (token, q or None), e.g. ``Sampler.pick``; default argmax.
          It is called once per emitted token, in order, as autoregressive decoding would.
        * stop: optional callable logits [V] -> bool, asked before each pick; True ends the window
          there (fewer than n tokens, ``info["stopped"]``; the KV of first and every token is in place).
        """
        pick = pick or (lambda logits: (int(logits.argmax()), None))
        tokens, qs, guesses = [], [], list(guesses or [])
        info = {"passes": 0, "proposed": 0, "accepted": 0}
        pending, off = first, offset
        while len(tokens) < n:
            feed = [pending] + guesses[: n - len(tokens) - 1]
            logits, split_h = self.main_pass(feed, cache, off)
            info["passes"] += 1
            info["proposed"] += len(feed) - 1
            a = 0
            for i in range(len(feed)):
                if stop is not None and stop(logits[i]):
                    info.update(accepted=info["accepted"] + a, stopped=True, guesses=[])
                    return tokens, qs, info
                tok, q = pick(logits[i])
                tokens.append(tok)
                qs.append(q)
                if i + 1 < len(feed) and feed[i + 1] == tok:
                    a += 1
                    continue
                break
            info["accepted"] += a
            pending = tokens[-1]
            more = len(tokens) < n or keep_guesses
            guesses = self.stream_guesses(split_h[:, a:a + 1], cache, off + a) if more else []
            off += a + 1
        info["guesses"] = guesses
        return tokens, qs, info


def _float_state(layer: nn.Module, prefix_all: str = "") -> dict:
    """A layer's state dict with quantized linears' blocks as float weights, fused ones under their
    parts' names (a draft copying layers of a quantized target starts from their values)."""
    state = {}
    for name, module in layer.named_modules():
        prefix = prefix_all + (f"{name}." if name else "")
        if isinstance(module, Fused):
            parent = prefix_all + (f"{name.rpartition('.')[0]}." if "." in name else "")
            for part_name, part in module.unfused():
                state.update(_float_state(part, f"{parent}{part_name}."))
        elif isinstance(module, QuantLinear):
            state[prefix + "weight"] = module.weight.dequantize()
            if module.bias is not None:
                state[prefix + "bias"] = module.bias.detach()
        elif not list(module.children()):
            state.update({prefix + k: v for k, v in module.state_dict().items()})
    return state


def quantize_draft(draft: StreamingDraft, qtype="q8_0") -> StreamingDraft:
    """The draft's own linears (its layers; the shared head is the target's) to ``qtype``, in place."""
    quantize_layers(draft.layers, qtype)
    fuse_layers(draft.layers)
    draft.refresh_head()
    return draft


def _msa_layer(layer: DecoderLayer, x, cos, sin, k_main, v_main, mask):
    """One decoder layer for stream tokens x [B, S, H]: queries attend to the main stream's cached
    keys/values k_main, v_main [B, K, Hkv, D] and to the streams' own keys (mask [B, S, K + S])."""
    attn = layer.self_attn
    B, S, _ = x.shape
    q, k, v = attn.project(layer.input_layernorm(x), cos, sin)
    keys = torch.cat([k_main.to(k.dtype), k], dim=1)
    values = torch.cat([v_main.to(v.dtype), v], dim=1)
    group = attn.nh // attn.nkv
    if group > 1:
        keys, values = keys.repeat_interleave(group, dim=2), values.repeat_interleave(group, dim=2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=mask[:, None])
    x = x + attn.o_proj(out.transpose(1, 2).reshape(B, S, attn.nh * attn.hd))
    return x + layer.mlp(layer.post_attention_layernorm(x))


# --- files ---------------------------------------------------------------------------------------

MAX_FILE_BYTES = 15 * 2 ** 20


def save_streaming_draft(draft: StreamingDraft, path: str, dtype=torch.float16, max_bytes: int = MAX_FILE_BYTES,
                         metadata: dict | None = None, quant: str | None = None) -> list[str]:
    """Write what the draft adds as safetensors, split into files below max_bytes:
    ``path`` (with the config in its metadata) then ``path`` with ``.1``, ``.2``, ... before
    the extension. Returns the files written. quant "q8_0" / "q4_0": the layers' linear weights
    as GGUF blocks (uint8; metadata ``quant`` names each one's type); already quantized linears
    are written as their blocks whatever ``quant`` says."""
    from safetensors.torch import save_file

    c = draft.config
    meta = {"format": "mirror_rt.streaming_draft/1", "num_layers": c.num_layers,
            "intermediate_size": c.intermediate_size, "n_streams": draft.n_streams,
            "stream_layers": draft.stream_layers, "vocab_size": c.vocab_size, "hidden_size": c.hidden_size}
    meta.update(metadata or {})
    state, qtypes = {}, {}
    for k, v in draft.added_state_dict().items():
        module = k.rpartition(".")[0]
        if k.endswith(".blocks"):  # a QuantLinear's blocks: saved as its weight (fused ones as their parts)
            layer = draft.get_submodule(module)
            parts = layer.unfused() if isinstance(layer, Fused) else [(module.rpartition(".")[2], layer)]
            for name, part in parts:
                key = f"{module.rpartition('.')[0]}.{name}.weight"
                state[key] = part.weight.row_blocks().detach().to("cpu").contiguous()  # the file's layout
                qtypes[key] = QTYPE_NAMES[part.qtype]
        elif quant and k.startswith("layers.") and k.endswith("proj.weight") and v.shape[-1] % 32 == 0:
            state[k] = quantize(v, quant)
            qtypes[k] = quant
        else:
            state[k] = v.detach().to("cpu").contiguous() if k == "vocab_ids" else v.detach().to("cpu", dtype).contiguous()
    if qtypes:
        meta["quant"] = qtypes
    if "vocab_ids" in state:
        state["vocab_ids"] = state["vocab_ids"].to(torch.int32)
    shards, cur, size = [], {}, 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if cur and size + nbytes > max_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += nbytes
    shards.append(cur)
    base, ext = os.path.splitext(path)
    files = [path] + [f"{base}.{i}{ext}" for i in range(1, len(shards))]
    for stale in glob.glob(f"{base}.[0-9]*{ext}"):
        if stale not in files:
            os.remove(stale)
    for i, (f, shard) in enumerate(zip(files, shards)):
        m = {"meta": json.dumps(meta), "shards": str(len(shards))} if i == 0 else {"shard": str(i)}
        save_file(shard, f, metadata=m)
    return files


def _read_shards(path: str, shards: int):
    """(name, tensor) of every tensor in a draft file and its shards, one tensor at a time."""
    from safetensors import safe_open

    base, ext = os.path.splitext(path)
    for i in range(shards):
        f = path if i == 0 else f"{base}.{i}{ext}"
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{path}: shard {f} is missing")
        with safe_open(f, "pt") as shard:
            pages = None
            for k in shard.keys():
                tensor = shard.get_tensor(k)  # a copy: the map's pages are not needed again
                pages = pages or FilePages(f)  # after the first read: the file is mapped by then
                pages.release()
                yield k, tensor


def _draft_linear(draft: StreamingDraft, key: str):
    """The module whose ``weight`` is ``key`` (None for a tensor that is no module's weight)."""
    parent, _, attr = key.rpartition(".")
    if attr != "weight" or not parent:
        return None
    try:
        return draft.get_submodule(parent)
    except AttributeError:
        return None


def load_streaming_draft(path: str, target: LlamaModel) -> StreamingDraft:
    """A StreamingDraft from ``save_streaming_draft`` files, attached to ``target`` (same
    device and dtype as the target)."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"streaming draft file {path!r} not found")
    with safe_open(path, "pt") as f:
        raw = f.metadata() or {}
    if "meta" not in raw:
        raise ValueError(f"{path}: not a mirror_rt streaming draft (no metadata)")
    meta, shards = json.loads(raw["meta"]), int(raw.get("shards", 1))
    if meta["hidden_size"] != target.config.hidden_size or meta["vocab_size"] != target.config.vocab_size:
        raise ValueError(f"{path}: draft was trained for hidden {meta['hidden_size']} / vocab {meta['vocab_size']}, "
                         f"target has {target.config.hidden_size} / {target.config.vocab_size}")
    cfg = copy.copy(target.config)
    cfg.num_layers, cfg.intermediate_size = meta["num_layers"], meta["intermediate_size"]
    with meta_device():  # shapes only: the weights are assigned below
        draft = StreamingDraft(cfg, meta["n_streams"], meta["stream_layers"] or 1)
    # On a quantized CPU target the draft's own linears run Q8_0: each float weight is quantized as
    # it is read, so the float copies of the whole draft never exist together (peak memory).
    keep = target.device.type == "cpu" and is_quantized(target)
    exported = meta.get("quant", {})
    # Each layer's q/k/v and gate/up are packed straight into the rows of one buffer, which
    # fuse_layers then takes without a copy (fused_slots).
    slots = fused_slots({f"{name}.weight": (exported.get(f"{name}.weight", "q8_0"), tuple(m.weight.shape))
                         for name, m in draft.layers.named_modules(prefix="layers") if _quantizable(m)}) if keep else {}
    state, kept, vocab_ids = {}, {}, None
    for k, tensor in _read_shards(path, shards):
        if k == "vocab_ids":
            vocab_ids = tensor
            continue
        linear = _draft_linear(draft, k)
        if k in exported:
            shape = tuple(linear.weight.shape)
            if keep:
                kept[k] = QuantLinear(tensor, exported[k], shape, out=slots.get(k))
            else:
                state[k] = dequantize(tensor, exported[k], shape)
        elif keep and k.startswith("layers.") and _quantizable(linear):
            kept[k] = QuantLinear(quantize(tensor, "q8_0"), "q8_0", tuple(tensor.shape), out=slots.get(k))
        else:
            state[k] = tensor
    for k in exported:
        if k not in kept and k not in state:
            raise ValueError(f"{path}: quantized tensor {k} is missing")
    for k, layer in kept.items():  # before to_empty: the float linears they replace are never made
        parent, _, attr = k.removesuffix(".weight").rpartition(".")
        setattr(draft.get_submodule(parent), attr, layer)
    to_empty(draft, target.device)
    missing, unexpected = draft.load_state_dict({k: v.to(target.dtype) for k, v in state.items()}, strict=False)
    kept_blocks = {k.removesuffix(".weight") + ".blocks" for k in kept}
    missing = [k for k in missing if (k.startswith("layers.") or k == "stream_embed") and k not in kept_blocks]
    if missing or unexpected:
        raise ValueError(f"{path}: missing {missing[:4]} / unexpected {unexpected[:4]} tensors")
    draft.to(target.dtype)
    if keep:
        fuse_layers(draft.layers)
    draft.attach(target, None if vocab_ids is None else vocab_ids.long())
    draft.name = meta.get("name", draft.name)
    return draft.eval()
