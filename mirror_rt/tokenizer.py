"""Tokenizers through transformers, for a checkpoint directory or a GGUF file."""
from __future__ import annotations

import os


def load_tokenizer(source):
    """AutoTokenizer for a Hugging Face directory or a .gguf file (its embedded tokenizer)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ImportError("tokenizers need transformers: pip install 'mirror_rt[hf]'") from None
    source = os.fspath(source)
    if source.endswith(".gguf"):
        return AutoTokenizer.from_pretrained(os.path.dirname(source) or ".", gguf_file=os.path.basename(source))
    return AutoTokenizer.from_pretrained(source)


def encode_chat(tokenizer, user_message: str, device="cpu"):
    """The user message in the tokenizer's chat template (if any), ready to generate: [1, L] int64."""
    import torch

    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": user_message}], add_generation_prompt=True,
                                            tokenize=True)
        if hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
    else:
        ids = tokenizer(user_message)["input_ids"]
    return torch.tensor([list(ids)], dtype=torch.int64, device=device)
