"""User prompts written by the target itself (Magpie-style self-instruct), for varied training data.

An instruction-tuned target, fed its chat template only up to the start of a user turn, writes a
plausible user message when sampled: SmolLM2-135M-Instruct asks for business plans, code in C#,
travel tips, essays, help with a bug... far more varied than our templates. The draft trained on
answers to mostly template prompts fits its training prompts (greedy SD at window 7 accepts 6.03
tokens there) but not held-out Spec-Bench (0.32; bench/RESULTS.md), so variety is what the data lacks.

Everything here is token ids, so the GPU run needs no tokenizer: ``chat_frame`` (with a tokenizer,
on the preparing machine) gives the ids before and after a user message; ``sample_self_prompts``
(on the training device) samples user turns and frames them.
"""
from __future__ import annotations

MARK = "\x00MIRROR_RT_USER\x00"


def chat_frame(tokenizer) -> dict | None:
    """{"prefix": ids up to the user's message, "suffix": ids after it (a generation prompt),
    "end": the id that closes a user turn} from the tokenizer's chat template, or None when there
    is no template or the turn does not close with a special token (nothing to stop sampling at)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    text = tokenizer.apply_chat_template([{"role": "user", "content": MARK}], tokenize=False,
                                         add_generation_prompt=True)
    if text.count(MARK) != 1:
        return None
    before, after = text.split(MARK)
    prefix = tokenizer(before, add_special_tokens=False)["input_ids"]
    suffix = tokenizer(after, add_special_tokens=False)["input_ids"]
    if not suffix or suffix[0] not in set(getattr(tokenizer, "all_special_ids", [])):
        return None
    return {"prefix": list(prefix), "suffix": list(suffix), "end": int(suffix[0])}


def sample_self_prompts(target, frame: dict, n: int, max_tokens: int = 96, batch_size: int = 256, seed: int = 0,
                        time_limit: float | None = None, exclude=(), min_tokens: int = 4,
                        temperature: float = 1.0, top_p: float = 0.98) -> list[list[int]]:
    """Up to n distinct chat prompts (prefix + sampled user turn + suffix, int ids) whose user turn
    the target closed within max_tokens and that are at least min_tokens long. Prompts equal to
    one in `exclude` (the evaluation prompts) are dropped. Seeded; each of n + n // 4 draws is one
    sampled sequence, so fewer than n come back when turns run long or repeat."""
    from mirror_rt.answers import generate_answers

    if n <= 0:
        return []
    prefix, suffix, end = frame["prefix"], frame["suffix"], frame["end"]
    draws = generate_answers(target, [prefix] * (n + n // 4), max_tokens, [end], batch_size,
                             desc="self prompts", time_limit=time_limit, temperature=temperature, top_p=top_p,
                             seed=seed)
    banned = {tuple(e) for e in exclude}
    out, seen = [], set()
    for turn in draws:
        if not turn or turn[-1] != end or len(turn) - 1 < min_tokens:
            continue
        prompt = prefix + turn[:-1] + suffix
        key = tuple(prompt)
        if key in seen or key in banned:
            continue
        seen.add(key)
        out.append(prompt)
        if len(out) == n:
            break
    return out
