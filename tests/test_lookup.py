"""Context lookup (mirror_rt/decoders/lookup.py): the index against a slow scan, and both
decoders lossless with it on every lane."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mirror_rt.decoders import AutoregressiveDecoder, MirrorConfig, MirrorDecoder, Placement, SpeculativeDecoder
from mirror_rt.decoders.lookup import ContextLookup
from mirror_rt.decoders.mirror_config import DraftOptions
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
    # plan "fixed": the lookup's own behaviour (the auto planner turns this random draft off within
    # a few steps, and the lookup with it: see the planner's "off" plans)
    cfg = MirrorConfig(exit_layer=2, kappa=4, window=5, fallback=fallback, lookup=3, plan="fixed")
    used = {}
    with MirrorDecoder(target, draft, cfg, Placement(lane=lane)) as dec:
        for name, ids in (("repeating", REPEATING),
                          ("random", torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(3)))):
            out = dec.generate(ids, 37)
            assert out.tokens.tolist() == ar_tokens(target, ids, 37)
            s = out.stats
            assert s["reuse_hits"] + s["lookup_windows"] + s["fallbacks"] <= s["steps"]
            used[name] = s["lookup_windows"]
    assert used["repeating"] > 0, used  # the context repeats: its windows come from the lookup


def test_lookup_is_greedy_only(pair):
    target, draft = pair
    sd = SpeculativeDecoder(target, draft, 3, lookup=4).generate(REPEATING, 20, temperature=1.0, seed=0)
    cfg = MirrorConfig(exit_layer=2, kappa=2, window=3, lookup=4)
    mirror = MirrorDecoder(target, draft, cfg, Placement(lane="inline")).generate(REPEATING, 20, temperature=1.0,
                                                                                  seed=0)
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
    md = MirrorDraft(draft, 4, DraftOptions(lookup=2))
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
    md = MirrorDraft(draft, 4, DraftOptions(lookup=2))
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


def cycling_target(vocab=60, cycle=20):
    """A target whose greedy next token is a fixed successor of the current one, in cycles of
    `cycle` tokens: its layers add nothing (zero output projections), its embedding is one-hot and
    its LM head scores y by whether y's predecessor is the current token. Its output repeats with
    period `cycle`, so the context lookup's copies (at most a period long) are right from the second
    period on."""
    target = random_model(0, vocab_size=vocab, num_layers=2, hidden_size=64, intermediate_size=96)
    succ = [(t // cycle) * cycle + (t % cycle + 1) % cycle for t in range(vocab)]
    with torch.no_grad():
        for layer in target.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        target.embed_tokens.weight.zero_()
        target.embed_tokens.weight[:, :vocab] = torch.eye(vocab)
        target.lm_head.weight.zero_()
        for t in range(vocab):
            target.lm_head.weight[succ[t], t] = 1.0
    return target


@pytest.fixture(scope="module")
def cycling_pair():
    return cycling_target(), random_model(1, vocab_size=60, num_layers=1)


CYCLE_PROMPT = torch.tensor([[13, 40, 7]])


@pytest.mark.parametrize("window,lookup_window", [(2, 7), (3, 9), (1, 16)])
def test_sd_copies_windows_longer_than_the_drafts_and_stays_lossless(cycling_pair, window, lookup_window):
    target, draft = cycling_pair
    ar = ar_tokens(target, CYCLE_PROMPT, 45)
    assert ar[0][:14] == [*range(8, 20), 0, 1]  # the cycle 0..19
    out = SpeculativeDecoder(target, draft, window, lookup=4, lookup_window=lookup_window).generate(CYCLE_PROMPT, 45)
    short = SpeculativeDecoder(target, draft, window, lookup=4).generate(CYCLE_PROMPT, 45)
    assert out.tokens.tolist() == short.tokens.tolist() == ar
    assert max(out.stats["accepted_hist"]) == lookup_window  # whole copies, longer than the draft's window
    assert max(short.stats["accepted_hist"]) == window
    assert out.stats["steps"] < short.stats["steps"]


@pytest.mark.parametrize("lane,fallback", [("inline", "recompute"), ("inline", "exit"), ("process", "exit")])
def test_mirror_copies_windows_longer_than_the_drafts_and_stays_lossless(cycling_pair, pair, lane, fallback):
    target, draft = cycling_pair
    cfg = MirrorConfig(exit_layer=1, kappa=3, window=3, fallback=fallback, lookup=3, lookup_window=8,
                       plan="fixed")
    with MirrorDecoder(target, draft, cfg, Placement(lane=lane)) as dec:
        out = dec.generate(CYCLE_PROMPT, 41)
        assert out.tokens.tolist() == ar_tokens(target, CYCLE_PROMPT, 41)
        assert max(out.stats["accepted_hist"]) == 8 and out.stats["lookup_windows"] > 0
        ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(5))
        assert dec.generate(ids % 60, 30).tokens.tolist() == ar_tokens(target, ids % 60, 30)
    pair_target, pair_draft = pair  # a target that does not repeat: copies get rejected, output unchanged
    with MirrorDecoder(pair_target, pair_draft, MirrorConfig(exit_layer=2, kappa=3, window=3,
                                                             fallback=fallback, lookup=3, lookup_window=8),
                       Placement(lane=lane)) as dec:
        ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 5, 6, 7, 8, 9, 10, 11, 12, 5, 6]])
        assert dec.generate(ids, 37).tokens.tolist() == ar_tokens(pair_target, ids, 37)


def test_a_copied_window_has_lookup_window_tokens_in_the_mirror_draft(pair):
    _, draft = pair
    md = MirrorDraft(draft, 2, DraftOptions(lookup=2, lookup_window=6))
    md.start([1, 2, 3, 4, 5, 6, 7, 8, 1, 2], 64)
    window, q = md.fresh_window(2)
    assert window == [3, 4, 5, 6, 7, 8] and q is None
    check_rollouts(md, draft, window, [[30 + 3 * i + r for r in range(3)] for i in range(len(window) + 1)])
    source, window, _ = md.advance(6, 1)  # all six accepted, then 1: the context repeats again
    assert source == "lookup" and window == [2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize("bad", [0, -2, 65, 2.0, "7", True])
def test_bad_lookup_windows_are_refused(bad):
    target, draft = tiny_pair()
    with pytest.raises(ValueError, match="lookup_window"):
        SpeculativeDecoder(target, draft, 3, lookup=4, lookup_window=bad)
    with pytest.raises(ValueError, match="lookup_window"):
        MirrorDecoder(target, draft, MirrorConfig(lookup=4, lookup_window=bad if bad != 65 else 33))
    assert SpeculativeDecoder(target, draft, 3, lookup=4).lookup_window == 3  # None: the draft's window


def test_context_reserve_counts_the_longer_copied_window(pair):
    target, draft = pair
    room = target.config.max_position - REPEATING.shape[1]
    SpeculativeDecoder(target, draft, 2, lookup=4).generate(REPEATING, room - 3)  # window 2 fits
    with pytest.raises(ValueError, match="context"):
        SpeculativeDecoder(target, draft, 2, lookup=4, lookup_window=9).generate(REPEATING, room - 3)
    with pytest.raises(ValueError, match="context"):
        MirrorDecoder(target, draft, MirrorConfig(exit_layer=2, window=2, lookup=4, lookup_window=9),
                      Placement(lane="inline")).generate(REPEATING, room - 3)


def test_cli_passes_the_lookup_window_to_both_decoders(pair):
    from mirror_rt.cli import build_parser, make_decoder

    target, draft = pair
    args = build_parser().parse_args(["generate", "x", "--window", "3", "--lookup-window", "7", "--lane", "inline"])
    args.exit_layer = 2
    assert make_decoder("sd", target, draft, args).lookup_window == 7
    assert make_decoder("mirror", target, draft, args).config.draft.lookup_window == 7
    args.lookup_window = 2  # below the window: the window
    assert make_decoder("sd", target, draft, args).lookup_window == 3
    args.lookup_window = 0
    assert make_decoder("mirror", target, draft, args).config.draft.lookup_window == 3


def test_cli_passes_min_draft_prob_to_both_decoders(pair):
    from mirror_rt.cli import DEFAULT_MIN_DRAFT_PROB, build_parser, make_decoder

    target, draft = pair
    args = build_parser().parse_args(["generate", "x", "--lane", "inline"])
    args.exit_layer = 2
    assert make_decoder("sd", target, draft, args).min_draft_prob == DEFAULT_MIN_DRAFT_PROB > 0
    args = build_parser().parse_args(["generate", "x", "--min-draft-prob", "0.25", "--lane", "inline"])
    args.exit_layer = 2
    assert make_decoder("sd", target, draft, args).min_draft_prob == 0.25
    assert make_decoder("mirror", target, draft, args).config.draft.min_prob == 0.25
