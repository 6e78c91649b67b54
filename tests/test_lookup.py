"""Context lookup (mirror_rt/decoders/lookup.py): the index against a slow scan, and both
decoders lossless with it on every lane."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mirror_rt.decoders import AutoregressiveDecoder, MirrorConfig, MirrorDecoder, SpeculativeDecoder
from mirror_rt.decoders.lookup import ContextLookup
from mirror_rt.decoders.mirror_draft import MirrorDraft
from mirror_rt.models.derive import random_model
from mirror_helpers import tiny_pair


def lookup_ref(tokens, tail, max_ngram, count):
    """The slow, obvious lookup: scan the committed tokens backwards for the longest suffix of
    tokens + tail that occurs with something after it."""
    context = list(tokens) + list(tail)
    for n in range(min(max_ngram, len(context)), 0, -1):
        key = context[-n:]
        for s in range(len(tokens) - n - 1, -1, -1):
            if tokens[s:s + n] == key:
                return tokens[s + n:s + n + count]
    return []


@settings(max_examples=200, deadline=None)
@given(tokens=st.lists(st.integers(0, 5), min_size=0, max_size=40), tail=st.lists(st.integers(0, 5), max_size=3),
       max_ngram=st.integers(1, 5), count=st.integers(0, 6), cut=st.integers(0, 40))
def test_index_matches_a_backward_scan(tokens, tail, max_ngram, count, cut):
    lookup = ContextLookup(max_ngram)
    lookup.update(tokens[:cut])  # indexed in two pieces, as a generation grows
    lookup.update(tokens)
    assert lookup.propose(tail, count) == lookup_ref(tokens, tail, max_ngram, count)


def test_a_new_sequence_starts_the_index_again():
    lookup = ContextLookup(2)
    lookup.update([1, 2, 3, 1, 2])
    assert lookup.propose([], 4) == [3, 1, 2]
    lookup.update([7, 8, 9, 7])  # not an extension: a new generation
    assert lookup.propose([], 4) == [8, 9, 7]
    assert lookup.propose([5], 4) == []


@pytest.mark.parametrize("bad", [0, -1, 17, 2.5, "4"])
def test_bad_ngram_lengths_are_refused(bad):
    target, draft = tiny_pair()
    with pytest.raises(ValueError, match="n-gram"):
        ContextLookup(bad)
    if bad:
        with pytest.raises(ValueError, match="n-gram"):
            SpeculativeDecoder(target, draft, 3, lookup=bad)
        with pytest.raises(ValueError, match="n-gram"):
            MirrorDecoder(target, draft, MirrorConfig(lookup=bad))


REPEATING = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6]])


@pytest.fixture(scope="module")
def pair():
    return tiny_pair(layers=4)


def ar_tokens(target, ids, n):
    return AutoregressiveDecoder(target).generate(ids, n).tokens.tolist()


@pytest.mark.parametrize("window", [1, 3, 7])
def test_sd_with_lookup_is_lossless_and_uses_it(pair, window):
    target, draft = pair
    out = SpeculativeDecoder(target, draft, window, lookup=4).generate(REPEATING, 40)
    assert out.tokens.tolist() == ar_tokens(target, REPEATING, 40)
    assert out.stats["lookup_windows"] > 0


@pytest.mark.parametrize("lane,fallback", [("inline", "recompute"), ("inline", "exit"), ("thread", "recompute"),
                                           ("process", "exit")])
def test_mirror_with_lookup_is_lossless_and_uses_it(pair, lane, fallback):
    target, draft = pair
    cfg = MirrorConfig(exit_layer=2, top_k=4, window=5, lane=lane, fallback=fallback, lookup=3)
    with MirrorDecoder(target, draft, cfg) as dec:
        for ids in (REPEATING, torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(3))):
            out = dec.generate(ids, 37)
            assert out.tokens.tolist() == ar_tokens(target, ids, 37)
            s = out.stats
            assert s["reuse_hits"] + s["lookup_windows"] + s["fallbacks"] <= s["steps"]
    assert s["lookup_windows"] > 0


def test_lookup_is_greedy_only(pair):
    target, draft = pair
    sd = SpeculativeDecoder(target, draft, 3, lookup=4).generate(REPEATING, 20, temperature=1.0, seed=0)
    cfg = MirrorConfig(exit_layer=2, top_k=2, window=3, lane="inline", lookup=4)
    mirror = MirrorDecoder(target, draft, cfg).generate(REPEATING, 20, temperature=1.0, seed=0)
    assert sd.stats["lookup_windows"] == 0 and mirror.stats["lookup_windows"] == 0


def test_a_repeating_target_is_caught_by_the_lookup_not_a_random_draft():
    """A target that copies its input two tokens back repeats the context; a random draft does not.
    With the lookup, SD accepts nearly every window."""
    target = random_model(0, vocab_size=32, num_layers=2)
    prompt = torch.tensor([[3, 9, 3, 9, 3]])
    ar = ar_tokens(target, prompt, 30)
    draft = random_model(1, vocab_size=32, num_layers=1)
    plain = SpeculativeDecoder(target, draft, 4).generate(prompt, 30)
    looked = SpeculativeDecoder(target, draft, 4, lookup=4).generate(prompt, 30)
    assert plain.tokens.tolist() == looked.tokens.tolist() == ar
    # the greedy output of a random model falls into a loop; after it, every lookup window is right
    assert looked.stats["mean_accepted"] > plain.stats["mean_accepted"]


def test_branches_the_lookup_covers_are_not_rolled_out(pair):
    _, draft = pair
    md = MirrorDraft(draft, 4, None, lookup=2)
    md.start([1, 2, 3, 4, 1, 2, 5], 64)
    window = [6, 1]
    exit_ids = [[1, 9, 3], [2, 4, -1], [5, 7, 9]]
    holes = md._without_looked_up(window, exit_ids)
    for i, row in enumerate(exit_ids):
        for v, kept in zip(row, holes[i]):
            covered = v >= 0 and lookup_ref(md.tokens, window[:i] + [v], 2, 1) != []
            assert kept == (-1 if covered or v < 0 else v)
    assert holes != exit_ids  # token 1 after the context is covered (1 -> 2 earlier)


def check_rollouts(md, draft, window, exit_ids, depth=3):
    """Every branch's rollout equals the draft's own greedy continuation of its context."""
    nb = md.rollouts(window, exit_ids, depth)
    assert nb > 0
    for b in range(nb):
        i, v = int(md.tree.branch_pos[b]), int(md.tree.branch_token[b])
        context = torch.tensor([md.tokens + window[:i] + [v]])
        assert md.outs[b] == ar_tokens(draft, context, depth)[0], (i, v)


def test_rollouts_after_a_copied_window_feed_it_first(pair):
    """A copied window was never fed to the draft: the rollouts after it (and after the branch and
    lookup windows that follow) must still continue the right contexts."""
    _, draft = pair
    md = MirrorDraft(draft, 4, None, lookup=2)
    md.start([1, 2, 3, 4, 1, 2], 64)
    window, q = md.fresh_window(4)
    assert window == [3, 4, 1, 2] and q is None  # copied from the prompt
    fresh = [[20 + 5 * i + r for r in range(2)] for i in range(5)]  # tokens not in the context
    check_rollouts(md, draft, window, fresh)
    source, window, _ = md.advance(1, fresh[1][0])  # w_1 accepted, correction = branch (1, 25)
    assert source == "branch" and md.tokens == [1, 2, 3, 4, 1, 2, 3, 25]
    check_rollouts(md, draft, window, [[40 + 5 * i + r for r in range(2)] for i in range(len(window) + 1)])
    source, window, _ = md.advance(0, 3)  # 3 occurred before: the lookup's window
    assert source == "lookup" and window == [25, 3]  # what followed the latest 3
    check_rollouts(md, draft, window, [[50 + 2 * i + r for r in range(2)] for i in range(len(window) + 1)])
