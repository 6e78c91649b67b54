"""Small shared helpers for the foundation tests: tiny random Hugging Face checkpoints, a tiny
GGUF writer, comparison messages that say where a mismatch is, and a loader for bench scripts."""
from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_bench_script(filename: str):
    """bench/<filename> as a module (bench/ is not a package). It is registered in sys.modules
    first, as dataclasses look their module up while the file executes; bench/ goes on sys.path
    for the scripts that import the harness."""
    bench = os.path.join(ROOT, "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    name = "bench_" + os.path.splitext(filename)[0]
    spec = importlib.util.spec_from_file_location(name, os.path.join(bench, filename))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod

HF_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}


def tiny_hf_config(arch: str, **overrides):
    """A tiny transformers config of `arch` (fp32, eager attention)."""
    import transformers

    fields = dict(vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    if arch == "qwen3":
        fields["head_dim"] = 8
    fields.update(overrides)
    cfg = getattr(transformers, HF_CLASSES[arch][0])(**fields)
    cfg._attn_implementation = "eager"
    return cfg


def random_hf_model(arch: str, seed: int = 0, **overrides):
    """A tiny transformers causal LM with weights large enough that mistakes show in the logits
    (the default init, std 0.02, makes every logit nearly 0)."""
    import transformers

    cfg = tiny_hf_config(arch, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, HF_CLASSES[arch][1])(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.3)
    return model.float().eval()


def save_hf_checkpoint(path, arch: str = "llama", seed: int = 0, max_shard_size=None, **overrides):
    """Save a tiny random HF model (safetensors) to `path`; returns the transformers model."""
    model = random_hf_model(arch, seed, **overrides)
    kwargs = {"safe_serialization": True}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(str(path), **kwargs)
    return model


@torch.no_grad()
def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Full-sequence logits [1, T, V] from a transformers model (no cache)."""
    return model(input_ids=ids, use_cache=False).logits.float()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str = ""):
    """Max-abs-diff check whose message names the worst index."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.float() - expected.float()).abs()
    worst = float(diff.max()) if diff.numel() else 0.0
    if not worst < atol:
        idx = np.unravel_index(int(diff.argmax()), tuple(diff.shape))
        raise AssertionError(f"{what}: max abs diff {worst:.3e} >= {atol:.0e} at index {tuple(int(i) for i in idx)}"
                             f" (actual {float(actual[idx]):.6f}, expected {float(expected[idx]):.6f})")


def permute_for_gguf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py `permute` for q/k rows (what our loader undoes)."""
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_tiny_gguf(path, state: dict, *, vocab_size: int, hidden: int, ffn: int, layers: int, heads: int,
                    kv_heads: int, eps: float = 1e-5, theta: float = 10000.0, context: int = 256,
                    tied: bool = False, permute: bool = True, skip=(), extra_meta=None):
    """Write a llama GGUF (F32) from an HF-named state dict (keys like ``model.layers.0...``).

    q/k weights are permuted as llama.cpp's converter does (unless permute=False); names in
    `skip` are left out (GGUF names, e.g. "llama.block_count" or "blk.0.attn_q.weight")."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    meta = {
        "llama.context_length": (w.add_uint32, context),
        "llama.embedding_length": (w.add_uint32, hidden),
        "llama.block_count": (w.add_uint32, layers),
        "llama.feed_forward_length": (w.add_uint32, ffn),
        "llama.attention.head_count": (w.add_uint32, heads),
        "llama.attention.head_count_kv": (w.add_uint32, kv_heads),
        "llama.attention.layer_norm_rms_epsilon": (w.add_float32, eps),
        "llama.rope.freq_base": (w.add_float32, theta),
        "llama.vocab_size": (w.add_uint32, vocab_size),
    }
    for key, (fn, value) in meta.items():
        if key not in skip:
            fn(key, value)
    for key, value in (extra_meta or {}).items():
        w.add_uint32(key, value)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"t{i}".encode() for i in range(vocab_size)])
    w.add_eos_token_id(2)
    layer_names = {
        "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    tensors = {}
    for name, t in state.items():
        name = name.removeprefix("model.")
        arr = t.detach().float().numpy().copy()
        if name == "embed_tokens.weight":
            g = "token_embd.weight"
        elif name == "norm.weight":
            g = "output_norm.weight"
        elif name == "lm_head.weight":
            if tied:
                continue
            g = "output.weight"
        else:
            _, i, rest = name.split(".", 2)
            g = f"blk.{i}.{layer_names[rest]}"
            if permute and rest == "self_attn.q_proj.weight":
                arr = permute_for_gguf(arr, heads)
            elif permute and rest == "self_attn.k_proj.weight":
                arr = permute_for_gguf(arr, kv_heads)
        tensors[g] = arr
    for g, arr in tensors.items():
        if g not in skip:
            w.add_tensor(g, np.ascontiguousarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
