"""The draft's side of Mirror-SD, as a state machine that takes and returns only token ids.

It owns the draft model and its KV cache, so it can live on any lane: this thread, a worker
thread, a CUDA/NPU stream, or a second process (only ids, counts and q rows cross).

Cache layout. Committed slots hold every committed token but the pending one. After them, the
*region* holds uncommitted nodes: first the window chain ``[pending, w_1, ..., w_n]`` (slots
0..n), then, during ``rollouts``, one root per branch and ``depth - 1`` extension nodes per
branch, all attended through one tree mask (``mirror_rt.ops.tree_attention``).
"""
from __future__ import annotations

import torch

from mirror_rt.decoders.base import Sampler, check_finite, prefill
from mirror_rt.ops.checks import MAX_TREE_NODES


def plan_branches(window: list[int], exit_ids: list[list[int]], max_branches: int) -> list[tuple[int, int]]:
    """Branches (i, v): every exit candidate v at window position i = 0..n, skipping v == w_{i+1}
    (that one is the window itself), position-major and rank-minor, at most max_branches."""
    branches = []
    for i, candidates in enumerate(exit_ids):
        for v in candidates:
            if i < len(window) and v == window[i]:
                continue
            if len(branches) == max_branches:
                return branches
            branches.append((i, int(v)))
    return branches


def max_branches_for(window: int, depth: int, cap: int | None) -> int:
    """How many branches fit one tree of at most MAX_TREE_NODES nodes (window chain + depth per branch)."""
    fit = (MAX_TREE_NODES - (window + 1)) // max(depth, 1)
    return max(0, min(fit, cap if cap is not None else fit))


class MirrorDraft:
    def __init__(self, model, window: int, max_branches: int | None):
        self.model = model
        self.window = window
        self.max_branches = max_branches_for(window, window, max_branches)
        self.cache = None
        self.pending = None
        self.branches: dict[tuple[int, int], dict] = {}
        self.step = 0

    # --- calls a lane runs ---------------------------------------------------------------------

    @torch.inference_mode()
    def start(self, prompt: list[int], capacity: int, temperature=0.0, top_k=0, top_p=1.0, seed=None):
        """Begin a generation: prefill all prompt tokens but the last (the pending token).
        capacity: committed tokens the cache must hold (the region's tree comes on top)."""
        need = min(capacity + MAX_TREE_NODES, self.model.config.max_position)
        if self.cache is None or self.cache.max_len < need:
            self.cache = self.model.new_cache(need)
        self.cache.rollback(0)
        # The draft draws its own samples: seed it apart from the target's sampler.
        self.sampler = Sampler(temperature, top_k, top_p, None if seed is None else seed + 1, self.model.device)
        self.step = 0
        prefill(self.model, self.cache, torch.tensor(prompt, device=self.model.device))
        self.pending, self.branches = prompt[-1], {}

    @torch.inference_mode()
    def fresh_window(self, n: int):
        """Roll out n tokens as a chain after the pending token (the fallback, and the first window).
        Returns (window list[int], q [n, V] float32 or None when greedy)."""
        tokens, qs = [], []
        feed = self.pending
        for offset in range(n):
            logits = self._forward([feed], offset, None)[0]
            tok, q = self.sampler.pick(logits)
            tokens.append(tok)
            qs.append(q)
            feed = tok
        return tokens, self._stack(qs)

    @torch.inference_mode()
    def rollouts(self, window: list[int], exit_ids: list[list[int]], depth: int) -> int:
        """Branch-complete rollouts: for every branch (i, v) of plan_branches, extend the context
        (..., w_1..w_i, v) by `depth` draft tokens, all branches as one tree, one forward per step.
        Needs the window chain [pending, w_1..w_{n-1}] already in the region (fresh_window or an
        adopted branch). Returns the number of branches rolled out."""
        n = len(window)
        branches = plan_branches(window, exit_ids, self.max_branches)
        nb = len(branches)
        self.branches = {}
        self.window_len = n
        if nb == 0 or depth == 0:
            self._forward([window[-1]], n, None)  # w_n's KV, so that a fully accepted window commits
            return 0
        # First forward: w_n (closing the chain) and every branch root, at region offset n.
        T = n + 1 + nb
        ancestors = torch.zeros(T, T, dtype=torch.bool)
        ancestors[: n + 1, : n + 1] = torch.ones(n + 1, n + 1, dtype=torch.bool).tril()
        positions = list(range(n + 1))
        for b, (i, _) in enumerate(branches):
            row = n + 1 + b
            ancestors[row, : i + 1] = True
            ancestors[row, row] = True
            positions.append(i + 1)
        new = [window[-1]] + [v for _, v in branches]
        logits = self._forward(new, n, ancestors[n:], positions[n:])
        picks = [self.sampler.pick(logits[1 + b]) for b in range(nb)]
        slots = [[n + 1 + b] for b in range(nb)]
        outs = [[tok] for tok, _ in picks]
        qs = [[q] for _, q in picks]
        # Extensions: each branch's newest token, attending to its root's ancestors and its own path.
        for step in range(1, depth):
            base = T
            T += nb
            grown = torch.zeros(T, T, dtype=torch.bool)
            grown[:base, :base] = ancestors
            for b in range(nb):
                row = base + b
                grown[row] = grown[slots[b][-1]]
                grown[row, row] = True
                slots[b].append(row)
            ancestors = grown
            pos = [branches[b][0] + 1 + step for b in range(nb)]
            logits = self._forward([outs[b][-1] for b in range(nb)], base, ancestors[base:], pos)
            for b in range(nb):
                tok, q = self.sampler.pick(logits[b])
                outs[b].append(tok)
                qs[b].append(q)
        for b, key in enumerate(branches):
            self.branches[key] = {"slots": slots[b], "window": outs[b], "q": qs[b]}
        return nb

    @torch.inference_mode()
    def advance(self, accepted: int, next_token: int):
        """Commit the pending token and w_1..w_A; adopt branch (A, c) if it was rolled out.
        Returns (hit, window list[int] or None, q [depth, V] or None)."""
        chain = list(range(accepted + 1))
        branch = self.branches.get((accepted, int(next_token)))
        self.pending = int(next_token)
        self.step += 1
        if branch is None:
            self.cache.commit_path(chain)
            self.branches = {}
            return False, None, None
        # The branch root c and its first depth-1 tokens become the next window chain's KV.
        self.cache.gather_region(chain + branch["slots"])
        self.cache.commit(len(chain))
        self.branches = {}
        return True, branch["window"], self._stack(branch["q"])

    # --- helpers -------------------------------------------------------------------------------

    def _forward(self, ids, offset, mask, positions=None):
        """Feed ids at region offset `offset` (chain when mask is None); logits [len(ids), V]."""
        model, base = self.model, self.cache.length
        dev = model.device
        pos = None if positions is None else torch.tensor([[base + p for p in positions]], device=dev)
        m = None if mask is None else mask[None].to(dev)
        h = model.run_layers(model.embed(torch.tensor([ids], device=dev)), 0, model.num_layers, self.cache,
                             pos, m, offset)
        logits = model.head(h)[0]
        check_finite(logits, "draft", self.step)
        return logits

    @staticmethod
    def _stack(qs):
        return None if not qs or qs[0] is None else torch.stack(qs)
