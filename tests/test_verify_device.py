"""The device chain verifier (decoders/verify.py) against the slow reference, verify_accept_ref."""
from __future__ import annotations

import pytest
import torch

from mirror_rt.decoders.base import Sampler
from mirror_rt.decoders.verify import sample_rows, verify_chain_device
from mirror_rt.ops import reference


def _chain_case(seed, n, V, peaked):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, n + 1, V, generator=g) * (4.0 if peaked else 1.0)
    q = torch.softmax(torch.randn(n, V, generator=g) * 2, -1)
    # draft tokens: often the target's argmax (so some are accepted), sometimes a draft sample
    greedy = logits[0, :n].argmax(-1)
    sampled = torch.multinomial(q, 1, generator=g)[:, 0]
    pick = torch.rand(n, generator=g) < 0.6
    window = torch.where(pick, greedy, sampled)
    node_ids = torch.cat([torch.tensor([3]), window])[None]
    uniforms = torch.rand(n + 1, generator=g)
    return node_ids, logits, q, uniforms


@pytest.mark.parametrize("mode", ["greedy", "match", "rejection"])
@pytest.mark.parametrize("n,V", [(0, 7), (1, 5), (3, 11), (6, 33)])
def test_chain_verification_equals_the_reference(mode, n, V):
    sampler = Sampler(0.0 if mode == "greedy" else 0.8, 0, 1.0, 0, "cpu")
    for seed in range(12):
        node_ids, logits, q, u = _chain_case(seed, n, V, peaked=seed % 2 == 0)
        parents = (torch.arange(n + 1, dtype=torch.int32) - 1)[None]
        draft_probs = torch.zeros(1, n + 1, V)
        draft_probs[0, :n] = q
        want_len, _, want_next = reference.verify_accept_ref(
            node_ids, parents, logits, mode, temperature=0.8, draft_probs=draft_probs, uniforms=u[None])
        got_len, got_next, ok = verify_chain_device(node_ids, logits, q, mode, sampler, u)
        assert (int(got_len), int(got_next)) == (int(want_len[0]), int(want_next[0])), (mode, n, V, seed)
        assert bool(ok)


def test_out_of_vocabulary_draft_ids_are_flagged():
    logits = torch.randn(1, 3, 5)
    _, _, ok = verify_chain_device(torch.tensor([[1, 2, 9]]), logits, None, "greedy", None)
    assert not bool(ok)


def test_sample_rows_is_sample_from_row_by_row():
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(9, 13, generator=g)
    probs[probs < 0.3] = 0.0  # zero-probability tokens at the edges must never be drawn
    u = torch.rand(9, generator=g)
    u[0], u[1] = 0.0, 0.9999999
    want = [reference.sample_from(probs[r], u[r]) for r in range(9)]
    assert sample_rows(probs, u).tolist() == want
