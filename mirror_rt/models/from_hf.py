"""A loaded transformers model in: our ``LlamaModel`` on the same weight storage (no copy).

    hf = AutoModelForCausalLM.from_pretrained(path)   # the program's existing model
    model = mirror_rt.load_model(hf)                  # or mirror_rt.from_hf(hf): shares hf's weights

Both models then read the same tensors: fine-tuning or editing ``hf``'s weights in place shows
in ours. ``check_model`` is the decoders' guard against being handed the transformers model.
"""
from __future__ import annotations

import torch
from torch import nn

from mirror_rt.models.config import ARCHITECTURES, ModelConfig
from mirror_rt.models.llama import LlamaModel
from mirror_rt.models.rope import inverse_frequencies

SUPPORTED_CLASSES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def is_transformers_model(obj) -> bool:
    """True for a transformers ``PreTrainedModel`` (without importing transformers)."""
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers")
               for c in type(obj).__mro__)


def check_model(model, role: str = "model"):
    """Raise TypeError unless ``model`` is one of ours (a decoder's target or draft)."""
    if is_transformers_model(model):
        raise TypeError(f"{role} is a transformers {type(model).__name__}; the decoders take mirror_rt models: "
                        f"wrap it with mirror_rt.load_model({role}) (it shares the weights, no copy)")
    if not all(hasattr(model, a) for a in ("new_cache", "config")):
        raise TypeError(f"{role} must be a mirror_rt model (from mirror_rt.load_model), got {type(model).__name__}")


def from_hf(hf_model, device=None, dtype=None) -> LlamaModel:
    """Our model on a loaded transformers causal LM's own weight tensors.

    hf_model: a LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM or Qwen3ForCausalLM,
    all of its weights on one device. device / dtype: None keeps the model's (shared storage);
    another device or dtype makes a converted copy, as ``tensor.to`` does.
    """
    name = type(hf_model).__name__
    cfg_dict = hf_model.config.to_dict() if hasattr(hf_model, "config") else {}
    if (cfg_dict.get("model_type") not in ARCHITECTURES or not hasattr(hf_model, "lm_head")
            or not hasattr(getattr(hf_model, "model", None), "layers")):
        raise ValueError(f"cannot run a transformers {name} (model_type {cfg_dict.get('model_type')!r}); "
                         f"supported: {', '.join(SUPPORTED_CLASSES)}")
    cfg = ModelConfig.from_hf(cfg_dict)
    params = {k.removeprefix("model."): p for k, p in hf_model.named_parameters(remove_duplicate=False)}
    devices = {p.device for p in params.values()}
    if len(devices) != 1:
        raise ValueError(f"{name}'s weights lie on several devices ({sorted(map(str, devices))}); "
                         "load it on one device (no device_map splitting)")
    with torch.device("meta"):
        model = LlamaModel(cfg)
    expected = dict(model.named_parameters())
    if cfg.tie_embeddings:
        params.pop("lm_head.weight", None)
    missing = [k for k in expected if k not in params]
    if missing:
        raise ValueError(f"{name} lacks parameters {missing[:5]}: is it a plain {name} without adapters?")
    # detach(): a new Parameter on the same storage, so our requires_grad=False leaves hf's alone
    state = {k: nn.Parameter(params[k].detach(), requires_grad=False) for k in expected}
    model.load_state_dict(state, strict=False, assign=True)  # tied lm_head: set below
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    device = next(iter(devices)) if device is None else torch.device(device)
    if dtype is not None or device != next(iter(devices)):
        model = model.to(device=device, dtype=dtype)
    model.inv_freq = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(model.device)
    model.source = getattr(hf_model, "name_or_path", None) or None  # for the tokenizer, when saved
    model.tokenizer_tokens = None
    model.generation_config = getattr(hf_model, "generation_config", None)
    return model.eval()
