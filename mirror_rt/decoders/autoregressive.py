"""Autoregressive decoding with the target alone: the baseline every benchmark compares with."""
from __future__ import annotations

import torch

from mirror_rt import defaults
from mirror_rt.decoders.base import (GenerateArgs, Generation, GenerationOutput, all_finite,
                                     prepare_model, raise_unless_finite, read_back, start_generation)


class AutoregressiveDecoder:
    """compile: ``mirror_rt.compiled.prepare``'s choice for the target (False, True or "auto")."""

    def __init__(self, target, compile=defaults.COMPILE):
        from mirror_rt.models.from_hf import check_model

        check_model(target, "target")  # a transformers model: TypeError naming load_model
        self.target = target
        self.runner = prepare_model(target, compile)
        self.reuse = None  # a decoders.reuse.PrefixReuse: start from an earlier generation's cache

    @torch.inference_mode()
    def generate(self, input_ids, max_new_tokens, eos_token_id=None, temperature=0.0, seed=None,
                 top_k=0, top_p=1.0, stream=None, stop=None, tokenizer=None) -> GenerationOutput:
        """input_ids [1, L] (or [L]) int64 -> GenerationOutput(tokens [1, n] int64, stats).
        Keywords as ``base.GenerateArgs``: eos_token_id None is the model's EOS ([] for none),
        stop strings need ``tokenizer``, stream receives each list of new token ids."""
        args = GenerateArgs(max_new_tokens, eos_token_id, temperature, seed, top_k, top_p, stream, stop, tokenizer)
        gen = start_generation(self.runner, input_ids, args, "ar", 1, reuse=self.reuse)
        with gen.stats.phase("prefill"):
            gen.prefill_target(self.runner)
        while not gen.out.done:
            gen.tokens.append(target_step(self.runner, gen))
        return gen.output(self.target.device)


def target_step(model, gen: Generation) -> int:
    """One target-only step: feed the pending token, commit it, pick and emit the next (returned).
    One host read: the token and the finiteness flag together."""
    with gen.stats.phase("target"):
        logits = model(torch.tensor([[gen.tokens[-1]]], device=model.device), gen.cache)[0, -1]
        gen.cache.commit(1)
        token, _ = gen.sampler.draw(logits)
        token, finite = read_back(token, all_finite(logits))
    raise_unless_finite(finite, "target", gen.stats.steps)
    gen.out.emit([token])
    gen.stats.add_step(0)
    return token
