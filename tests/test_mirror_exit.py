"""Mirror-SD's exit side (decoders/mirror_exit.py): the reduced exit vocabulary scores exactly the
full head's columns, per_position is the exit's top-kappa, and the ranked policy spends its
budget where the step is estimated to end, never on the window's own tokens."""
import math

import pytest
import torch

from mirror_rt.decoders.mirror_exit import ExitProposer, draft_vocabulary
from mirror_rt.planner import Plan
from mirror_rt.exit_head import new_exit_head
from mirror_rt.models.derive import random_model
from mirror_rt.models.streaming import StreamingDraft

V = 64


def _target():
    return random_model(2, vocab_size=V, num_layers=4, hidden_size=32, intermediate_size=48, tie_embeddings=True)


@pytest.mark.parametrize("trained_head", [False, True])
def test_reduced_vocabulary_equals_full_head_columns(trained_head):
    target = _target()
    head = None
    if trained_head:
        head = new_exit_head(target, 2, rank=8)
        torch.nn.init.normal_(head.adapter.up.weight, 0, 0.3)  # not the logit lens any more
    hidden = torch.randn(1, 5, 32) * 2
    vocab = torch.tensor([3, 60, 7, 11, 42, 0, 19])
    full = ExitProposer(target, head, _plan(2), "per_position").log_probs(hidden)
    sub = ExitProposer(target, head, _plan(2), "per_position", vocab).log_probs(hidden)
    assert sub.shape == (5, len(vocab))
    # Same logits on those columns, renormalised over the subset.
    want = torch.log_softmax(full[:, vocab], dim=-1)
    torch.testing.assert_close(sub, want, atol=1e-5, rtol=1e-5)


def test_custom_exit_callable_keeps_the_full_vocabulary():
    target = _target()
    prop = ExitProposer(target, lambda h: target.head(h), _plan(2), "per_position", torch.tensor([1, 2, 3]))
    assert prop.vocab_ids is None and prop.log_probs(torch.randn(1, 2, 32)).shape == (2, V)


def test_per_position_is_top_kappa_in_target_ids():
    target = _target()
    vocab = torch.arange(10, 40)
    prop = ExitProposer(target, None, _plan(3), "per_position", vocab)
    hidden = torch.randn(1, 4, 32)
    got = prop(hidden, [12, 13, 14])
    want = vocab[torch.topk(prop.log_probs(hidden), 3, dim=-1).indices]
    assert got.tolist() == want.tolist()


def _plan(kappa):
    return Plan(window=7, kappa=kappa, max_branches=None, min_branch_prob=0.0, fallback="exit", overlap="overlapped")


class _FixedExit(ExitProposer):
    """A proposer whose exit distribution is given (log-probabilities [n+1, V])."""

    def __init__(self, logp, kappa, max_branches=None, min_prob=0.0):
        self.vocab_ids, self.kappa, self.policy, self.max_branches = None, kappa, "ranked", max_branches
        self.depth = 2  # the window length, as in a decoder: the budget is (depth + 1) * kappa
        self.log_floor = math.log(min_prob) if min_prob else -math.inf
        self.logp = logp

    def log_probs(self, hidden):
        return self.logp


def _dist(rows):
    """rows: list of {token: prob}; the rest of the mass spread thinly over the other ids."""
    out = torch.full((len(rows), V), 1e-6)
    for i, r in enumerate(rows):
        for t, p in r.items():
            out[i, t] = p
    return torch.log(out / out.sum(-1, keepdim=True))


def _rows(exit_ids):
    """The exit's [n + 1, k] id tensor as lists without the all-hole columns at the right."""
    rows = exit_ids.tolist()
    width = max(1, max(sum(v >= 0 for v in row) for row in rows))
    assert all(v < 0 for row in rows for v in row[width:])
    return [row[:width] for row in rows]


def _branches(rows):
    return sorted((i, v) for i, row in enumerate(rows) for v in row if v >= 0)


def test_ranked_spends_the_budget_where_the_step_ends():
    # The exit thinks w_1 = 5 is almost surely rejected: every branch goes to position 0.
    early = _dist([{5: 0.01, 1: 0.4, 2: 0.3, 3: 0.2, 4: 0.05}, {6: 0.9, 8: 0.1}, {9: 0.5, 10: 0.5}])
    rows = _rows(_FixedExit(early, kappa=1)(None, [5, 6]))
    assert _branches(rows) == [(0, 1), (0, 2), (0, 3)]
    assert rows[1] == [-1, -1, -1] and rows[2] == [-1, -1, -1]  # holes: no branch there
    # The exit is sure the window is accepted: the bonus position gets the branches.
    late = _dist([{5: 0.98, 1: 0.01}, {6: 0.98, 2: 0.01}, {9: 0.5, 10: 0.3, 11: 0.1}])
    assert _branches(_rows(_FixedExit(late, kappa=1)(None, [5, 6]))) == [(2, 9), (2, 10), (2, 11)]
    # A probability floor drops the unlikely ones instead of filling the budget.
    assert _branches(_rows(_FixedExit(early, kappa=1, min_prob=0.25)(None, [5, 6]))) == [(0, 1), (0, 2)]
    assert _rows(_FixedExit(early, kappa=1, min_prob=0.9)(None, [5, 6])) == [[-1], [-1], [-1]]


def test_ranked_budget_fits_one_rollout_tree():
    from mirror_rt.decoders.mirror_draft import max_branches_for

    logp = torch.log_softmax(torch.randn(8, V), dim=-1)
    prop = _FixedExit(logp, kappa=8)
    prop.depth = 7
    rows = _rows(prop(None, list(range(7))))
    assert len(_branches(rows)) == max_branches_for(7, 7, None) < 8 * 8


def test_ranked_scores_are_reach_times_correction_probability():
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(4, V, generator=g) * 3, dim=-1)
    window = [int(logp[0].argmax()), 17, int(logp[2].argmax())]
    budget = 5
    rows = _rows(_FixedExit(logp, kappa=2, max_branches=budget)(None, window))
    # Brute force over every (i, v) that is not the window itself.
    scored = []
    for i in range(4):
        reach = sum(float(logp[j, window[j]]) for j in range(i))
        for v in range(V):
            if i < 3 and v == window[i]:
                continue
            scored.append((reach + float(logp[i, v]), (i, v)))
    want = sorted(b for _, b in sorted(scored, reverse=True)[:budget])
    assert _branches(rows) == want
    for i, row in enumerate(rows):  # best first within a row, holes last
        ids = [v for v in row if v >= 0]
        assert row == ids + [-1] * (len(row) - len(ids))
        assert [float(logp[i, v]) for v in ids] == sorted((float(logp[i, v]) for v in ids), reverse=True)


def test_draft_vocabulary_is_the_ss_drafts_context_set():
    target = _target()
    draft = StreamingDraft.from_target(target, num_layers=1, n_streams=1, vocab_ids=torch.tensor([1, 2, 3]))
    prompt = torch.tensor([3, 9, 4, 9])
    assert draft_vocabulary(draft, prompt).tolist() == [1, 2, 3, 4, 9]
    assert draft_vocabulary(target, prompt) is None
    draft.set_context_tokens(prompt)
    assert draft.active_ids().tolist() == [1, 2, 3, 4, 9]
