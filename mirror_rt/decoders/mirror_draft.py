"""The draft's side of Mirror-SD, as a state machine that takes and returns only token ids.

It owns the draft model and its KV cache, so it can live on any lane: this thread, a worker
thread, a CUDA/NPU stream, or a second process (only ids, counts and q rows cross).

Cache layout. Committed slots hold every committed token but the pending one. After them, the
*region* holds uncommitted nodes: slot 0 the pending token, then the rollout tree of
``mirror_rt.ops.branch_tree`` (node j in slot 1 + j): the window chain w_1..w_n, one root per
branch and ``depth - 1`` extension nodes per branch, attended through one tree mask
(``mirror_rt.ops.tree_attention``). A window the draft did not roll out (a context lookup) is
not in the region: the next rollout feeds it first, with the tree.

Context lookup (``lookup.py``, greedy only). Before the draft model is asked for a window, the
context is looked up; a branch whose context the lookup covers is not rolled out, because
``advance`` prefers the lookup's window there anyway.
"""
from __future__ import annotations

import torch

from mirror_rt.decoders.base import Sampler, check_finite, prefill
from mirror_rt.decoders.drafting import (checked_pick, confident, confident_rows, set_draft_context,
                                        stop_when_unsure, uses_streams)
from mirror_rt.decoders.lookup import ContextLookup
from mirror_rt.ops.branch_tree import build_branch_tree, extend_branch_tree
from mirror_rt.ops.checks import MAX_TREE_NODES


def max_branches_for(window: int, depth: int, cap: int | None, nodes: int = MAX_TREE_NODES) -> int:
    """How many branches fit one tree of at most `nodes` nodes (window chain + depth per branch)."""
    fit = (min(nodes, MAX_TREE_NODES) - (window + 1)) // max(depth, 1)
    return max(0, min(fit, cap if cap is not None else fit))


class MirrorDraft:
    def __init__(self, model, window: int, max_branches: int | None, lookup: int = 0,
                 lookup_window: int | None = None, min_prob: float = 0.0):
        self.model = model
        self.min_prob = min_prob  # a window ends before the first token the draft is less sure of
        self.window = window
        self.lookup_window = window if lookup_window is None else lookup_window  # a copied window's length
        self.max_branches = max_branches  # the user's cap; what fits one tree is applied per step
        self.lookup_ngram = lookup  # 0: no context lookup
        self.cache = None
        self.pending = None
        self.tree = None  # the last rollout tree and each branch's sampled tokens / q rows
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
        prompt_ids = torch.tensor(prompt, device=self.model.device)
        set_draft_context(self.model, prompt_ids)
        prefill(self.model, self.cache, prompt_ids)
        self.pending, self.tree = prompt[-1], None
        self.tokens = list(prompt)  # committed, the pending token last
        self.rolled = []  # the window the last rollouts extended
        self.chain_fed = False  # whether the region holds [pending, w_1..w_{n-1}] of the current window
        self.lookup = ContextLookup(self.lookup_ngram) if self.lookup_ngram and self.sampler.greedy else None

    @torch.inference_mode()
    def fresh_window(self, n: int):
        """Roll out n tokens as a chain after the pending token (the fallback, and the first window).
        Returns (window list[int], q [n, V] float32 or None when greedy). A Speculative Streaming
        draft with stream proposals on gives the same tokens in fewer passes, same region.
        A context lookup's window (up to lookup_window tokens) comes first when there is one (q None:
        greedy)."""
        copied = self._look_up([], self.lookup_window) if n > 0 else []
        if copied:
            return copied, None
        self.chain_fed = True
        if n > 0 and uses_streams(self.model):
            tokens, qs, _ = self.model.propose_streams(self.cache, self.pending, n, 0,
                                                       pick=checked_pick(self.sampler, self.step),
                                                       stop=stop_when_unsure(self.min_prob))
            return tokens, self._stack(qs)
        tokens, qs = [], []
        feed = self.pending
        for offset in range(n):
            logits = self._forward([feed], offset, None)[0]
            if not confident(logits, self.min_prob):
                break
            tok, q = self.sampler.pick(logits)
            tokens.append(tok)
            qs.append(q)
            feed = tok
        return tokens, self._stack(qs)

    @torch.inference_mode()
    def rollouts(self, window: list[int], exit_ids: list[list[int]], depth: int) -> int:
        """Branch-complete rollouts: every branch (i, v), v in E_i, v != w_{i+1}, continues the
        context (..., w_1..w_i, v) by `depth` draft tokens; all branches form one tree
        (``mirror_rt.ops.branch_tree``), one draft forward per rollout step. Needs the window
        chain [pending, w_1..w_{n-1}] in the region already when the draft rolled the window out;
        otherwise (an empty window after a miss under ``fallback="exit"``, or a context lookup's
        window) the pending token and the window are fed here first. Returns the number of branches."""
        n = len(window)
        self.rolled = list(window)
        exit_ids = self._without_looked_up(window, exit_ids)
        # Near the end of the draft's context the cache's free slots, not MAX_TREE_NODES, bound the tree.
        fit = max_branches_for(n, depth, self.max_branches, self.cache.max_len - self.cache.length)
        tree = build_branch_tree(torch.tensor(window, dtype=torch.long), torch.tensor(exit_ids), max_branches=fit,
                                 capacity=n + fit * max(depth, 1))
        nb = tree.num_branches
        # Region slot 0 holds the pending token (every node's ancestor), tree node j is slot 1 + j.
        # First forward: w_n (closing the window chain, tree node n-1) and every branch root; or,
        # without the chain in the region, the pending token and every node from w_1 on.
        if n and self.chain_fed:
            logits, roots = self._tree_forward(tree, n - 1), 1
        else:
            logits, roots = self._tree_forward(tree, 0, with_pending=True), 1 + n
        picks = [self.sampler.pick(logits[roots + b]) for b in range(nb)]
        outs, qs = [[tok] for tok, _ in picks], [[q] for _, q in picks]
        sure = [[s] for s in confident_rows(logits[roots:roots + nb], self.min_prob)]
        for _ in range(1, depth if nb else 0):
            if not any(all(s) for s in sure):  # every branch's window is cut already: nothing more counts
                break
            extend_branch_tree(tree, torch.tensor([o[-1] for o in outs]))
            logits = self._tree_forward(tree, tree.step_start)
            for b, s in zip(range(nb), confident_rows(logits[:nb], self.min_prob)):
                tok, q = self.sampler.pick(logits[b])
                outs[b].append(tok)
                qs[b].append(q)
                sure[b].append(s)
        # a branch's window ends before its first token the draft was unsure of (min_prob)
        cut = [s.index(False) if False in s else len(s) for s in sure]
        self.tree = tree
        self.outs, self.qs = [o[:c] for o, c in zip(outs, cut)], [q[:c] for q, c in zip(qs, cut)]
        return nb

    @torch.inference_mode()
    def advance(self, accepted: int, next_token: int):
        """Commit the pending token and w_1..w_A; adopt branch (A, c) if it was rolled out.
        Returns (source, window list[int] or None, q [depth, V] or None): source "lookup" when the
        context lookup gives the next window, "branch" when branch (A, c) was rolled out, None (a
        miss: the caller asks for ``fresh_window`` or goes on without a window)."""
        tree, self.tree = self.tree, None
        self.tokens += self.rolled[:accepted] + [int(next_token)]
        self.pending = int(next_token)
        self.step += 1
        copied = self._look_up([], self.lookup_window)
        k = tree.find_branch(accepted, int(next_token)) if tree is not None and not copied else -1
        if k < 0:
            self.cache.commit_path(range(accepted + 1))
            self.chain_fed = False
            return ("lookup", copied, None) if copied else (None, None, None)
        # Pending + the branch's path (w_1..w_A, root c, its rollouts) become a chain; the first
        # A + 1 are committed, the rest ([c, r_1..r_{depth-1}]) is the next window's region.
        path = [0] + [1 + int(j) for j in tree.branch_nodes(k)]
        self.cache.gather_region(path)
        self.cache.commit(accepted + 1)
        self.chain_fed = True
        return "branch", self.outs[k], self._stack(self.qs[k])

    def _look_up(self, tail: list[int], n: int) -> list[int]:
        """The context lookup's window after the committed tokens + tail ([] without one)."""
        if self.lookup is None:
            return []
        self.lookup.update(self.tokens)
        return self.lookup.propose(tail, n)

    def _without_looked_up(self, window: list[int], exit_ids: list[list[int]]) -> list[list[int]]:
        """exit_ids with a hole (-1) for every branch (i, v) whose context the lookup covers."""
        if self.lookup is None:
            return exit_ids
        self.lookup.update(self.tokens)
        return [[v if v < 0 or not self.lookup.propose(window[:i] + [v], 1) else -1 for v in row]
                for i, row in enumerate(exit_ids)]

    def _tree_forward(self, tree, first: int, with_pending: bool = False):
        """Draft forward of tree nodes [first, num_nodes) (region slots 1 + j): logits [Tq, V].
        with_pending: an empty window; the pending token (region slot 0, every root's parent) is fed
        in the same forward, as row 0 of the logits."""
        rows = slice(first, tree.num_nodes)
        mask = tree.dense_mask(first, tree.num_nodes)
        mask = torch.cat([torch.ones(mask.shape[0], 1, dtype=torch.bool), mask], dim=1)  # the pending slot
        ids, positions = tree.tokens[rows].tolist(), (1 + tree.positions[rows]).tolist()
        if not with_pending:
            return self._forward(ids, 1 + first, mask, positions)
        pending_row = torch.zeros(1, mask.shape[1], dtype=torch.bool)
        pending_row[0, 0] = True
        return self._forward([self.pending] + ids, first, torch.cat([pending_row, mask]), [0] + positions)

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
