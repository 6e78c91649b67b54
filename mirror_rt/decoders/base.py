"""What every decoder shares: the output type, statistics, prompt checks, token sampling, emission.

Each decoder keeps the same bookkeeping: the committed tokens are in ``tokens`` (prompt and
generated), the last one is *pending* (committed, not yet fed to the target), and ``emit`` stops
exactly at EOS or ``max_new_tokens`` even when a whole window was accepted.
"""
from __future__ import annotations

import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from mirror_rt.ops.reference import process_logits


@dataclass
class GenerationOutput:
    tokens: torch.Tensor  # [1, n] int64, the generated ids only (prompt excluded)
    stats: dict = field(default_factory=dict)


class Stats:
    """Per-run statistics: accepted-length histogram, phase times, counters."""

    def __init__(self, decoder: str):
        self.decoder = decoder
        self.accepted = Counter()  # accepted length -> steps
        self.phase_s = defaultdict(float)
        self.counters = Counter()
        self.t_start = time.perf_counter()

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phase_s[name] += time.perf_counter() - t0

    @property
    def steps(self) -> int:
        return sum(self.accepted.values())

    def add_step(self, accepted: int):
        self.accepted[int(accepted)] += 1

    def mean_accepted_per_window(self, empty_steps: int) -> float:
        """Mean accepted length over the steps that verified a window (all but empty_steps)."""
        return sum(k * v for k, v in self.accepted.items()) / max(self.steps - empty_steps, 1)

    def finish(self, n_tokens: int, **extra) -> dict:
        wall = time.perf_counter() - self.t_start
        steps = sum(self.accepted.values())
        mean = sum(k * v for k, v in self.accepted.items()) / steps if steps else 0.0
        out = {
            "decoder": self.decoder,
            "new_tokens": n_tokens,
            "steps": steps,
            "accepted_hist": dict(sorted(self.accepted.items())),
            "mean_accepted": mean,
            "wall_s": wall,
            "tokens_per_s": n_tokens / wall if wall > 0 else 0.0,
            "phase_s": dict(self.phase_s),
            **dict(self.counters),
        }
        out.update(extra)
        return out


def as_prompt(input_ids, vocab_size: int, device) -> torch.Tensor:
    """Validate a prompt ([L] or [1, L] int ids) and return it as [L] int64 on device."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a LongTensor of shape [1, L] or [L], got {type(input_ids).__name__}")
    if input_ids.dim() == 2:
        if input_ids.shape[0] != 1:
            raise ValueError(f"input_ids must hold one sequence ([1, L]); got batch {input_ids.shape[0]}")
        input_ids = input_ids[0]
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be [1, L] or [L], got shape {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be int64 token ids, got {input_ids.dtype}")
    if input_ids.numel() == 0:
        raise ValueError("input_ids is empty: the prompt needs at least one token")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"input_ids must lie in [0, {vocab_size}), got values in [{lo}, {hi}]")
    return input_ids.to(device=device, dtype=torch.int64)


def check_generation_args(max_new_tokens, temperature, top_k=0, top_p=1.0):
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not temperature >= 0:  # also refuses NaN, which would sample from NaN probabilities
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def check_context(model, prompt_len: int, max_new_tokens: int, slack: int) -> int:
    """Cache capacity for prompt + generation + one window of slack; raises if beyond the context."""
    need = prompt_len + max_new_tokens + slack
    limit = model.config.max_position
    if need > limit:
        raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) + window slack "
                         f"({slack}) = {need} exceeds the model's context of {limit} tokens")
    return need


def eos_set(eos_token_id) -> frozenset:
    if eos_token_id is None:
        return frozenset()
    if isinstance(eos_token_id, int):
        return frozenset([eos_token_id])
    return frozenset(int(t) for t in eos_token_id)


def check_pair(target, draft):
    """Draft and target must share a vocabulary: the same size and, where both loaders read the
    tokenizer (``tokenizer_tokens``), the same token at every id both tokenizers define."""
    tv, dv = target.config.vocab_size, draft.config.vocab_size
    if tv != dv:
        raise ValueError(f"draft vocabulary ({dv} tokens) differs from the target's ({tv}); "
                         "speculative decoding needs the same tokenizer")
    t_tok, d_tok = getattr(target, "tokenizer_tokens", None), getattr(draft, "tokenizer_tokens", None)
    if t_tok and d_tok and t_tok is not d_tok:
        for i, (t, d) in enumerate(zip(t_tok, d_tok)):
            if t != d and t is not None and d is not None:
                raise ValueError(f"draft tokenizer differs from the target's: token id {i} is {d!r} in the draft "
                                 f"and {t!r} in the target; speculative decoding needs the same tokenizer")


def check_finite(logits: torch.Tensor, model_name: str, step: int):
    if not torch.isfinite(logits).all():
        raise FloatingPointError(f"{model_name} produced NaN/inf logits at step {step}; refusing to emit tokens")


class Sampler:
    """Token choice from logits: argmax at temperature 0, else a seeded sample of the processed p."""

    def __init__(self, temperature: float, top_k: int, top_p: float, seed, device):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.greedy = temperature == 0
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed if seed is not None else torch.seed() % (2 ** 63))

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return process_logits(logits, self.temperature, self.top_k, self.top_p)

    def uniforms(self, *shape) -> torch.Tensor:
        return torch.rand(*shape, generator=self.generator, device=self.generator.device)

    def pick(self, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """logits [V] -> (token, processed probs or None when greedy)."""
        if self.greedy:
            return int(logits.argmax()), None
        p = self.probs(logits)
        return int(torch.multinomial(p, 1, generator=self.generator)), p


class Emitter:
    """Collects generated tokens; stops exactly at EOS (kept) or at max_new_tokens."""

    def __init__(self, max_new_tokens: int, eos_token_id, stream=None):
        self.limit = max_new_tokens
        self.eos = eos_set(eos_token_id)
        self.tokens: list[int] = []
        self.done = False
        self.stream = stream  # optional callable(list[int]) seeing each batch of new tokens

    def emit(self, toks) -> int:
        """Append tokens in order until done; returns how many were taken."""
        taken = 0
        for t in toks:
            if self.done:
                break
            self.tokens.append(int(t))
            taken += 1
            self.done = int(t) in self.eos or len(self.tokens) >= self.limit
        if self.stream is not None and taken:
            self.stream(self.tokens[-taken:])
        return taken

    def result(self, device) -> torch.Tensor:
        return torch.tensor([self.tokens], dtype=torch.int64, device=device)


@torch.inference_mode()
def prefill(model, cache, prompt: torch.Tensor):
    """Feed all prompt tokens but the last into the cache and commit them. The last prompt token
    is the first *pending* token: every decoder's first step feeds it (so a 1-token prompt
    needs no prefill). The LM head is skipped: no logits are needed here."""
    if prompt.numel() > 1:
        model.run_layers(model.embed(prompt[None, :-1]), 0, model.num_layers, cache)
        cache.commit(prompt.numel() - 1)
