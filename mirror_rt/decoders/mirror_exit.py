"""Mirror-SD's early exit, on the target's side: which branches the draft rolls out this step.

After the target's prefix (layers [0, l_e)) the exit head scores every window position
i = 0..n (row i follows w_1..w_i). A branch (i, v) says "the draft's w_1..w_i are accepted and the
target's correction is v"; the draft precomputes its continuation while the target finishes.
Two policies choose the branches (``MirrorConfig.branch_policy``):

* ``"per_position"`` -- the paper's M_t: the exit's top-kappa ids at every position.
* ``"ranked"`` -- a budget of (window + 1) * kappa branches (what per_position spends on a full
  window), given to the pairs (i, v) with the highest estimated probability that the step ends
  exactly there,

      P(A = i, c = v)  ~  reach_i * p_i(v),   reach_i = prod_{j < i} p_j(w_{j+1}),

  where p_j is the exit head's distribution: its own estimate that w_1..w_i are accepted, times
  its estimate of the correction. When the draft is often rejected early, nearly every reuse hit
  is at i = 0, and this policy spends the branches there instead of on positions the step
  rarely reaches.

Either way the branches only decide which continuations are ready in advance: the output is
the target's (lossless).

Exit vocabulary: with a reduced-vocabulary draft (our SS draft: 8k trained ids + the prompt's
tokens), the exit scores only the draft's vocabulary, ``vocab_ids``. The draft can still take any
token as a branch root, but a correction outside its vocabulary is rare and rarely predicted,
while the full LM head of a small model with a large vocabulary costs a good part of the target's
prefix (bench/RESULTS.md, "Why the defaults": exit vocabulary). Only the logit lens and ``ExitHead`` can be
restricted; any other callable exit head is used as given (full vocabulary).
"""
from __future__ import annotations

import math

import torch

from mirror_rt import ops
from mirror_rt.decoders.mirror_config import POLICIES
from mirror_rt.decoders.mirror_draft import max_branches_for


def draft_vocabulary(draft, prompt: torch.Tensor):
    """The draft's vocabulary for this prompt (int64 target ids), or None when it has the full one."""
    fn = getattr(draft, "context_vocab", None)
    return None if fn is None else fn(prompt)


class ExitProposer:
    """Exit head + branch policy for one generation.

    target      the target model (its final norm and LM head serve the logit lens)
    head        None (logit lens), an ``ExitHead``, or any callable hidden [1, T, H] -> logits [1, T, V]
    plan        the default limits of each call (a ``planner.Plan``; a call's own plan wins):
                ``kappa``, candidates per position ("per_position"; "ranked" spends a budget of
                (window + 1) * kappa); ``window``, the rollout depth per branch (what fits one tree
                depends on it); ``max_branches``, the cap ("ranked" keeps the best that many,
                "per_position" leaves the cap to the tree builder, first positions first);
                ``min_branch_prob``: "ranked" drops branches whose estimated P(A = i, c = v) is
                below it, since a rollout that is almost never adopted still costs draft time
    policy      "ranked" or "per_position"
    vocab_ids   int64 [Vc] target ids the exit may propose, or None for the full vocabulary
    """

    def __init__(self, target, head, plan, policy: str = "ranked", vocab_ids=None):
        if policy not in POLICIES:
            raise ValueError(f"branch_policy must be one of {POLICIES}, got {policy!r}")
        self.target, self.head, self.kappa, self.policy = target, head, plan.kappa, policy
        self.depth, self.max_branches = plan.window, plan.max_branches
        self.log_floor = math.log(plan.min_branch_prob) if plan.min_branch_prob > 0 else -math.inf
        restrictable = head is None or hasattr(head, "normed")
        self.vocab_ids = vocab_ids.to(target.device) if vocab_ids is not None and restrictable else None
        self._sub_weight = None

    @property
    def sub_weight(self):
        """The LM head's rows of the exit vocabulary, taken at the first exit: a request that ends
        before Mirror-SD's first step (the draft's lane still starting) never copies them."""
        if self._sub_weight is None and self.vocab_ids is not None:
            self._sub_weight = self.target.lm_head.weight.detach()[self.vocab_ids]
        return self._sub_weight

    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [1, T, H] at layer l_e -> float32 [T, Vc] exit log-probabilities over the exit
        vocabulary (column c is target id vocab_ids[c]; the full vocabulary when vocab_ids is None)."""
        if self.vocab_ids is None:
            logits = self.head(hidden) if self.head is not None else self.target.head(hidden)
        else:
            normed = self.head.normed(hidden) if self.head is not None else self.target.norm(hidden)
            logits = ops.linear(normed.to(self.sub_weight.dtype), self.sub_weight)
        return torch.log_softmax(logits[0].float(), dim=-1)

    def to_target_ids(self, columns: torch.Tensor) -> torch.Tensor:
        return columns if self.vocab_ids is None else self.vocab_ids[columns]

    def __call__(self, hidden: torch.Tensor, window: list[int], plan=None) -> torch.Tensor:
        """Branch candidates E for ``build_branch_tree``: int64 [n + 1, k] target ids on the device,
        best first per row, -1 where a row has fewer candidates than k (a hole: no branch).
        plan: this step's ``planner.Plan`` (its kappa, branch cap and floor), or None for the
        proposer's own. Vectorised: nothing is read on the host."""
        kappa, cap, floor, depth = self.kappa, self.max_branches, self.log_floor, self.depth
        if plan is not None:
            kappa, cap, depth = plan.kappa, plan.max_branches, plan.window
            floor = math.log(plan.min_branch_prob) if plan.min_branch_prob > 0 else -math.inf
        logp = self.log_probs(hidden)
        if self.policy == "per_position":
            k = min(kappa, logp.shape[-1])
            return self.to_target_ids(torch.topk(logp, k, dim=-1).indices)
        return self.ranked(logp, window, kappa * (depth + 1), max_branches_for(len(window), depth, cap), floor)

    def ranked(self, logp: torch.Tensor, window: list[int], budget: int, fit: int, log_floor: float) -> torch.Tensor:
        """The best ``min(budget, fit)`` branches by estimated P(A = i, c = v). budget: (depth + 1) *
        kappa even when this step's window is shorter (the last step, or an empty window after a
        miss): the draft has the same time for them under the target's suffix; fit: what one
        rollout tree holds."""
        n, dev = len(window), logp.device
        budget = min(budget, fit)
        if budget == 0:
            return torch.full((n + 1, 1), -1, dtype=torch.int64, device=dev)
        k = min(budget + 1, logp.shape[-1])  # +1: one of a row's top ids may be the window's own token
        top_lp, top_col = torch.topk(logp, k, dim=-1)
        top_ids = self.to_target_ids(top_col)
        score = top_lp.clone()
        if n:
            w = torch.tensor(window, device=dev)
            cols = self.columns_of(w)
            accept_lp = torch.where(cols >= 0, logp[torch.arange(n, device=dev), cols.clamp(min=0)], -torch.inf)
            score[1:] += torch.cumsum(accept_lp, 0)[:, None]  # log reach_i = sum_{j < i} log p_j(w_{j+1})
            score[:n] = score[:n].masked_fill(top_ids[:n] == w[:, None], -torch.inf)  # (i, w_{i+1}): the window
        flat = torch.topk(score.flatten(), min(budget, score.numel()))
        chosen = torch.zeros(score.numel(), dtype=torch.bool, device=dev)
        chosen[flat.indices] = flat.values > log_floor
        chosen = chosen.view_as(score)
        # chosen ids first in each row, in rank order; holes (-1) after them
        order = torch.sort((~chosen).to(torch.int8), dim=-1, stable=True).indices
        return torch.where(chosen, top_ids, -1).gather(-1, order)

    def columns_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Exit-vocabulary column of each target id, -1 where the id is outside it."""
        if self.vocab_ids is None:
            return ids
        match = self.vocab_ids[None, :] == ids[:, None]
        return torch.where(match.any(-1), match.int().argmax(-1), -1)
