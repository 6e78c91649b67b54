"""The CLI's argument checks, run before anything is loaded: a bad value costs no loading time.

``check_args(args)`` raises ValueError naming the flag; it looks only at the flags the command
has (every subcommand shares the names of ``cli._add_model_args``).
"""
from __future__ import annotations

import math
import os

# Files a tokenizer can load from (transformers' fast/slow tokenizers, sentencepiece, tiktoken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer.tiktoken", "spiece.model")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _at_least(args, name: str, low: int):
    value = getattr(args, name, None)
    if value is not None and value < low:
        raise ValueError(f"{_flag(name)} must be >= {low}, got {value}")


def _fraction(args, name: str, low_open=False, high_open=False):
    value = getattr(args, name, None)
    if value is None:
        return
    ok = math.isfinite(value) and (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)
    if not ok:
        raise ValueError(f"{_flag(name)} must be in {'(' if low_open else '['}0, 1{')' if high_open else ']'}, "
                         f"got {value}")


def check_tokenizer_files(path: str):
    """A checkpoint directory needs its tokenizer beside the weights (a GGUF file embeds one)."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    if path.endswith(".gguf") or any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES):
        return
    raise ValueError(f"{path} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); save the "
                     "tokenizer beside the weights: tokenizer.save_pretrained(that folder)")


def _check_model_path(flag: str, path: str, tokenizer: bool):
    if not os.path.exists(path):
        raise ValueError(f"{flag} {path}: no such file or directory")
    if os.path.isfile(path) and not path.endswith((".gguf", ".safetensors")):
        raise ValueError(f"{flag} {path}: expected a checkpoint directory, a .safetensors or a .gguf file")
    if tokenizer:
        check_tokenizer_files(path)


def check_args(args):
    """Every check that needs no model: ranges, paths, the device. Raises ValueError."""
    _at_least(args, "max_new_tokens", 0)
    temperature = getattr(args, "temperature", None)
    if temperature is not None and not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    _fraction(args, "top_p", low_open=True)
    _at_least(args, "top_k", 0)
    for name in ("window", "kappa", "exit_layer", "max_branches", "threads", "prompts"):
        _at_least(args, name, 1)
    window = getattr(args, "window", None)
    if window is not None and window > 64:
        raise ValueError(f"--window must be <= 64, got {window}")
    _at_least(args, "lookup", 0)
    _at_least(args, "lookup_window", 0)
    _fraction(args, "min_branch_prob")
    _fraction(args, "min_draft_prob", high_open=True)
    lane = getattr(args, "lane", None)
    if lane is not None:
        from mirror_rt.lanes import LANE_KINDS

        if lane not in LANE_KINDS:
            raise ValueError(f"--lane must be one of {', '.join(LANE_KINDS)}, got {lane!r}")
    if getattr(args, "device", None) is not None:
        from mirror_rt.models.device_dtype import resolve_device

        resolve_device(args.device)
    if getattr(args, "target", None):
        _check_model_path("--target", args.target, tokenizer=True)
    draft = getattr(args, "draft", None)
    if draft and draft.startswith("truncated:"):
        layers = draft.split(":", 1)[1]
        if not layers.isdigit() or int(layers) < 1:
            raise ValueError(f"--draft truncated:N needs a layer count N >= 1, got {draft!r}")
    elif draft:
        _check_model_path("--draft", draft, tokenizer=False)
    exit_head = getattr(args, "exit_head", None)
    if isinstance(exit_head, str) and exit_head != "none" and not os.path.isfile(exit_head):
        raise ValueError(f"--exit-head {exit_head}: no such file")
    prompt_file = getattr(args, "prompt_file", None)
    if prompt_file and not os.path.isfile(prompt_file):
        raise ValueError(f"--prompt-file {prompt_file}: no such file")
