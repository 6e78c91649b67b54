"""Vanilla chain speculative decoding: the draft proposes a window, the target verifies it.

Greedy (temperature 0) accepts while the draft matches the target's argmax; otherwise rejection
sampling (Leviathan et al.) keeps the output distribution exactly the target's. With ``lookup``
(greedy only) a window copied from the context (``lookup.py``) comes first, the draft otherwise.
"""
from __future__ import annotations

import torch

from mirror_rt import ops
from mirror_rt.decoders.base import (Emitter, GenerationOutput, Sampler, Stats, as_prompt, check_context,
                                     check_finite, check_generation_args, check_pair, prefill)
from mirror_rt.decoders.drafting import DraftState, check_min_draft_prob
from mirror_rt.decoders.lookup import ContextLookup, check_lookup, check_lookup_window


def chain_parents(n: int, device) -> torch.Tensor:
    """[1, n] int32 parents of a chain: -1, 0, 1, ..., n-2."""
    return (torch.arange(n, dtype=torch.int32, device=device) - 1)[None]


def verify_chain(node_ids, logits, q, mode: str, sampler: Sampler, temperature: float, top_k: int,
                 top_p: float) -> tuple[int, int]:
    """Verify the chain [pending, w_1..w_n] (node_ids [1, n+1]) against the target's logits
    [1, n+1, V]. q: [>= n, V] rows the window was drawn from (rejection only; row j drew w_{j+1}).
    Returns (accepted count A, next token)."""
    T = node_ids.shape[1]
    draft_probs = uniforms = None
    if mode != "greedy":
        uniforms = sampler.uniforms(1, T).to(logits.device)
    if mode == "rejection":
        draft_probs = torch.zeros_like(logits)  # the last node has no child: its q row stays 0
        if q is not None:
            draft_probs[0, : T - 1] = q[: T - 1].to(logits.device)
    accept_len, _, next_token = ops.verify_accept(
        node_ids, chain_parents(T, logits.device), logits, mode, temperature=max(temperature, 1e-6),
        top_k=top_k, top_p=top_p, draft_probs=draft_probs, uniforms=uniforms)
    return int(accept_len[0]), int(next_token[0])


class SpeculativeDecoder:
    """window: draft tokens per step; lookup: longest n-gram of the context lookup tried before the
    draft (greedy decoding only; 0 = the draft alone); lookup_window: how many tokens a copied
    window may hold (None: ``window``); a copied window costs no draft pass, so it may be longer
    than the draft's (on the 2-core CPU the extra verified positions cost what they gained).
    min_draft_prob: the draft's window ends before the first token it gives less than this
    probability (0: always ``window`` tokens); an empty window makes the step a plain target step.
    A weak draft then costs fewer draft passes and verified rows where it is unsure."""

    def __init__(self, target, draft, window: int = 7, lookup: int = 0, lookup_window: int | None = None,
                 min_draft_prob: float = 0.0):
        if not isinstance(window, int) or not 1 <= window <= 64:
            raise ValueError(f"window must be an integer in [1, 64], got {window!r}")
        check_pair(target, draft)
        self.target, self.draft, self.window = target, draft, window
        check_lookup(lookup)
        self.lookup = lookup
        self.lookup_window = check_lookup_window(lookup_window, window, 64)
        self.min_draft_prob = check_min_draft_prob(min_draft_prob)

    @torch.inference_mode()
    def generate(self, input_ids, max_new_tokens, eos_token_id=None, temperature=0.0, seed=None,
                 top_k=0, top_p=1.0, stream=None) -> GenerationOutput:
        """input_ids [1, L] (or [L]) int64 -> GenerationOutput(tokens [1, n], stats).
        stream: optional callable receiving each list of newly emitted token ids."""
        check_generation_args(max_new_tokens, temperature, top_k, top_p)
        target = self.target
        prompt = as_prompt(input_ids, target.config.vocab_size, target.device)
        reserve = max(self.window, self.lookup_window) + 1
        capacity = check_context(target, prompt.numel(), max_new_tokens, reserve)
        check_context(self.draft, prompt.numel(), max_new_tokens, reserve)
        cache, draft = target.new_cache(capacity), DraftState(self.draft, capacity)
        sampler = Sampler(temperature, top_k, top_p, seed, target.device)
        mode = "greedy" if sampler.greedy else "rejection"
        lookup = ContextLookup(self.lookup) if self.lookup and sampler.greedy else None
        out, stats = Emitter(max_new_tokens, eos_token_id, stream), Stats("sd")
        with stats.phase("prefill"):
            prefill(target, cache, prompt)
            draft.prefill(prompt.to(self.draft.device))
        tokens = prompt.tolist()
        while not out.done:
            room = max_new_tokens - len(out.tokens) - 1
            with stats.phase("draft"):
                window, q = propose(lookup, draft, tokens, min(self.window, room), sampler, stats,
                                    min(self.lookup_window, room), self.min_draft_prob)
                if not window and room > 0:
                    stats.counters["empty_steps"] += 1
            with stats.phase("target"):
                node_ids = torch.tensor([[tokens[-1]] + window], device=target.device)
                logits = target(node_ids, cache)
                check_finite(logits, "target", stats.steps)
            with stats.phase("verify"):
                accepted, next_token = verify_chain(node_ids, logits, q, mode, sampler, temperature, top_k, top_p)
            cache.commit(1 + accepted)
            draft.sync(len(tokens) + accepted)
            new = window[:accepted] + [next_token]
            tokens += new
            out.emit(new)
            stats.add_step(accepted)
        empty = stats.counters["empty_steps"]  # the draft was unsure of its first token (min_draft_prob)
        return GenerationOutput(out.result(target.device), stats.finish(
            len(out.tokens), window=self.window, lookup_windows=stats.counters["lookup_windows"], empty_steps=empty,
            mean_accepted_per_window=stats.mean_accepted_per_window(empty)))


def propose(lookup, draft: DraftState, tokens: list[int], n: int, sampler: Sampler, stats: Stats,
            lookup_n: int | None = None, min_prob: float = 0.0):
    """The next window after `tokens` (last entry pending): up to lookup_n (default n) tokens copied
    from the context when the lookup finds them (q None: greedy), else n rolled out by the draft.
    Returns (window, q)."""
    lookup_n = n if lookup_n is None else lookup_n
    if lookup is not None and n > 0 and lookup_n > 0:
        lookup.update(tokens)
        window = lookup.propose([], lookup_n)
        if window:
            stats.counters["lookup_windows"] += 1
            return window, None
    return draft.propose(tokens, n, sampler, stats.steps, min_prob)
