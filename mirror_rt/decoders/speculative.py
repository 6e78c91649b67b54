"""Vanilla chain speculative decoding: the draft proposes a window, the target verifies it.

Greedy (temperature 0) accepts while the draft matches the target's argmax; otherwise rejection
sampling (Leviathan et al.) keeps the output distribution exactly the target's. With ``lookup``
(greedy only) a window copied from the context (``lookup.py``) comes first, the draft otherwise.
"""
from __future__ import annotations

import torch

from mirror_rt import defaults
from mirror_rt.decoders.base import (GenerateArgs, GenerationOutput, check_pair, check_window,
                                     prepare_model, start_generation)
from mirror_rt.decoders.drafting import DraftState, check_min_draft_prob
from mirror_rt.decoders.lookup import ContextLookup, check_lookup, check_lookup_window
from mirror_rt.decoders.verify import verify_step


class SpeculativeDecoder:
    """window: draft tokens per step (1..defaults.MAX_WINDOW). Keywords:

    lookup          longest n-gram of the context lookup tried before the draft (greedy only; 0: off)
    lookup_window   tokens a copied window may hold (None: ``window``; a copied window costs no draft pass)
    min_draft_prob  the draft's window ends before the first token it gives less than this probability
                    (0: always ``window`` tokens); an empty window makes the step a plain target step,
                    so a weak draft costs fewer draft passes and verified rows where it is unsure
    compile         ``mirror_rt.compiled.prepare``'s choice for both models (False, True, "auto")
    """

    def __init__(self, target, draft, window: int = defaults.WINDOW, *, lookup: int = 0, **options):
        unknown = set(options) - {"lookup_window", "min_draft_prob", "compile"}
        if unknown:
            raise TypeError(f"SpeculativeDecoder got unexpected keyword(s) {sorted(unknown)}")
        self.window = check_window(window)
        check_pair(target, draft)
        self.target, self.draft = target, draft
        check_lookup(lookup)
        self.lookup = lookup
        self.lookup_window = check_lookup_window(options.get("lookup_window"), window, defaults.MAX_WINDOW)
        self.min_draft_prob = check_min_draft_prob(options.get("min_draft_prob", 0.0))
        compile = options.get("compile", defaults.COMPILE)
        self.runner, self.draft_runner = prepare_model(target, compile), prepare_model(draft, compile)
        self.reuse = None  # a decoders.reuse.PrefixReuse: start from an earlier generation's cache

    @torch.inference_mode()
    def generate(self, input_ids, max_new_tokens, eos_token_id=None, temperature=0.0, seed=None,
                 top_k=0, top_p=1.0, stream=None, stop=None, tokenizer=None) -> GenerationOutput:
        """input_ids [1, L] (or [L]) int64 -> GenerationOutput(tokens [1, n] int64, stats).
        Keywords as ``base.GenerateArgs``: eos_token_id None is the model's EOS ([] for none),
        stop strings need ``tokenizer``, stream receives each list of new token ids."""
        args = GenerateArgs(max_new_tokens, eos_token_id, temperature, seed, top_k, top_p, stream, stop, tokenizer)
        slack = max(self.window, self.lookup_window) + 1
        gen = start_generation(self.runner, input_ids, args, "sd", slack, self.draft, self.reuse)
        draft = DraftState(self.draft_runner, gen.capacity)
        lookup = ContextLookup(self.lookup) if self.lookup and gen.sampler.greedy else None
        with gen.stats.phase("prefill"):
            gen.prefill_target(self.runner)
            draft.prefill(gen.prompt.to(self.draft.device))
        while not gen.out.done:
            self.step(gen, draft, lookup)
        empty = gen.stats.counters["empty_steps"]  # the draft was unsure of its first token (min_draft_prob)
        return gen.output(self.target.device, window=self.window, lookup_windows=gen.stats.counters["lookup_windows"],
                          empty_steps=empty, mean_accepted_per_window=gen.stats.mean_accepted_per_window(empty))

    def step(self, gen, draft: DraftState, lookup):
        """Draft a window, verify it with one target forward, commit. One host read on the target's side."""
        stats, tokens, target = gen.stats, gen.tokens, self.runner
        room = gen.out.remaining - 1
        with stats.phase("draft"):
            window, q = propose(lookup, draft, gen, min(self.window, room), min(self.lookup_window, room),
                                self.min_draft_prob)
            if not window and room > 0:
                stats.counters["empty_steps"] += 1
        with stats.phase("target"):
            node_ids = torch.tensor([[tokens[-1]] + window], device=target.device)
            logits = target(node_ids, gen.cache)
        with stats.phase("verify"):
            mode = "greedy" if gen.sampler.greedy else "rejection"
            accepted, next_token = verify_step(node_ids, logits, q, mode, gen.sampler, stats.steps)
        gen.cache.commit(1 + accepted)
        draft.sync(len(tokens) + accepted)
        new = window[:accepted] + [next_token]
        tokens += new
        gen.out.emit(new)
        stats.add_step(accepted)


def propose(lookup, draft: DraftState, gen, n: int, lookup_n: int, min_prob: float = 0.0):
    """The next window after gen.tokens (last entry pending): up to lookup_n tokens copied from the
    context when the lookup finds them (q None: greedy), else up to n rolled out by the draft.
    Returns (window, q)."""
    if lookup is not None and n > 0 and lookup_n > 0:
        lookup.update(gen.tokens)
        window = lookup.propose([], lookup_n)
        if window:
            gen.stats.counters["lookup_windows"] += 1
            return window, None
    return draft.propose(gen.tokens, n, gen.sampler, gen.stats.steps, min_prob)
