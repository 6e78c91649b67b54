"""Mirror-SD decoder: lossless on every lane, forced regimes, stochastic modes, real overlap."""
from __future__ import annotations

import itertools

import pytest
import torch

from mirror_rt.decoders import AutoregressiveDecoder, MirrorConfig, MirrorDecoder, Placement
from mirror_rt.decoders.mirror_config import DraftOptions
from mirror_rt.decoders.mirror_draft import MirrorDraft, max_branches_for
from mirror_rt.models.derive import random_model, truncated_copy
from mirror_rt.ops.checks import MAX_TREE_NODES
from mirror_rt.ops.reference import process_logits
from mirror_helpers import FailingDraft, SlowDraft, SlowTarget, ThreadCounting, identity_last_layer, tiny_pair

N_LAYERS = 4


@pytest.fixture(scope="module")
def pair():
    return tiny_pair(layers=N_LAYERS)


def ar_tokens(target, ids, n, eos=None):
    return AutoregressiveDecoder(target).generate(ids, n, eos_token_id=eos).tokens.tolist()


def check_consistent(out, max_new):
    """Committed tokens = sum over steps of (accepted + 1), capped by EOS / the limit."""
    s = out.stats
    committed = sum((a + 1) * c for a, c in s["accepted_hist"].items())
    assert committed >= s["new_tokens"] == out.tokens.shape[1]
    assert committed - s["new_tokens"] <= max(s["accepted_hist"])  # only the last step overshoots
    assert s["reuse_hits"] + s["fallbacks"] <= s["steps"]


GRID = list(itertools.product([1, N_LAYERS // 2, N_LAYERS - 1], [1, 2, 8], [1, 3, 7]))


@pytest.mark.parametrize("exit_layer,kappa,window", GRID)
def test_greedy_equals_autoregressive_inline(pair, exit_layer, kappa, window):
    target, draft = pair
    torch.manual_seed(exit_layer * 100 + kappa * 10 + window)
    ids = torch.randint(0, 64, (1, 1 + (kappa * window) % 13))
    dec = MirrorDecoder(target, draft, MirrorConfig(exit_layer=exit_layer, kappa=kappa, window=window),
                        Placement(lane="inline"))
    out = dec.generate(ids, 29)  # 29: max_new_tokens ends mid-window for most windows
    assert out.tokens.tolist() == ar_tokens(target, ids, 29)
    check_consistent(out, 29)


@pytest.mark.parametrize("policy,floor", [("per_position", 0.0), ("ranked", 0.05), ("ranked", 0.99)])
def test_every_branch_policy_is_lossless(pair, policy, floor):
    target, draft = pair
    branches = []
    for exit_layer, kappa, window in [(1, 2, 3), (3, 8, 7)]:
        ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(window))
        dec = MirrorDecoder(target, draft, MirrorConfig(plan="fixed", exit_layer=exit_layer, kappa=kappa, window=window,
                                                        branch_policy=policy, min_branch_prob=floor),
                            Placement(lane="inline"))
        out = dec.generate(ids, 29)
        assert out.tokens.tolist() == ar_tokens(target, ids, 29)
        check_consistent(out, 29)
        branches.append(out.stats["branches_per_step"])
    if floor == 0.99:  # a random model's exit is never that sure: no branch, every step falls back
        assert branches == [0.0, 0.0]


@pytest.mark.parametrize("lane", ["inline", "thread", "process"])
def test_exit_fallback_is_lossless_and_runs_empty_windows(pair, lane):
    """fallback="exit": after a miss the next step has no window; the exit's branches still give
    the draft its next window. Greedy output is AR's, every miss is followed by an empty step."""
    target, draft = pair
    for exit_layer, kappa, window, policy in [(1, 2, 3, "ranked"), (3, 8, 7, "per_position"), (2, 1, 1, "ranked")]:
        with MirrorDecoder(target, draft, MirrorConfig(plan="fixed", exit_layer=exit_layer, kappa=kappa, window=window,
                                                       branch_policy=policy, fallback="exit"),
                           Placement(lane=lane)) as dec:
            for length in (1, 6):
                ids = torch.arange(3, 3 + length)[None] % 64
                out = dec.generate(ids, 31)
                assert out.tokens.tolist() == ar_tokens(target, ids, 31), (lane, window, length)
                check_consistent(out, 31)
                s = out.stats
                assert s["fallbacks"] >= 1 and "fallback" not in s["phase_s"]  # no serial recompute
                assert s["empty_steps"] >= s["fallbacks"] - 1  # the last miss may end the run
                assert s["accepted_hist"].get(0, 0) >= s["empty_steps"]


def test_exit_fallback_with_exact_exit_never_waits(pair):
    """An exact exit head (identity last layer) contains every correction: after the first window,
    every step reuses a branch, empty-window steps included."""
    target, _ = tiny_pair(seed=3)
    identity_last_layer(target)
    _, draft = tiny_pair(seed=4)
    dec = MirrorDecoder(target, draft, MirrorConfig(plan="fixed", exit_layer=N_LAYERS - 1, kappa=1, window=3,
                                                    branch_policy="per_position", fallback="exit"),
                        Placement(lane="inline"))
    ids = torch.tensor([[7, 8, 9]])
    out = dec.generate(ids, 30)
    assert out.tokens.tolist() == ar_tokens(target, ids, 30)
    assert out.stats["fallbacks"] == 0 and out.stats["empty_steps"] == 0


@pytest.mark.parametrize("lane", ["thread", "process"])
@pytest.mark.parametrize("exit_layer,kappa,window", [(2, 8, 7), (1, 2, 3)])
def test_greedy_equals_autoregressive_on_lanes(pair, lane, exit_layer, kappa, window):
    target, draft = pair
    with MirrorDecoder(target, draft, MirrorConfig(plan="fixed", exit_layer=exit_layer, kappa=kappa, window=window),
                       Placement(lane=lane)) as dec:
        for length in (1, 5, 17):
            ids = torch.arange(length)[None] % 64
            out = dec.generate(ids, 24)
            assert out.tokens.tolist() == ar_tokens(target, ids, 24), (lane, length)
            assert out.stats["lane"] == lane


def test_draft_equal_to_target_accepts_every_window():
    target, _ = tiny_pair()
    identity_last_layer(target)
    dec = MirrorDecoder(target, target, MirrorConfig(plan="fixed", exit_layer=N_LAYERS - 1, kappa=8, window=4,
                                                    branch_policy="per_position"), Placement(lane="inline"))
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    out = dec.generate(ids, 41)
    assert out.tokens.tolist() == ar_tokens(target, ids, 41)
    s = out.stats
    full = s["accepted_hist"].get(4, 0)
    assert full >= s["steps"] - 2, s["accepted_hist"]  # all but the truncated last step(s)
    # The exit head is exact (identity last layer), so every bonus token is a rolled-out branch.
    assert s["fallbacks"] == 0 and s["reuse_hits"] == s["steps"] - 1


def test_exact_exit_head_makes_every_correction_a_hit(pair):
    target, draft = tiny_pair(seed=3)
    identity_last_layer(target)
    dec = MirrorDecoder(target, draft, MirrorConfig(plan="fixed", exit_layer=N_LAYERS - 1, kappa=1, window=3,
                                                    branch_policy="per_position"), Placement(lane="inline"))
    ids = torch.tensor([[7, 8, 9]])
    out = dec.generate(ids, 30)
    assert out.tokens.tolist() == ar_tokens(target, ids, 30)
    assert out.stats["fallbacks"] == 0
    assert out.stats["reuse_hits"] == out.stats["steps"] - 1


def test_random_draft_with_weak_exit_mostly_falls_back(pair):
    target, draft = pair
    dec = MirrorDecoder(target, draft, MirrorConfig(plan="fixed", exit_layer=1, kappa=1, window=3),
                        Placement(lane="inline"))
    ids = torch.tensor([[1, 2, 3]])
    out = dec.generate(ids, 30)
    assert out.tokens.tolist() == ar_tokens(target, ids, 30)
    s = out.stats
    assert s["mean_accepted"] < 1.0
    assert s["fallbacks"] >= 1
    assert s["reuse_hits"] + s["fallbacks"] == s["steps"] - 1


def test_eos_inside_reused_branch_stops_exactly():
    target, _ = tiny_pair()
    identity_last_layer(target)
    ids = torch.tensor([[2, 7, 1, 8]])
    ref = ar_tokens(target, ids, 40)[0]
    cut = next(i for i in range(12, 40) if ref[i] not in ref[:i]) + 1  # an EOS first seen late
    eos = ref[cut - 1]
    dec = MirrorDecoder(target, target, MirrorConfig(plan="fixed", exit_layer=N_LAYERS - 1, kappa=8, window=5,
                                                    branch_policy="per_position"), Placement(lane="inline"))
    out = dec.generate(ids, 40, eos_token_id=eos)
    assert out.tokens[0].tolist() == ref[:cut]
    assert out.stats["reuse_hits"] >= 1


def test_truncated_copy_draft_is_lossless(pair):
    target, _ = pair
    draft = truncated_copy(target, 2)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    out = MirrorDecoder(target, draft, MirrorConfig(plan="fixed"), Placement(lane="inline")).generate(ids, 33)
    assert out.tokens.tolist() == ar_tokens(target, ids, 33)


def test_branch_cap_fits_one_tree():
    assert max_branches_for(7, 7, 10) == 10
    assert max_branches_for(7, 7, 0) == 0
    for window_len in (1, 3, 7, 16):
        cap = max_branches_for(window_len, window_len, None)
        assert window_len + 1 + cap * window_len <= MAX_TREE_NODES < window_len + 1 + (cap + 1) * window_len


# --- stochastic modes follow the target distribution --------------------------------------------

def exact_two_token_distribution(target, ids):
    """P(y1, y2 | prompt) by enumeration at temperature 1: [V, V]."""
    V = target.config.vocab_size
    cache = target.new_cache(16)
    p1 = process_logits(target(ids, cache)[0, -1])
    joint = torch.zeros(V, V, dtype=torch.float64)
    for a in range(V):
        c = target.new_cache(16)
        logits = target(torch.cat([ids, torch.tensor([[a]])], 1), c)[0, -1]
        joint[a] = p1[a].double() * process_logits(logits).double()
    return joint


def chi_square(counts, probs, min_expected=5.0):
    """Pearson statistic over cells, pooling cells expected below min_expected; returns (stat, dof)."""
    n = counts.sum()
    exp = probs.flatten() * n
    obs = counts.flatten().double()
    small = exp < min_expected
    stat = (((obs[~small] - exp[~small]) ** 2) / exp[~small]).sum()
    cells = int((~small).sum())
    if small.any():
        e, o = exp[small].sum(), obs[small].sum()
        stat += (o - e) ** 2 / e
        cells += 1
    return float(stat), cells - 1


# 99.9% quantiles of chi-square for the degrees of freedom these tests can meet (scipy-free).
CHI2_999 = {d: q for d, q in zip(range(1, 41), [
    10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32, 26.12, 27.88, 29.59, 31.26, 32.91, 34.53, 36.12, 37.70,
    39.25, 40.79, 42.31, 43.82, 45.31, 46.80, 48.27, 49.73, 51.18, 52.62, 54.05, 55.48, 56.89, 58.30, 59.70,
    61.10, 62.49, 63.87, 65.25, 66.62, 67.99, 69.35, 70.70, 72.05, 73.40])}


def sample_counts(dec, ids, V, n):
    counts = torch.zeros(V, V, dtype=torch.int64)
    for seed in range(n):
        a, b = dec.generate(ids, 2, temperature=1.0, seed=seed).tokens[0].tolist()
        counts[a, b] += 1
    return counts


@pytest.fixture(scope="module")
def small_vocab_pair():
    target, draft = tiny_pair(vocab=5, layers=2, seed=11)
    with torch.no_grad():  # sharpen the target a little so that the draft is often wrong
        target.lm_head.weight.mul_(0.6)
    return target, draft


@pytest.mark.parametrize("mode", ["match", "rejection"])
def test_stochastic_modes_follow_target_distribution(small_vocab_pair, mode):
    target, draft = small_vocab_pair
    ids = torch.tensor([[1, 3]])
    probs = exact_two_token_distribution(target, ids)
    dec = MirrorDecoder(target, draft, MirrorConfig(plan="fixed", exit_layer=1, kappa=2, window=2, mode=mode),
                        Placement(lane="inline"))
    stat, dof = chi_square(sample_counts(dec, ids, 5, 1500), probs)
    assert stat < CHI2_999[dof], f"{mode}: chi-square {stat:.1f} with {dof} dof"


@pytest.mark.parametrize("mode", ["match", "rejection"])
def test_exit_fallback_follows_target_distribution(small_vocab_pair, mode):
    """fallback="exit" when sampling: the joint of tokens 2 and 3 (drawn after a miss by an
    empty-window step, or from a reused branch) is the target's."""
    target, draft = small_vocab_pair
    ids, V = torch.tensor([[1, 3]]), 5
    p1 = process_logits(target(ids, target.new_cache(16))[0, -1]).double()
    tail = torch.zeros(V, V, dtype=torch.float64)  # P(y2, y3) = sum_a p(a) p(y2 | a) p(y3 | a, y2)
    for a in range(V):
        pa = exact_two_token_distribution(target, torch.cat([ids, torch.tensor([[a]])], 1))
        tail += p1[a] * pa
    dec = MirrorDecoder(target, draft, MirrorConfig(plan="fixed", exit_layer=1, kappa=1, window=1, mode=mode,
                                                    branch_policy="per_position", fallback="exit"),
                        Placement(lane="inline"))
    counts, empty = torch.zeros(V, V, dtype=torch.int64), 0
    for seed in range(1500):
        out = dec.generate(ids, 3, temperature=1.0, seed=seed)
        _, b, c = out.tokens[0].tolist()
        counts[b, c] += 1
        empty += out.stats["empty_steps"]
    assert empty > 100  # the empty-window steps really ran
    stat, dof = chi_square(counts, tail)
    assert stat < CHI2_999[dof], f"{mode}: chi-square {stat:.1f} with {dof} dof"


def test_distribution_test_catches_a_wrong_rule(small_vocab_pair, monkeypatch):
    """The same test fails for a deliberately wrong rule: always accept the draft's token."""
    import mirror_rt.decoders.mirror as mirror_mod

    target, draft = small_vocab_pair
    ids = torch.tensor([[1, 3]])
    probs = exact_two_token_distribution(target, ids)

    def accept_everything(self, node_ids, logits, q):  # wrong: ignores the target entirely
        T = node_ids.shape[1]
        return T - 1, int(torch.multinomial(process_logits(logits[0, -1]), 1, generator=self.sampler.generator))

    monkeypatch.setattr(mirror_mod._Run, "verify", accept_everything)
    dec = MirrorDecoder(target, draft, MirrorConfig(plan="fixed", exit_layer=1, kappa=2, window=2, mode="match"),
                        Placement(lane="inline"))
    stat, dof = chi_square(sample_counts(dec, ids, 5, 1500), probs)
    assert stat > CHI2_999[dof], f"wrong rule went unnoticed: chi-square {stat:.1f} with {dof} dof"


# --- the overlap is real -------------------------------------------------------------------------

@pytest.mark.parametrize("lane", ["thread", "process"])
def test_rollouts_overlap_the_suffix(lane):
    target, draft = tiny_pair()
    slow_target = SlowTarget(target, 0.03)  # prefix + suffix: 30 ms each
    slow_draft = SlowDraft(draft, 0.01)  # 1 + window forwards per rollout: ~40 ms
    ids = torch.tensor([[1, 2, 3]])
    with MirrorDecoder(slow_target, slow_draft, MirrorConfig(plan="fixed", exit_layer=2, kappa=2, window=3),
                       Placement(lane=lane)) as dec:
        out = dec.generate(ids, 20)
    s = out.stats
    assert out.tokens.tolist() == ar_tokens(target, ids, 20)
    serial = s["phase_s"]["suffix"] + s["phase_s"]["draft"]
    overlapped = s["phase_s"]["suffix"] + s["phase_s"]["wait"]
    assert s["overlap_fraction"] > 0.4, s
    assert overlapped < 0.85 * serial, (overlapped, serial)


def test_inline_lane_has_no_overlap(pair):
    target, draft = pair
    out = MirrorDecoder(target, draft, MirrorConfig(plan="fixed"),
                        Placement(lane="inline")).generate(torch.tensor([[1, 2]]), 10)
    assert out.stats["overlap_fraction"] == 0.0


def test_draft_prefill_overlaps_the_target_prefill():
    """The draft's prefill and first window are submitted before the target prefills, so on a
    thread lane their time hides under the target's prefill."""
    target, draft = tiny_pair()
    slow_target = SlowTarget(target, 0.3)  # prefill: one run_layers call, 300 ms
    slow_draft = SlowDraft(draft, 0.04)  # start + a 3-token window: a few forwards, ~160 ms serial
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    cfg = MirrorConfig(plan="fixed", exit_layer=2, kappa=2, window=3)
    with MirrorDecoder(slow_target, slow_draft, cfg, Placement(lane="thread")) as dec:
        dec.generate(ids, 2)  # builds the lane (not timed)
        calls = slow_draft.calls
        out = dec.generate(ids, 2)
    assert out.tokens.tolist() == ar_tokens(target, ids, 2)
    s = out.stats["phase_s"]
    assert s["prefill"] >= 0.3
    assert slow_draft.calls - calls >= 3  # the draft did >= 120 ms of work before the first step...
    assert s["first_window"] < 0.05, s  # ...all of it while the target prefilled


@pytest.mark.parametrize("lane, draft_threads, steps", [("thread", None, 2), ("thread", 1, 3), ("process", None, 2)])
def test_cpu_lane_prefills_with_every_thread_then_shares_them(lane, draft_threads, steps):
    """torch's thread count is per thread: the draft's worker (thread or process) takes its share,
    the target prefills with all the caller's threads, runs each step's prefix with all of them
    too (the draft waits for the exit's branches then), its suffix with the rest while the draft's
    rollouts run (here they outlast it), and the caller gets its count back."""
    target, draft = tiny_pair()
    counted_target, counted_draft = ThreadCounting(target), ThreadCounting(draft)
    slow_draft = SlowDraft(counted_draft, 0.02)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        cfg = MirrorConfig(plan="fixed", exit_layer=2, kappa=2, window=3)
        with MirrorDecoder(counted_target, slow_draft, cfg, Placement(lane=lane, draft_threads=draft_threads)) as dec:
            out = dec.generate(ids, 12)
            assert torch.get_num_threads() == 4
        assert out.tokens.tolist() == ar_tokens(target, ids, 12)
        prefill, *step_calls = counted_target.threads
        prefixes = [t for t, start in zip(step_calls, counted_target.starts[1:]) if start == 0]
        suffixes = [t for t, start in zip(step_calls, counted_target.starts[1:]) if start >= 2]  # layer by layer
        assert prefill == 4 and set(prefixes) == {4} and set(suffixes) == {steps}
        assert suffixes and len(prefixes) + len(suffixes) == len(step_calls)  # (+ a one-token tail: all)
        if lane == "thread":  # a process lane's draft counts in its own process
            assert set(counted_draft.threads) == {4 - steps}
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("lane, shares", [("inline", False), ("thread", True)])
def test_demo_notes_when_the_draft_shares_the_targets_cores(lane, shares):
    """The demo says so when Mirror's draft took a share of the target's CPU cores (a thread or
    process lane), and says nothing when the draft runs inline."""
    from mirror_rt.demo import core_sharing_note

    target, draft = tiny_pair()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with MirrorDecoder(target, draft, MirrorConfig(plan="fixed", exit_layer=2, kappa=2, window=3),
                           Placement(lane=lane)) as dec:
            dec.generate(torch.tensor([[1, 2, 3]]), 4)
            note = core_sharing_note(dec)
    finally:
        torch.set_num_threads(before)
    assert bool(note) == shares
    assert not shares or "suffix ran on 1 of the 2 threads SD's target uses, its draft on 1" in note


@pytest.mark.parametrize("lane", ["thread", "process"])
def test_suffix_takes_every_core_once_the_rollouts_are_done(lane):
    """A slow suffix beside quick rollouts: its first layer runs on the target's share, and once the
    rollouts are done the remaining layers run on all the caller's threads."""
    target, draft = tiny_pair(layers=6)
    counted = ThreadCounting(target)
    slow = SlowTarget(counted, 0.03)  # every forward of the target sleeps: a suffix layer takes 30 ms
    # Rollouts of a known length (a few 5 ms forwards): a bare tiny draft could finish in another
    # process before the first suffix layer starts when the machine is loaded (seen once in CI).
    slow_draft = SlowDraft(draft, 0.005)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        cfg = MirrorConfig(plan="fixed", exit_layer=2, kappa=2, window=3)
        with MirrorDecoder(slow, slow_draft, cfg, Placement(lane=lane, draft_threads=2)) as dec:
            out = dec.generate(ids, 10)
            assert torch.get_num_threads() == 4
        assert out.tokens.tolist() == ar_tokens(target, ids, 10)
        suffix = [(start, t) for t, start in zip(counted.threads[1:], counted.starts[1:]) if start >= 2]
        first = [t for start, t in suffix if start == 2]  # launched right after the rollouts were submitted
        later = [t for start, t in suffix if start > 2]
        assert set(first) == {2}, suffix  # the rollouts were still running
        assert later and later.count(4) >= len(later) // 2, suffix  # they ended during a 30 ms layer
    finally:
        torch.set_num_threads(before)


def test_target_alone_after_a_lane_failure_gets_every_thread_back():
    target, draft = tiny_pair()
    counted = ThreadCounting(target)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        cfg = MirrorConfig(plan="fixed", exit_layer=2, kappa=2, window=3)
        with MirrorDecoder(counted, FailingDraft(draft, after=4), cfg, Placement(lane="thread")) as dec:
            with pytest.warns(RuntimeWarning, match="draft lane failed"):
                out = dec.generate(ids, 16)
            assert torch.get_num_threads() == 4
        assert out.tokens.tolist() == ar_tokens(target, ids, 16)
        assert out.stats["draft_failures"] == 1 and counted.threads[-1] == 4  # the AR tail: all threads
        assert 2 in counted.threads  # steps before the failure shared the cores
    finally:
        torch.set_num_threads(before)


def test_rollouts_shrink_to_the_draft_cache_near_the_end_of_its_context():
    """A draft whose context nearly runs out (its cache cannot hold a full rollout tree on top of
    the committed tokens) rolls out fewer branches instead of failing the lane."""
    import warnings

    target = random_model(seed=0, num_layers=4, max_position=64)
    draft = truncated_copy(target, 1)
    ids = torch.randint(0, 64, (1, 37), generator=torch.Generator().manual_seed(0))
    dec = MirrorDecoder(target, draft, MirrorConfig(plan="fixed", exit_layer=2, kappa=2, window=3),
                        Placement(lane="inline"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed lane warns: make it fail the test
        out = dec.generate(ids, 20)  # 37 + 20 + 4 slack: 3 context slots left, a tree needs more
    assert out.tokens.tolist() == ar_tokens(target, ids, 20)
    assert "draft_failures" not in out.stats and out.stats["branches"] > 0


@pytest.mark.parametrize("mode", ["match", "rejection"])
def test_unsure_draft_windows_follow_target_distribution(small_vocab_pair, mode):
    """min_draft_prob cuts fresh and branch windows (here to nothing, window 1): tokens 2 and 3 still
    follow the target's joint distribution, and both cut and whole windows ran."""
    target, draft = small_vocab_pair
    ids, V = torch.tensor([[1, 3]]), 5
    p1 = process_logits(target(ids, target.new_cache(16))[0, -1]).double()
    tail = torch.zeros(V, V, dtype=torch.float64)
    for a in range(V):
        tail += p1[a] * exact_two_token_distribution(target, torch.cat([ids, torch.tensor([[a]])], 1))
    dec = MirrorDecoder(target, draft, MirrorConfig(plan="fixed", exit_layer=1, kappa=1, window=1, mode=mode,
                                                    branch_policy="per_position", min_draft_prob=0.75),
                        Placement(lane="inline"))
    counts, empty, steps = torch.zeros(V, V, dtype=torch.int64), 0, 0
    for seed in range(1500):
        out = dec.generate(ids, 3, temperature=1.0, seed=seed)
        _, b, c = out.tokens[0].tolist()
        counts[b, c] += 1
        empty, steps = empty + out.stats["empty_steps"], steps + out.stats["steps"]
    assert 100 < empty < steps - 100, (empty, steps)  # windows were cut, and others were not
    stat, dof = chi_square(counts, tail)
    assert stat < CHI2_999[dof], f"{mode}: chi-square {stat:.1f} with {dof} dof"


@pytest.mark.parametrize("lane,min_prob", [("inline", 0.3), ("inline", 0.9), ("thread", 0.5), ("process", 0.5)])
def test_greedy_with_unsure_draft_windows_equals_autoregressive(pair, lane, min_prob):
    target, draft = pair
    cfg = MirrorConfig(plan="fixed", exit_layer=2, kappa=3, window=4, min_draft_prob=min_prob, fallback="exit")
    with MirrorDecoder(target, draft, cfg, Placement(lane=lane)) as dec:
        for seed in (0, 1):
            ids = torch.randint(0, 64, (1, 6 + seed), generator=torch.Generator().manual_seed(seed))
            out = dec.generate(ids, 30)
            assert torch.equal(out.tokens, AutoregressiveDecoder(target).generate(ids, 30).tokens)
    with pytest.raises(ValueError, match="min_draft_prob"):
        MirrorDecoder(target, draft, MirrorConfig(plan="fixed", min_draft_prob=1.0))


def test_branch_windows_end_at_the_first_unsure_token(pair):
    _, draft = pair
    full, cut = MirrorDraft(draft, 4, None), MirrorDraft(draft, 4, DraftOptions(min_prob=0.2))
    exit_ids = [[7, 11], [3, -1], [9, 20], [1, 2], [5, 6]]
    for md in (full, cut):
        md.start([4, 8, 15, 16, 23], 64)
        window, _ = md.fresh_window(4)
        md.rollouts(window, exit_ids, 4)
    assert full.tree.num_branches == cut.tree.num_branches
    shorter = 0
    for b in range(full.tree.num_branches):
        i, v = int(full.tree.branch_pos[b]), int(full.tree.branch_token[b])
        ctx = full.tokens + window[:i] + [v]
        sure = []
        for tok in full.outs[b]:
            logits = draft(torch.tensor([ctx]), draft.new_cache(64))[0, -1]
            sure.append(float(torch.softmax(logits.float(), -1).max()) >= 0.2)
            ctx = ctx + [tok]
        n = sure.index(False) if False in sure else len(sure)
        assert cut.outs[b] == full.outs[b][:n]
        shorter += n < len(full.outs[b])
    assert shorter > 0  # the test cut some branch


def test_rollouts_stop_once_every_branch_is_cut(pair):
    """When the draft is unsure of every branch's first token, no branch's window can use a deeper
    token: the rollouts end after their first forward."""
    _, draft = pair
    md = MirrorDraft(draft, 4, DraftOptions(min_prob=0.999))
    md.start([4, 8, 15, 16, 23], 64)
    window = [1, 2, 3]
    nb = md.rollouts(window, [[7, 11], [9, -1], [5, 20], [6, 30]], 4)
    assert nb > 0 and md.tree.num_nodes == len(window) + nb  # roots only: never extended
    assert md.outs == [[]] * nb
