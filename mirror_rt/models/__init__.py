"""Llama-family models with a split forward, their KV cache and loaders."""
from mirror_rt.models.config import ModelConfig
from mirror_rt.models.kv_cache import StaticKVCache
from mirror_rt.models.llama import LlamaModel
from mirror_rt.models.loader import load_model

__all__ = ["ModelConfig", "StaticKVCache", "LlamaModel", "load_model"]
