"""The draft's side of a chain: the one rollout loop (SD's windows, Mirror-SD's fresh windows), and
the draft's confidence cut."""
from __future__ import annotations

import torch

from mirror_rt.decoders.base import Sampler, all_finite, check_finite, prefill, raise_unless_finite, read_back


def set_draft_context(model, prompt: torch.Tensor):
    """A reduced-vocabulary draft (the SS draft) also proposes the prompt's own tokens."""
    if hasattr(model, "set_context_tokens"):
        model.set_context_tokens(prompt)


def uses_streams(model) -> bool:
    """Whether to propose windows with the draft's Speculative Streaming heads. Opt-in
    (``draft.stream_proposals = True``): the same tokens in fewer passes, but each pass also carries
    the stream guesses, which did not pay at our default draft's acceptance on a CPU
    (bench/RESULTS.md, "Stream proposals")."""
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


def sure_rows(logits: torch.Tensor, min_prob: float) -> torch.Tensor:
    """bool [...] per row of logits [..., V]: the draft's most likely token has probability >=
    min_prob (its own distribution, before sampling settings). A window that ends at the first
    unsure token stays lossless: its length depends on the draft alone. Stays on the device."""
    if min_prob <= 0:
        return torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device)
    return torch.softmax(logits.float(), -1).amax(-1) >= min_prob


def confident(logits: torch.Tensor, min_prob: float) -> bool:
    """``sure_rows`` for one row of logits [V], read on the host."""
    return bool(sure_rows(logits, min_prob))


def stop_when_unsure(min_prob: float):
    """``propose_streams``'s stop callable for min_prob (None when 0: full windows)."""
    return None if min_prob <= 0 else (lambda logits: not confident(logits, min_prob))


def stack_q(qs):
    """The q rows a window was drawn from, [n, V], or None (greedy, or an empty window)."""
    return None if not qs or qs[0] is None else torch.stack(qs)


def roll_chain(forward, first: torch.Tensor, n: int, sampler: Sampler, min_prob: float, step: int):
    """The draft's chain rollout, shared by SD and Mirror-SD: up to n tokens, each fed back.

    forward(ids [k] int64 on the draft's device, offset) -> logits [V] of the last fed id; offset
    counts the tokens fed before (0 for ``first``, the pending token or a catch-up chain).
    The window ends before the first token the draft is unsure of (``sure_rows``); then each
    forward is read once (token, sure, finite), otherwise the whole chain is read once at its end.
    Returns (window list[int], q [len, V] float32 or None when greedy)."""
    if n <= 0:
        return [], None
    feed, drawn, qs, finite, window = first, [], [], [], []
    for offset in range(n):
        logits = forward(feed, offset)
        token, q = sampler.draw(logits)
        if min_prob > 0:
            tok, sure, ok = read_back(token, sure_rows(logits, min_prob), all_finite(logits))
            raise_unless_finite(ok, "draft", step)
            if not sure:
                break
            window.append(tok)
        drawn.append(token)
        qs.append(q)
        finite.append(all_finite(logits))
        feed = token.reshape(1)
    if min_prob <= 0:
        window, ok = read_back(torch.stack(drawn), torch.stack(finite).all())
        raise_unless_finite(ok, "draft", step)
    return window, stack_q(qs)


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
        the window ends before the first token the draft gives less than min_prob (``sure_rows``).

        Returns (window: list[int] of at most n ids, q: [len, V] float32 probabilities each window
        token was drawn from, or None when greedy or empty). The cache commits what it fed; ``sync``
        trims it later.
        """
        model, cache = self.model, self.cache
        feed = tokens[cache.length:]
        if n > 0 and uses_streams(model):
            return self._propose_streams(feed, n, sampler, step, min_prob)

        def forward(ids, offset):
            logits = model(ids[None], cache)[0, -1]
            cache.commit(ids.shape[0])
            return logits

        if n <= 0:
            return [], None
        window, q = roll_chain(forward, torch.tensor(feed, device=model.device), n, sampler, min_prob, step)
        return window, (q if window else None)

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
        return window, stack_q(qs)

    def sync(self, committed_prefix_len: int):
        """Drop cached entries past the first `committed_prefix_len` tokens that are still valid."""
        if self.cache.length > committed_prefix_len:
            self.cache.rollback(committed_prefix_len)
