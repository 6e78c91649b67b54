"""Context lookup: a window copied from the context before the draft model runs.

If the last n tokens of the context (n = max_ngram down to 1) occurred earlier in the prompt or
the output, the tokens that followed their latest earlier occurrence are proposed as the window
(prompt lookup decoding; Saxena 2023, "Prompt Lookup Decoding"). It costs no model pass, and it
catches what a small draft misses: names and phrases copied from the prompt (summaries, RAG,
translation) and the target's own repetitions.

Both decoders consult it first and fall back to the draft model when it finds nothing
(``SpeculativeDecoder(lookup=...)``, ``MirrorConfig.lookup``). Greedy decoding only: a copied
window is not drawn from a distribution, so the sampling modes use the draft alone. The target
still verifies every token, so the output stays exactly the target's.

With a weak draft it is most of what the windows accept on answers that quote their prompt
(bench/RESULTS.md, "Why the defaults": context lookup).
"""
from __future__ import annotations

MAX_NGRAM_LIMIT = 16


def check_lookup(lookup, off_allowed: bool = True):
    """A decoder's ``lookup`` setting: 0 (or None) for off when off_allowed, else the longest
    n-gram, an integer in [1, MAX_NGRAM_LIMIT]."""
    if (lookup or not off_allowed) and (not isinstance(lookup, int) or not 1 <= lookup <= MAX_NGRAM_LIMIT):
        raise ValueError(f"lookup n-gram length must be an integer in [1, {MAX_NGRAM_LIMIT}], got {lookup!r}")


def check_lookup_window(lookup_window, window: int, limit: int) -> int:
    """A decoder's ``lookup_window``: None for the draft's ``window``, else an integer in [1, limit]
    (the decoder's own window limit). Returns the length a copied window may have."""
    if lookup_window is None:
        return window
    if isinstance(lookup_window, bool) or not isinstance(lookup_window, int) or not 1 <= lookup_window <= limit:
        raise ValueError(f"lookup_window must be None or an integer in [1, {limit}], got {lookup_window!r}")
    return lookup_window


class ContextLookup:
    """An index of the committed tokens' n-grams (n in [1, max_ngram]) for one generation.

    ``update(tokens)`` indexes a committed sequence that only grows (a new, shorter or different
    one starts the index again); ``propose(tail, n)`` looks up the context ``tokens + tail``.
    """

    def __init__(self, max_ngram: int = 4):
        check_lookup(max_ngram, off_allowed=False)
        self.max_ngram = max_ngram
        self.tokens: list[int] = []
        self.starts: dict[tuple, list[int]] = {}  # n-gram -> its start positions, ascending

    def update(self, tokens: list[int]):
        """Index the committed sequence `tokens` (a list of ids that extends the last one)."""
        old = len(self.tokens)
        if len(tokens) < old or tokens[:old] != self.tokens:  # a new generation
            self.tokens, self.starts, old = [], {}, 0
        self.tokens.extend(tokens[old:])
        seq = self.tokens
        for end in range(old + 1, len(seq) + 1):  # every n-gram that ends at a new token
            for n in range(1, min(self.max_ngram, end) + 1):
                self.starts.setdefault(tuple(seq[end - n:end]), []).append(end - n)

    def propose(self, tail: list[int], count: int) -> list[int]:
        """Up to `count` ids that followed the latest earlier occurrence of the context's longest
        matching suffix (context = the indexed tokens + `tail`); [] when no suffix recurs."""
        if count <= 0:
            return []
        seq = self.tokens
        context_tail = (seq[-self.max_ngram:] + list(tail))[-self.max_ngram:]
        for n in range(len(context_tail), 0, -1):
            for s in reversed(self.starts.get(tuple(context_tail[-n:]), ())):
                if s + n < len(seq):  # something follows this occurrence (not the context's own suffix)
                    return seq[s + n:s + n + count]
        return []
