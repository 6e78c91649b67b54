"""Autoregressive decoding with the target alone: the baseline every benchmark compares with."""
from __future__ import annotations

import torch

from mirror_rt.decoders.base import (Emitter, GenerationOutput, Sampler, Stats, as_prompt, check_context,
                                     check_finite, check_generation_args, prefill)


class AutoregressiveDecoder:
    def __init__(self, target):
        self.target = target

    @torch.inference_mode()
    def generate(self, input_ids, max_new_tokens, eos_token_id=None, temperature=0.0, seed=None,
                 top_k=0, top_p=1.0, stream=None) -> GenerationOutput:
        """input_ids [1, L] (or [L]) int64 -> GenerationOutput(tokens [1, n], stats).
        stream: optional callable receiving each list of newly emitted token ids."""
        check_generation_args(max_new_tokens, temperature, top_k, top_p)
        model = self.target
        prompt = as_prompt(input_ids, model.config.vocab_size, model.device)
        cache = model.new_cache(check_context(model, prompt.numel(), max_new_tokens, 1))
        sampler = Sampler(temperature, top_k, top_p, seed, model.device)
        out, stats = Emitter(max_new_tokens, eos_token_id, stream), Stats("ar")
        with stats.phase("prefill"):
            prefill(model, cache, prompt)
        pending = int(prompt[-1])
        while not out.done:
            pending = autoregressive_tail(model, cache, pending, sampler, out, stats)
        return GenerationOutput(out.result(model.device), stats.finish(len(out.tokens)))


def autoregressive_tail(model, cache, pending: int, sampler: Sampler, out: Emitter, stats: Stats) -> int:
    """One target-only step: feed the pending token, commit it, pick and emit the next (returned)."""
    with stats.phase("target"):
        logits = model(torch.tensor([[pending]], device=model.device), cache)[0, -1]
        check_finite(logits, "target", stats.steps)
        cache.commit(1)
    token, _ = sampler.pick(logits)
    out.emit([token])
    stats.add_step(0)
    return token
