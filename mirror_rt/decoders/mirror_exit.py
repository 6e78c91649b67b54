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
while the full LM head costs as much as half the target's prefix on a small model (SmolLM2-135M:
49k rows against 15 layers). Only the logit lens and ``ExitHead`` can be restricted; any other
callable exit head is used as given (full vocabulary).
"""
from __future__ import annotations

import math

import torch

from mirror_rt import ops
from mirror_rt.decoders.mirror_draft import max_branches_for

POLICIES = ("per_position", "ranked")


def draft_vocabulary(draft, prompt: torch.Tensor):
    """The draft's vocabulary for this prompt (int64 target ids), or None when it has the full one."""
    fn = getattr(draft, "context_vocab", None)
    return None if fn is None else fn(prompt)


class ExitProposer:
    """Exit head + branch policy for one generation.

    target      the target model (its final norm and LM head serve the logit lens)
    head        None (logit lens), an ``ExitHead``, or any callable hidden [1, T, H] -> logits [1, T, V]
    kappa       candidates per position ("per_position"); the budget is (depth + 1) * kappa ("ranked")
    vocab_ids   int64 [Vc] target ids the exit may propose, or None for the full vocabulary
    max_branches  the user's cap (None: none); "ranked" keeps the best that many (and no more than
                fit one rollout tree of ``depth``), "per_position" leaves the cap to the tree
                builder (first positions first)
    depth       rollout depth per branch (the window), for what fits one tree
    min_prob    "ranked" drops branches whose estimated P(A = i, c = v) is below this: a rollout
                that is almost never adopted still costs draft time (0: fill the budget)
    """

    def __init__(self, target, head, kappa: int, policy: str = "ranked", vocab_ids=None, max_branches=None,
                 depth: int = 7, min_prob: float = 0.0):
        if policy not in POLICIES:
            raise ValueError(f"branch_policy must be one of {POLICIES}, got {policy!r}")
        self.target, self.head, self.kappa, self.policy = target, head, kappa, policy
        self.max_branches, self.depth = max_branches, depth
        self.log_floor = math.log(min_prob) if min_prob > 0 else -math.inf
        restrictable = head is None or hasattr(head, "normed")
        self.vocab_ids = vocab_ids.to(target.device) if vocab_ids is not None and restrictable else None
        self.sub_weight = None
        if self.vocab_ids is not None:
            self.sub_weight = target.lm_head.weight.detach()[self.vocab_ids]

    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [1, T, H] at layer l_e -> float32 [T, Vc] exit log-probabilities over the exit
        vocabulary (column c is target id vocab_ids[c]; the full vocabulary when vocab_ids is None)."""
        if self.sub_weight is None:
            logits = self.head(hidden) if self.head is not None else self.target.head(hidden)
        else:
            normed = self.head.normed(hidden) if self.head is not None else self.target.norm(hidden)
            logits = ops.linear(normed.to(self.sub_weight.dtype), self.sub_weight)
        return torch.log_softmax(logits[0].float(), dim=-1)

    def to_target_ids(self, columns: torch.Tensor) -> torch.Tensor:
        return columns if self.vocab_ids is None else self.vocab_ids[columns]

    def __call__(self, hidden: torch.Tensor, window: list[int]) -> list[list[int]]:
        """Branch candidates E for ``build_branch_tree``: [n + 1][k] target ids, best first per row,
        -1 where a row has fewer candidates than the longest (a hole: no branch)."""
        logp = self.log_probs(hidden)
        if self.policy == "per_position":
            k = min(self.kappa, logp.shape[-1])
            return self.to_target_ids(torch.topk(logp, k, dim=-1).indices).cpu().tolist()
        return self.ranked(logp, window)

    def ranked(self, logp: torch.Tensor, window: list[int]) -> list[list[int]]:
        n = len(window)
        # (window + 1) * kappa even when this step's window is shorter (the last step, or an empty
        # window after a miss): the draft has the same time for them under the target's suffix.
        budget = min((self.depth + 1) * self.kappa, max_branches_for(n, self.depth, self.max_branches))
        if budget == 0:
            return [[-1] for _ in range(n + 1)]
        k = min(budget + 1, logp.shape[-1])  # +1: one of a row's top ids may be the window's own token
        top_lp, top_col = torch.topk(logp, k, dim=-1)
        top_ids = self.to_target_ids(top_col)
        log_reach = torch.zeros(n + 1)
        score = top_lp.cpu()
        if n:
            w = torch.tensor(window, device=logp.device)
            cols = self.columns_of(w)
            accept_lp = torch.where(cols >= 0, logp[torch.arange(n), cols.clamp(min=0)], -torch.inf)
            log_reach[1:] = torch.cumsum(accept_lp.cpu(), 0)
            score[:n][(top_ids[:n] == w[:, None]).cpu()] = -torch.inf  # branch (i, w_{i+1}) is the window itself
        score += log_reach[:, None]
        flat = torch.topk(score.flatten(), min(budget, score.numel()))
        rows = [[] for _ in range(n + 1)]
        for s, f in sorted(zip(flat.values.tolist(), flat.indices.tolist()), key=lambda t: t[1]):
            if s > self.log_floor:
                rows[f // k].append(int(top_ids[f // k, f % k]))  # row order = rank order (index-sorted)
        width = max(1, max(len(r) for r in rows))
        return [r + [-1] * (width - len(r)) for r in rows]

    def columns_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Exit-vocabulary column of each target id, -1 where the id is outside it."""
        if self.vocab_ids is None:
            return ids
        match = self.vocab_ids[None, :] == ids[:, None]
        return torch.where(match.any(-1), match.int().argmax(-1), -1)
