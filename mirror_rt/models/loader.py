"""``load_model``: a Hugging Face checkpoint directory (config.json + safetensors) or a GGUF file.

Weights load without pickle (safetensors, GGUF). Corrupt or truncated files, missing tensors
and missing config keys raise ValueError naming the file and the problem.
"""
from __future__ import annotations

import glob
import json
import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from mirror_rt.models.config import ModelConfig
from mirror_rt.models.device_dtype import resolve_device, resolve_dtype
from mirror_rt.models.llama import LlamaModel
from mirror_rt.models.meta_device import meta_device
from mirror_rt.models.quant import KeptBlocks, install_blocks, quantize_model, quantize_q8_0
from mirror_rt.models.file_pages import FilePages
from mirror_rt.models.quant_fused import fuse_layers
from mirror_rt.ops.quant import QTYPES
from mirror_rt.models.rope import inverse_frequencies


def load_model(path, device=None, dtype=None, quant=None) -> LlamaModel:
    """Load a Llama-family model.

    path:   a Hugging Face checkpoint directory (config.json + *.safetensors, sharded or not),
            one ``.safetensors`` file with its config.json beside it, a ``.gguf`` file, or a
            loaded transformers model (LlamaForCausalLM,
            MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM), whose weight tensors the
            returned model shares (``from_hf``; device/dtype None keep its own).
    device: a torch device or its name (default cpu), checked before loading: one this torch
            cannot use raises ValueError naming the devices it has.
    dtype:  a torch float dtype or its name ("bfloat16"/"bf16", "float16"/"fp16", "float32";
            default float32 on CPU, bfloat16 elsewhere).
    quant:  None: a GGUF's Q4_0 / Q4_1 / Q8_0 weights stay in their blocks on the CPU (memory-mapped,
            computed by the quantized kernels; its other quantized types are converted to Q8_0 at
            load, float tensors stay float); elsewhere everything is dequantized (a warning says
            so). "dequantize": every weight in ``dtype``. "q8_0" / "q4_0" / "q4_1": quantize at
            load (the layers' linears to that type, embedding and LM head to Q8_0; CPU only).
            Norms and rotary tables stay float. ``mirror_rt.models.quant.weight_bytes(model)``
            counts the result.
    The returned model has ``.source`` (the checkpoint directory or file, for the tokenizer),
    ``.tokenizer_tokens`` (see ``tokenizer_tokens``; a GGUF's as ``TokenStrings``), ``.generation_config``
    (generation_config.json's contents or None, for its EOS: ``mirror_rt.generation.resolve_eos``) and
    is in eval mode.
    """
    if isinstance(path, torch.nn.Module):
        from mirror_rt.models.from_hf import from_hf

        model = from_hf(path, device=None if device is None else resolve_device(device),
                        dtype=None if dtype is None else resolve_dtype(dtype, torch.device("cpu")))
        _check_quant(quant, model.device, model.dtype, "")
        return quantize_model(model, quant) if quant not in (None, "dequantize") else model
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"load_model takes a checkpoint path or a loaded transformers model, "
                        f"got {type(path).__name__}")
    path = os.fspath(path)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    keep_blocks = _check_quant(quant, device, dtype, path)
    generation_config = None
    if os.path.isdir(path) or (os.path.isfile(path) and path.endswith(".safetensors")):
        folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        cfg, tensors = _read_hf_dir(folder, files=None if folder == path else [path])
        tokens = tokenizer_tokens(folder)
        generation_config = _generation_config(folder)
        path = folder  # the tokenizer lives in the folder
    elif os.path.isfile(path) and path.endswith(".gguf"):
        cfg, tensors, tokens = _read_gguf(path, keep_blocks=keep_blocks)
    else:
        raise ValueError(f"model path {path!r} is neither a checkpoint directory, a .safetensors file "
                         "nor a .gguf file")
    with meta_device():  # shapes only: the weights are assigned below
        model = LlamaModel(cfg)
    kept = {k: tensors.pop(k) for k in [k for k, v in tensors.items() if isinstance(v, KeptBlocks)]}
    install_blocks(model, kept, tensors, path, copied=FilePages(path).release if kept else None)
    _assign(model, tensors, path)
    model.source = path
    model.tokenizer_tokens = tokens
    model.generation_config = generation_config
    model = model.to(device=device, dtype=dtype).eval()
    c = model.config  # .to(dtype) cast the rotary buffer too: rebuild it in fp32
    model.inv_freq = inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling).to(device)
    if quant not in (None, "dequantize"):
        quantize_model(model, quant)
    elif kept:  # parts not packed back to back are copied: their file pages are given back
        fuse_layers(model.layers, replaced=FilePages(path).release)
    return model


QUANT_CHOICES = (None, "dequantize", "q8_0", "q4_0", "q4_1")


def _check_quant(quant, device, dtype, path) -> bool:
    """Validates ``quant``; True when a GGUF's blocks are to be kept as they are."""
    if quant not in QUANT_CHOICES:
        raise ValueError(f"quant must be one of {QUANT_CHOICES}, got {quant!r}")
    if quant not in (None, "dequantize") and (device.type != "cpu" or dtype != torch.float32):
        raise ValueError(f"quant={quant!r} runs on the CPU in float32; got device {device}, dtype {dtype} "
                         "(pass quant='dequantize' for a float model there)")
    if quant is None and str(path).endswith(".gguf") and (device.type != "cpu" or dtype != torch.float32):
        warnings.warn(f"{os.path.basename(str(path))}: quantized weights run on the CPU in float32; dequantizing "
                      f"them to {dtype} for {device}", stacklevel=3)
        return False
    return quant is None


def tokenizer_tokens(path) -> tuple | None:
    """Token strings by id (None for an id without one) from a checkpoint directory's
    tokenizer.json or a GGUF file's token list; None when there is neither. ``check_pair`` compares
    the draft's and the target's, so a same-sized but different vocabulary is refused."""
    path = os.fspath(path)
    if os.path.isdir(path):
        file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(file):
            return None
        with open(file, encoding="utf-8") as f:
            spec = json.load(f)
        vocab = spec.get("model", {}).get("vocab") or {}
        pairs = vocab.items() if isinstance(vocab, dict) else ((tok, i) for i, (tok, _) in enumerate(vocab))
        by_id = {int(i): tok for tok, i in pairs}
        by_id.update({int(t["id"]): t["content"] for t in spec.get("added_tokens", [])})
        return tuple(by_id.get(i) for i in range(max(by_id) + 1)) if by_id else None
    from mirror_rt.models.gguf_header import read_gguf_header

    tokens = read_gguf_header(path).metadata.get("tokenizer.ggml.tokens")
    return tuple(tokens) if tokens is not None else None


def _gguf_tokens(reader) -> "TokenStrings | None":
    field = reader.fields.get("tokenizer.ggml.tokens")
    return TokenStrings(field.contents()) if field is not None else None


class TokenStrings(Sequence):
    """Token strings by id, kept as one UTF-8 buffer and the end offset of each: a GGUF's 49k
    tokens as Python strings take ~4 MB for the whole run, for ``check_pair``, which reads them
    once if at all. Equal to the tuple (or list) of the same strings."""

    def __init__(self, tokens):
        encoded = [t.encode("utf-8") for t in tokens]
        self._data = b"".join(encoded)
        self._ends = np.cumsum([len(b) for b in encoded], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return tuple(self[j] for j in range(*i.indices(len(self))))
        i = range(len(self))[i]  # negative ids count from the end; IndexError past it
        start = int(self._ends[i - 1]) if i else 0
        return self._data[start:int(self._ends[i])].decode("utf-8")

    def __eq__(self, other):
        if isinstance(other, TokenStrings):
            return self._data == other._data and np.array_equal(self._ends, other._ends)
        return isinstance(other, (tuple, list)) and len(other) == len(self) and all(a == b for a, b in zip(self, other))

    __hash__ = None

    def __repr__(self) -> str:
        return f"TokenStrings({len(self)} tokens)"


def _assign(model: LlamaModel, tensors: dict, path: str):
    expected = dict(model.named_parameters())
    if model.config.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise ValueError(f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for name, param in expected.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(param.shape):
            raise ValueError(f"{path}: tensor {name} has shape {tuple(t.shape)}, config expects {tuple(param.shape)}")
    state = {k: tensors[k] for k in expected}
    model.load_state_dict(state, strict=False, assign=True)
    if model.config.tie_embeddings and isinstance(model.embed_tokens, torch.nn.Embedding):
        model.lm_head.weight = model.embed_tokens.weight
    c = model.config  # the rotary buffer was built on the meta device: rebuild it for real
    model.inv_freq = inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling)


# --- Hugging Face directory -------------------------------------------------------------------

def _generation_config(path) -> dict | None:
    """generation_config.json beside config.json (its eos_token_id may list more EOS ids)."""
    file = os.path.join(path, "generation_config.json")
    try:
        with open(file) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None  # optional: a missing or broken one leaves the config's EOS


def _read_hf_dir(path, files=None):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{path}: no config.json")
    try:
        with open(cfg_path) as f:
            cfg = ModelConfig.from_hf(json.load(f))
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    files = files or sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"{path}: no *.safetensors files (pickled .bin checkpoints are not loaded)")
    tensors = {}
    for file in files:
        try:  # load_file maps the file: tensors stay in the page cache until used (no copy)
            part = load_file(file)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ValueError(f"{file}: corrupt or truncated safetensors file ({e})") from None
        tensors.update({k.removeprefix("model."): v for k, v in part.items()})
    return cfg, tensors


# --- GGUF -----------------------------------------------------------------------------------

_GGUF_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def _gguf_field(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value


def gguf_config(reader, path) -> ModelConfig:
    arch = _gguf_field(reader, "general.architecture")
    if arch not in ("llama", "qwen2", "qwen3", "mistral"):
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported")

    def need(key):
        value = _gguf_field(reader, f"{arch}.{key}")
        if value is None:
            raise ValueError(f"{path}: GGUF metadata is missing {arch}.{key}")
        return value

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    names = {t.name for t in reader.tensors}
    vocab = _gguf_field(reader, f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    eos = _gguf_field(reader, "tokenizer.ggml.eos_token_id")
    return ModelConfig(
        arch=arch, vocab_size=int(vocab), hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")), num_layers=int(need("block_count")),
        num_heads=heads, num_kv_heads=int(_gguf_field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(_gguf_field(reader, f"{arch}.attention.key_length", hidden // heads)),
        rms_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(_gguf_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        max_position=int(_gguf_field(reader, f"{arch}.context_length", 4096)),
        tie_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names, qk_norm="blk.0.attn_q_norm.weight" in names,
        bos_token_id=_gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=[int(eos)] if eos is not None else [],
    )


def _unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp stores Llama q/k rows interleaved for its rotary layout; undo that."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# Types the quantized kernels take as they are (GGML ids).
_KEPT_TYPES = set(QTYPES.values())


def _read_gguf(path, keep_blocks=False):
    """(config, tensors, tokens). With keep_blocks, 2-D weights stored as Q4_0 / Q4_1 / Q8_0 come
    back as KeptBlocks viewing the file's memory map (q/k rows unpermuted: a copy of those),
    weights of other quantized types as KeptBlocks converted to Q8_0, float tensors as float32."""
    from mirror_rt.models.gguf_header import GGUFFile

    try:  # GGUFReader's fields and tensors without its per-item parsing; views of a copy-on-write map
        reader = GGUFFile(path)
    except Exception as e:  # the reader raises assorted errors on bad files
        raise ValueError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from None
    cfg = gguf_config(reader, path)
    tensors = {}
    for t in tqdm(reader.tensors, desc=f"loading {os.path.basename(path)}", unit="tensor", leave=False,
                  disable=None):
        if t.name in _GGUF_NAMES:
            name = _GGUF_NAMES[t.name]
        else:
            parts = t.name.split(".")  # blk.{i}.{kind}.{weight|bias}
            if parts[0] != "blk" or parts[2] not in _GGUF_LAYER_NAMES:
                continue
            name = f"layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{parts[3]}"
        shape = tuple(int(d) for d in reversed(t.shape))
        kind = int(t.tensor_type)
        keep = keep_blocks and len(shape) == 2 and name.endswith(".weight") and not name.endswith("norm.weight")
        if keep and kind in _KEPT_TYPES:
            arr = np.asarray(t.data)  # uint8 [out, in/32*block_bytes] in the map
            if arr.ndim != 2 or arr.shape[0] != shape[0]:
                raise ValueError(f"{path}: tensor {t.name} holds {arr.shape} bytes for shape {shape} (corrupt file?)")
            # q/k rows are reordered as each weight is installed (a copy only while it is packed)
            tensors[name] = KeptBlocks(torch.from_numpy(arr), kind, shape, _rope_rows(cfg, name, shape, path))
            continue
        try:
            arr = np.asarray(_dequantized(t), dtype=np.float32).reshape(shape)
        except ValueError as e:
            raise ValueError(f"{path}: tensor {t.name} cannot be read ({e})") from None
        arr = _unpermuted(cfg, name, arr, shape, path)
        if keep and kind not in (0, 1, 30) and shape[1] % 32 == 0:  # other quantized types (not F32/F16/BF16)
            tensors[name] = KeptBlocks(quantize_q8_0(torch.from_numpy(arr)), "q8_0", shape)
            continue
        tensors[name] = torch.from_numpy(arr.copy())  # own, writable memory
    return cfg, tensors, _gguf_tokens(reader)


def _dequantized(t):
    """A GGUF tensor's values as floats: float types as they are, the others through gguf."""
    if t.data.dtype != np.uint8:  # F32 / F16 / F64: already a typed view
        return t.data
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize

    return dequantize(t.data, GGMLQuantizationType(t.tensor_type))


def _rope_rows(cfg, name, shape, path):
    """For a Llama q/k weight or bias: the row order (int64 [rows]) that undoes llama.cpp's rotary
    layout (a row permutation, so it applies to rows of blocks as well); None for other tensors."""
    if cfg.arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
        heads = cfg.num_heads if ".q_proj." in name else cfg.num_kv_heads
        if shape[0] != heads * cfg.head_dim:  # checked here: the unpermute reshape needs it
            raise ValueError(f"{path}: tensor {name} has shape {shape}, config expects "
                             f"{heads * cfg.head_dim} rows ({heads} heads x head_dim {cfg.head_dim})")
        return _unpermute_rope(np.arange(shape[0]), heads)
    return None


def _unpermuted(cfg, name, arr, shape, path):
    """arr with llama.cpp's rotary row order undone for a Llama q/k weight or bias (a copy);
    other tensors as they are."""
    rows = _rope_rows(cfg, name, shape, path)
    return arr if rows is None else arr[rows]
