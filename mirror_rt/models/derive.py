"""Models derived from another: random tiny configs (tests, examples) and truncated copies."""
from __future__ import annotations

import copy

import torch

from mirror_rt.models.config import ModelConfig
from mirror_rt.models.llama import LlamaModel


def random_model(seed: int = 0, **overrides) -> LlamaModel:
    """A tiny randomly initialised Llama-family model (fp32, CPU) for tests and examples."""
    fields = dict(arch="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=4,
                  num_heads=4, num_kv_heads=2, head_dim=8, max_position=8192, tie_embeddings=False)
    fields.update(overrides)
    torch.manual_seed(seed)
    model = LlamaModel(ModelConfig(**fields))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5 if p.dim() > 1 else 0.1).add_(1.0 if p.dim() == 1 else 0.0)
    return model.eval()


def truncated_copy(model: LlamaModel, num_layers: int) -> LlamaModel:
    """The first num_layers layers of `model` plus its final norm and LM head (shared weights):
    the stand-in draft until a trained one exists."""
    if not 1 <= num_layers <= model.num_layers:
        raise ValueError(f"num_layers must be in [1, {model.num_layers}], got {num_layers}")
    cfg = copy.copy(model.config)
    cfg.num_layers = num_layers
    with torch.device("meta"):
        draft = LlamaModel(cfg)
    draft.embed_tokens = model.embed_tokens
    draft.layers = torch.nn.ModuleList(list(model.layers)[:num_layers])
    draft.norm, draft.lm_head = model.norm, model.lm_head
    draft.inv_freq = model.inv_freq
    draft.name = f"truncated-copy({num_layers} of {model.num_layers} layers)"
    for attr in ("source", "tokenizer_tokens"):
        if hasattr(model, attr):
            setattr(draft, attr, getattr(model, attr))
    return draft.eval()


class ModelWrapper(torch.nn.Module):
    """Presents `inner`'s decoder-facing interface (config, caches, embed, run_layers, head);
    subclasses override one piece: tests make drafts slow or failing, benchmarks add oracles."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config, self.name = inner, inner.config, getattr(inner, "name", "model")

    num_layers = property(lambda self: self.inner.num_layers)
    device = property(lambda self: self.inner.device)
    dtype = property(lambda self: self.inner.dtype)

    def new_cache(self, *args, **kwargs):
        return self.inner.new_cache(*args, **kwargs)

    def embed(self, ids):
        return self.inner.embed(ids)

    def run_layers(self, hidden, start, end, cache, positions=None, tree_mask=None, tree_offset=0):
        return self.inner.run_layers(hidden, start, end, cache, positions, tree_mask, tree_offset)

    def head(self, hidden):
        return self.inner.head(hidden)

    def forward(self, ids, cache, positions=None, tree_mask=None, tree_offset=0):
        h = self.run_layers(self.embed(ids), 0, self.num_layers, cache, positions, tree_mask, tree_offset)
        return self.head(h)
