"""The draft's side of Mirror-SD, as a state machine that takes and returns only token ids.

It owns the draft model and its KV cache, so it can live on any lane: this thread, a worker
thread, a CUDA/NPU stream, or a second process (only ids, counts and q rows cross).

Cache layout. Committed slots hold every committed token but the pending one. After them, the
*region* holds uncommitted nodes: slot 0 the pending token, then the rollout tree of
``mirror_rt.ops.branch_tree`` (node j in slot 1 + j): the window chain w_1..w_n, one root per
branch and ``depth - 1`` extension nodes per branch, attended through one tree mask
(``mirror_rt.ops.tree_attention``). A window the draft did not roll out (a context lookup) is
not in the region: the next rollout feeds it first, with the tree.

Host reads. The tree's structure (parents, positions, mask) does not depend on the tokens the
draft samples, so it is built on the host from the exit's ids, read once per rollout batch, and
the sampled tokens stay on the draft's device; ``advance`` reads the adopted branch's window
with the batch's finiteness flag. Only with ``min_prob`` does each forward also read whether any
branch is still sure (to stop early).

Context lookup (``lookup.py``, greedy only). Before the draft model is asked for a window, the
context is looked up; a branch whose context the lookup covers is not rolled out, because
``advance`` prefers the lookup's window there anyway.
"""
from __future__ import annotations

import torch

from mirror_rt.decoders.base import Sampler, all_finite, prefill, raise_unless_finite, read_back
from mirror_rt.decoders.drafting import (checked_pick, roll_chain, set_draft_context, stack_q, stop_when_unsure,
                                        sure_rows, uses_streams)
from mirror_rt.decoders.lookup import ContextLookup
from mirror_rt.ops.branch_tree import build_branch_tree, extend_branch_tree
from mirror_rt.ops.checks import MAX_TREE_NODES


def max_branches_for(window: int, depth: int, cap: int | None, nodes: int = MAX_TREE_NODES) -> int:
    """How many branches fit one tree of at most `nodes` nodes (window chain + depth per branch)."""
    fit = (min(nodes, MAX_TREE_NODES) - (window + 1)) // max(depth, 1)
    return max(0, min(fit, cap if cap is not None else fit))


def branch_list(window: list[int], exit_rows: list[list[int]], limit: int) -> list[tuple[int, int]]:
    """Branches (i, v) in ``build_branch_tree``'s order: position, then rank; holes and the window's
    own token skipped; the first `limit`."""
    out = [(i, v) for i, row in enumerate(exit_rows) for v in row
           if v >= 0 and not (i < len(window) and v == window[i])]
    return out[:limit]


class _Rollout:
    """One rollout batch's results, on the draft's device: tokens [nb, d], q [nb, d, V] or None,
    sure [nb, d] bool, finite (0-d bool), and the host's branch index {(i, v): k}."""

    def __init__(self, tree, branches):
        self.tree, self.index = tree, {b: k for k, b in enumerate(branches)}
        self.tokens, self.qs, self.sure, self.finite = [], [], [], []

    def add(self, tokens, q, sure, finite):
        self.tokens.append(tokens)
        self.qs.append(q)
        self.sure.append(sure)
        self.finite.append(finite)

    def alive(self) -> torch.Tensor:
        """0-d bool: some branch is sure of every token so far (a deeper token could still count)."""
        return torch.stack(self.sure, 1).all(1).any()

    def window_of(self, k: int):
        """(device tokens [d], sure [d], q [d, V] or None) of branch k."""
        q = None if self.qs[0] is None else torch.stack([q[k] for q in self.qs])
        return torch.stack([t[k] for t in self.tokens]), torch.stack([s[k] for s in self.sure]), q

    def path(self, k: int, accepted: int) -> list[int]:
        """Region slots of branch k's context: pending, w_1..w_A, root, one node per extension."""
        n, nb, depth = self.tree.gamma, len(self.index), len(self.tokens)
        return [0] + [1 + j for j in range(accepted)] + [1 + n + k + s * nb for s in range(depth)]


class MirrorDraft:
    """window: the longest window (and rollout depth); options: a ``DraftOptions`` (lookup,
    lookup_window, min_prob, max_branches; None: the defaults)."""

    def __init__(self, model, window: int, options=None):
        from mirror_rt.decoders.mirror_config import DraftOptions

        options = DraftOptions() if options is None else options
        self.model = model
        self.min_prob = options.min_prob  # a window ends before the first token the draft is less sure of
        self.window = window
        self.lookup_window = window if options.lookup_window is None else options.lookup_window
        self.max_branches = options.max_branches  # the user's cap; what fits one tree is applied per step
        self.lookup_ngram = options.lookup  # 0: no context lookup
        self.cache = None
        self.pending = None
        self.batch = None  # the last rollout batch
        self.step = 0

    @property
    def tree(self):
        return None if self.batch is None else self.batch.tree

    @property
    def outs(self) -> list[list[int]]:
        """Each branch's window of the last rollout batch, as lists (reads the device: for inspection)."""
        return [self._read_window(self.batch, k)[0] for k in range(len(self.batch.index))]

    # --- calls a lane runs ---------------------------------------------------------------------

    @torch.inference_mode()
    def start(self, prompt: list[int], capacity: int, sampling=(0.0, 0, 1.0), seed=None):
        """Begin a generation: prefill all prompt tokens but the last (the pending token).
        capacity: committed tokens the cache must hold (the region's tree comes on top).
        sampling: (temperature, top_k, top_p)."""
        need = min(capacity + MAX_TREE_NODES, self.model.config.max_position)
        if self.cache is None or self.cache.max_len < need:
            self.cache = self.model.new_cache(need)
        self.cache.rollback(0)
        # The draft draws its own samples: seed it apart from the target's sampler.
        self.sampler = Sampler(*sampling, None if seed is None else seed + 1, self.model.device)
        self.step = 0
        prompt_ids = torch.tensor(prompt, device=self.model.device)
        set_draft_context(self.model, prompt_ids)
        prefill(self.model, self.cache, prompt_ids)
        self.pending, self.batch = prompt[-1], None
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
            return tokens, stack_q(qs)
        first = torch.tensor([self.pending], device=self.model.device)
        window, q = roll_chain(lambda ids, offset: self._forward(ids, offset, None)[0], first, n, self.sampler,
                               self.min_prob, self.step)
        return window, (q if window else None)

    @torch.inference_mode()
    def rollouts(self, window: list[int], exit_ids, depth: int) -> int:
        """Branch-complete rollouts: every branch (i, v), v in E_i, v != w_{i+1}, continues the
        context (..., w_1..w_i, v) by `depth` draft tokens; all branches form one tree
        (``mirror_rt.ops.branch_tree``), one draft forward per rollout step. exit_ids: [n + 1, k]
        ids (a tensor on any device, a numpy array or lists), -1 for holes. Needs the window chain [pending,
        w_1..w_{n-1}] in the region already when the draft rolled the window out; otherwise (an
        empty window after a miss under ``fallback="exit"``, or a context lookup's window) the
        pending token and the window are fed here first. Returns the number of branches."""
        n = len(window)
        self.rolled = list(window)
        rows = exit_ids if isinstance(exit_ids, list) else exit_ids.tolist()  # the batch's one read
        rows = self._without_looked_up(window, rows)
        # Near the end of the draft's context the cache's free slots, not MAX_TREE_NODES, bound the tree.
        fit = max_branches_for(n, depth, self.max_branches, self.cache.max_len - self.cache.length)
        branches = branch_list(window, rows, fit)
        tree = build_branch_tree(torch.tensor(window, dtype=torch.long), _rows_tensor(rows, n), max_branches=fit,
                                 capacity=n + fit * max(depth, 1))
        batch, nb = _Rollout(tree, branches), len(branches)
        assert nb == tree.num_branches, "branch_list must follow build_branch_tree's order"
        self.batch = batch
        # Region slot 0 holds the pending token (every node's ancestor), tree node j is slot 1 + j.
        # First forward: w_n (closing the window chain, tree node n-1) and every branch root; or,
        # without the chain in the region, the pending token and every node from w_1 on.
        if n and self.chain_fed:
            logits, roots = self._tree_forward(tree, n - 1), 1
        else:
            logits, roots = self._tree_forward(tree, 0, with_pending=True), 1 + n
        if nb == 0:
            batch.finite.append(all_finite(logits))
            return 0
        self._draw(batch, logits[roots:roots + nb])
        for _ in range(1, depth):
            if self.min_prob > 0:  # every branch's window is cut already: nothing more counts
                alive, finite = read_back(batch.alive(), torch.stack(batch.finite).all())
                raise_unless_finite(finite, "draft", self.step)
                if not alive:
                    break
            extend_branch_tree(tree, torch.zeros(nb, dtype=torch.long))  # structure only: tokens stay on device
            self._draw(batch, self._tree_forward(tree, tree.step_start, ids=batch.tokens[-1]))
        return nb

    @torch.inference_mode()
    def advance(self, accepted: int, next_token: int):
        """Commit the pending token and w_1..w_A; adopt branch (A, c) if it was rolled out.
        Returns (source, window list[int] or None, q [depth, V] or None): source "lookup" when the
        context lookup gives the next window, "branch" when branch (A, c) was rolled out, None (a
        miss: the caller asks for ``fresh_window`` or goes on without a window)."""
        batch, self.batch = self.batch, None
        self.tokens += self.rolled[:accepted] + [int(next_token)]
        self.pending = int(next_token)
        self.step += 1
        copied = self._look_up([], self.lookup_window)
        k = batch.index.get((accepted, int(next_token)), -1) if batch is not None and not copied else -1
        if k < 0:
            if batch is not None:
                raise_unless_finite(read_back(torch.stack(batch.finite).all())[0], "draft", self.step - 1)
            self.cache.commit_path(range(accepted + 1))
            self.chain_fed = False
            return ("lookup", copied, None) if copied else (None, None, None)
        # Pending + the branch's path (w_1..w_A, root c, its rollouts) become a chain; the first
        # A + 1 are committed, the rest ([c, r_1..r_{depth-1}]) is the next window's region.
        window, q = self._read_window(batch, k)
        self.cache.gather_region(batch.path(k, accepted))
        self.cache.commit(accepted + 1)
        self.chain_fed = True
        return "branch", window, q

    # --- helpers -------------------------------------------------------------------------------

    def _draw(self, batch: _Rollout, logits):
        tokens, q = self.sampler.draw(logits)
        batch.add(tokens, q, sure_rows(logits, self.min_prob), all_finite(logits))

    def _read_window(self, batch: _Rollout, k: int):
        """Branch k's window up to its first unsure token, and its q rows: one read (with the batch's
        finiteness, raised here)."""
        tokens, sure, q = batch.window_of(k)
        tokens, sure, finite = read_back(tokens, sure, torch.stack(batch.finite).all())
        raise_unless_finite(finite, "draft", self.step)
        cut = sure.index(0) if 0 in sure else len(sure)
        return tokens[:cut], (None if q is None or cut == 0 else q[:cut])

    def _look_up(self, tail: list[int], n: int) -> list[int]:
        """The context lookup's window after the committed tokens + tail ([] without one)."""
        if self.lookup is None:
            return []
        self.lookup.update(self.tokens)
        return self.lookup.propose(tail, n)

    def _without_looked_up(self, window: list[int], exit_rows: list[list[int]]) -> list[list[int]]:
        """exit_rows with a hole (-1) for every branch (i, v) whose context the lookup covers."""
        if self.lookup is None:
            return exit_rows
        self.lookup.update(self.tokens)
        return [[v if v < 0 or not self.lookup.propose(window[:i] + [v], 1) else -1 for v in row]
                for i, row in enumerate(exit_rows)]

    def _tree_forward(self, tree, first: int, with_pending: bool = False, ids=None):
        """Draft forward of tree nodes [first, num_nodes) (region slots 1 + j): logits [Tq, V].
        ids: the nodes' tokens on the device (default: the tree's own). with_pending: an empty
        window; the pending token (region slot 0, every root's parent) is fed in the same forward,
        as row 0 of the logits."""
        rows = slice(first, tree.num_nodes)
        mask = tree.dense_mask(first, tree.num_nodes)
        mask = torch.cat([torch.ones(mask.shape[0], 1, dtype=torch.bool), mask], dim=1)  # the pending slot
        ids = tree.tokens[rows] if ids is None else ids
        positions = 1 + tree.positions[rows]
        if not with_pending:
            return self._forward(ids, 1 + first, mask, positions)
        pending_row = torch.zeros(1, mask.shape[1], dtype=torch.bool)
        pending_row[0, 0] = True
        ids = torch.cat([torch.tensor([self.pending]), ids])
        return self._forward(ids, first, torch.cat([pending_row, mask]), torch.cat([torch.zeros(1, dtype=torch.long),
                                                                                      positions]))

    def _forward(self, ids: torch.Tensor, offset: int, mask, positions=None):
        """Feed ids [k] at region offset `offset` (a chain when mask is None) -> logits [k, V].
        positions: [k] region positions (host or device)."""
        model, dev = self.model, self.model.device
        pos = None if positions is None else (self.cache.length + positions.to(dev))[None]
        m = None if mask is None else mask[None].to(dev)
        h = model.run_layers(model.embed(ids.to(dev)[None]), 0, model.num_layers, self.cache, pos, m, offset)
        return model.head(h)[0]


def _rows_tensor(rows: list[list[int]], n: int) -> torch.Tensor:
    """Exit rows as an int64 [n + 1, k] host tensor (-1 padded; one hole column when all are empty)."""
    width = max(1, max((len(r) for r in rows), default=1))
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows] or [[-1]] * (n + 1), dtype=torch.long)
