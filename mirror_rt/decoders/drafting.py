"""The draft's side of a chain step: keep its cache in sync and roll out a window."""
from __future__ import annotations

import torch

from mirror_rt.decoders.base import Sampler, check_finite, prefill


def set_draft_context(model, prompt: torch.Tensor):
    """A reduced-vocabulary draft (the SS draft) also proposes the prompt's own tokens."""
    if hasattr(model, "set_context_tokens"):
        model.set_context_tokens(prompt)


def uses_streams(model) -> bool:
    """Whether to propose windows with the draft's Speculative Streaming heads. Opt-in
    (``draft.stream_proposals = True``): the same tokens in fewer passes, but each pass also
    carries the stream guesses, and at our default draft's acceptance this measured slower on a
    2-core CPU (demo: SD 0.70x vs 0.81x of AR, bench/RESULTS.md)."""
    return bool(getattr(model, "n_streams", 0)) and bool(getattr(model, "stream_proposals", False))


def checked_pick(sampler: Sampler, step: int):
    """sampler.pick that first refuses NaN/inf draft logits."""
    def pick(logits):
        check_finite(logits, "draft", step)
        return sampler.pick(logits)
    return pick


def check_min_draft_prob(value) -> float:
    """A decoder's ``min_draft_prob``: a number in [0, 1) (0: the draft always fills its window)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"min_draft_prob must be a number in [0, 1), got {value!r}")
    return float(value)


def confident_rows(logits: torch.Tensor, min_prob: float) -> list[bool]:
    """Per row of logits [..., V]: whether the draft's most likely token has probability >= min_prob
    (its own distribution, before sampling settings). A window that ends at the first unconfident
    token stays lossless: its length depends on the draft alone."""
    if min_prob <= 0:
        return [True] * logits[..., 0].numel()
    return (torch.softmax(logits.float(), -1).amax(-1) >= min_prob).reshape(-1).tolist()


def confident(logits: torch.Tensor, min_prob: float) -> bool:
    """``confident_rows`` for one row of logits [V]."""
    return confident_rows(logits, min_prob)[0]


def stop_when_unsure(min_prob: float):
    """``propose_streams``'s stop callable for min_prob (None when 0: full windows)."""
    return None if min_prob <= 0 else (lambda logits: not confident(logits, min_prob))


class DraftState:
    """A draft model, its KV cache, and which committed tokens the cache holds.

    The cache's committed slots always hold a prefix of the committed token sequence; before a
    rollout the missing tail (at least the pending token) is fed as one chain.
    """

    def __init__(self, model, capacity: int):
        self.model = model
        self.cache = model.new_cache(capacity)

    @torch.inference_mode()
    def prefill(self, prompt: torch.Tensor):
        set_draft_context(self.model, prompt)
        prefill(self.model, self.cache, prompt)

    @torch.inference_mode()
    def propose(self, tokens: list[int], n: int, sampler: Sampler, step: int, min_prob: float = 0.0):
        """Roll out up to n tokens after the committed sequence `tokens` (its last entry pending);
        the window ends before the first token the draft gives less than min_prob (``confident``).

        Returns (window: list[int] of at most n ids, q: [len, V] float32 probabilities each window
        token was drawn from, or None when greedy or empty). The cache commits what it fed; ``sync``
        trims it later.
        """
        model, cache = self.model, self.cache
        feed = tokens[cache.length:]
        if n > 0 and uses_streams(model):
            return self._propose_streams(feed, n, sampler, step, min_prob)
        window, qs = [], []
        for _ in range(n):
            logits = model(torch.tensor([feed], device=model.device), cache)[0, -1]
            check_finite(logits, "draft", step)
            cache.commit(len(feed))
            if not confident(logits, min_prob):
                break
            tok, q = sampler.pick(logits)
            window.append(tok)
            if q is not None:
                qs.append(q)
            feed = [tok]
        return window, (torch.stack(qs) if qs else None)

    def _propose_streams(self, feed: list[int], n: int, sampler: Sampler, step: int, min_prob: float = 0.0):
        """The same window from a Speculative Streaming draft in fewer passes: the catch-up tokens
        as one chain, then ``propose_streams`` (which leaves the cache exactly as the loop does)."""
        model, cache = self.model, self.cache
        if len(feed) > 1:
            model(torch.tensor([feed[:-1]], device=model.device), cache)
            cache.commit(len(feed) - 1)
        window, qs, info = model.propose_streams(cache, feed[-1], n, 0, pick=checked_pick(sampler, step),
                                                 stop=stop_when_unsure(min_prob))
        # as the loop: pending + window[:-1] after n steps; pending + window when it stopped early
        cache.commit(len(window) + (1 if info.get("stopped") else 0))
        return window, (None if not qs or qs[0] is None else torch.stack(qs))

    def sync(self, committed_prefix_len: int):
        """Drop cached entries past the first `committed_prefix_len` tokens that are still valid."""
        if self.cache.length > committed_prefix_len:
            self.cache.rollback(committed_prefix_len)
