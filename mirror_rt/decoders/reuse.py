"""PrefixReuse: a target KV cache handed from one generation to the next that continues it.

The auto decoder writes a request in pieces, each by a different decoder, and each piece's
prompt is the request's prompt plus every token before it. Without this, every piece would read
that whole prompt again (a prefill). With it, a piece starts from the rows the previous piece's
cache holds for its prompt and feeds only the rest. The rows are copied: each generation keeps
owning its cache. A row is only reused for the very token, at the very position, it was computed
for. Where the forward is row-exact (quantized CPU linears, and attention on a float32 CPU cache:
``models.llama._row_exact``) a copied row has the bits a prefill of the same tokens gives it;
elsewhere (torch's fp32 matmul on several threads, a GPU) it differs from a new prefill in the last
bits at most, as a prefill of another length already may.
"""
from __future__ import annotations


class PrefixReuse:
    """Holds the last generation's target cache until the next generation takes its rows."""

    def __init__(self):
        self.tokens: list[int] = []  # the tokens whose rows the cache holds, in order
        self.cache = None

    def keep(self, tokens: list, cache):
        """After a generation: its committed tokens (prompt, then output) and its cache, whose rows
        [0, cache.length) hold tokens[:cache.length] (the last token is pending: never fed)."""
        self.tokens, self.cache = list(tokens[:cache.length]), cache

    def clear(self):
        self.tokens, self.cache = [], None

    def restore(self, cache, prompt: list) -> int:
        """Copy the kept rows of the longest common prefix of the kept tokens and prompt[:-1] (the
        last prompt token is pending) into ``cache``, which must be empty, and commit them.
        Returns how many rows were reused (0 when the caches' layouts differ)."""
        kept = self.cache
        if kept is None or cache.length or not same_layout(kept, cache):
            return 0
        n, limit = 0, min(len(self.tokens), len(prompt) - 1, cache.max_len)
        while n < limit and self.tokens[n] == prompt[n]:
            n += 1
        if n:
            for dst, src in zip(cache.k + cache.v, kept.k + kept.v):
                dst[:, :n].copy_(src[:, :n])
            cache.commit(n)
        return n


def same_layout(a, b) -> bool:
    """Whether two KV caches hold rows of the same layers, heads, dtype and device."""
    if type(a) is not type(b) or not hasattr(a, "k") or len(a.k) != len(b.k) or len(a.v) != len(b.v):
        return False
    return all(x.shape[0] == y.shape[0] and x.shape[2:] == y.shape[2:] and x.dtype == y.dtype
               and x.device == y.device for x, y in zip(a.k + a.v, b.k + b.v))
