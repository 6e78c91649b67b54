"""AutoregressiveDecoder and SpeculativeDecoder: greedy equality, exact EOS / max_new_tokens,
losslessness of rejection sampling (a chi-square test that a wrong residual fails), validation."""
import math

import pytest
import torch

from mirror_rt.decoders import AutoregressiveDecoder, GenerationOutput, SpeculativeDecoder
from mirror_rt.models.derive import random_model, truncated_copy
from mirror_rt.ops import reference

VOCAB = 64


@pytest.fixture(scope="module")
def target():
    return random_model(seed=21, vocab_size=VOCAB, num_layers=4)


def _draft(kind, target):
    if kind == "truncated":
        return truncated_copy(target, 1)
    if kind == "self":
        return target
    return random_model(seed=99, vocab_size=VOCAB, num_layers=2, hidden_size=24, num_heads=3, num_kv_heads=1)


def _prompt(length, seed):
    return torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def _ar(target, prompt, n, **kw):
    return AutoregressiveDecoder(target).generate(prompt, n, **kw).tokens


# --- greedy: SD == AR exactly -----------------------------------------------------------------

@pytest.mark.parametrize("draft_kind", ["truncated", "self", "random"])
@pytest.mark.parametrize("window", [1, 3, 7])
def test_greedy_sd_equals_ar(target, draft_kind, window):
    draft = _draft(draft_kind, target)
    sd = SpeculativeDecoder(target, draft, window=window)
    for seed, length, n in [(0, 1, 21), (1, 9, 16), (2, 64, 19), (window, 33, 13)]:
        prompt = _prompt(length, seed)
        ar = _ar(target, prompt, n)
        out = sd.generate(prompt, n)
        assert isinstance(out, GenerationOutput) and out.tokens.dtype == torch.int64
        assert ar.shape == (1, n)
        assert torch.equal(out.tokens, ar), (f"window {window}, draft {draft_kind}, prompt length {length}:\n"
                                             f"SD {out.tokens.tolist()}\nAR {ar.tolist()}")
        s = out.stats
        assert s["new_tokens"] == n and s["window"] == window
        assert sum(s["accepted_hist"].values()) == s["steps"]
        # every step commits accepted + 1 tokens; the last step may be cut by max_new_tokens
        assert sum((k + 1) * v for k, v in s["accepted_hist"].items()) >= n
        assert all(0 <= k <= window for k in s["accepted_hist"])
        assert {"draft", "target", "verify"} <= set(s["phase_s"])
        if draft_kind == "self":  # the target drafting for itself: every window accepted whole
            assert s["steps"] == math.ceil(n / (window + 1)), s
            assert s["mean_accepted"] >= window * (s["steps"] - 1) / s["steps"], s


def test_prompt_shapes_accepted(target):
    prompt = _prompt(5, 3)
    a = _ar(target, prompt, 6)
    assert torch.equal(_ar(target, prompt[0], 6), a)
    assert torch.equal(SpeculativeDecoder(target, target, 3).generate(prompt[0].to(torch.int32), 6).tokens, a)


def _first_new_token_index(tokens, start):
    """The first index >= start whose token did not occur before it."""
    for k in range(start, len(tokens)):
        if tokens[k] not in tokens[:k]:
            return k
    return None


@pytest.mark.parametrize("window", [3, 7])
@pytest.mark.parametrize("draft_kind", ["self", "truncated"])
def test_eos_inside_accepted_window(target, window, draft_kind):
    """EOS = a token the AR output first emits mid-way: output stops right after it, even when the
    target drafting for itself accepted the whole window that contains it."""
    sd = SpeculativeDecoder(target, _draft(draft_kind, target), window=window)
    checked = 0
    for seed in range(6):
        prompt = _prompt(4 + seed, 40 + seed)
        ar = _ar(target, prompt, 24)[0].tolist()
        k = _first_new_token_index(ar, 2)
        if k is None or k % (window + 1) == window:  # want EOS strictly inside a window
            continue
        eos = ar[k]
        out = sd.generate(prompt, 24, eos_token_id=eos)
        assert out.tokens[0].tolist() == ar[: k + 1], f"eos {eos} first at {k}: {out.tokens.tolist()} vs {ar}"
        assert out.stats["new_tokens"] == k + 1
        assert _ar(target, prompt, 24, eos_token_id=[eos, VOCAB + 5])[0].tolist() == ar[: k + 1]
        checked += 1
    assert checked >= 2, "no prompt gave a mid-window EOS candidate"


@pytest.mark.parametrize("draft_kind", ["self", "truncated"])
def test_max_new_tokens_exact_mid_window(target, draft_kind):
    sd = SpeculativeDecoder(target, _draft(draft_kind, target), window=7)
    prompt = _prompt(6, 7)
    ar = _ar(target, prompt, 20)
    for n in (1, 2, 5, 8, 9, 12, 15, 20):
        out = sd.generate(prompt, n)
        assert out.tokens.shape == (1, n), (n, out.tokens.shape)
        assert torch.equal(out.tokens, ar[:, :n])


def test_sampling_is_seeded(target):
    prompt = _prompt(5, 1)
    sd = SpeculativeDecoder(target, truncated_copy(target, 2), window=3)
    a = sd.generate(prompt, 12, temperature=1.0, seed=5).tokens
    assert torch.equal(a, sd.generate(prompt, 12, temperature=1.0, seed=5).tokens)
    others = [sd.generate(prompt, 12, temperature=1.0, seed=s).tokens for s in range(6, 10)]
    assert any(not torch.equal(a, o) for o in others)
    ar = AutoregressiveDecoder(target)
    assert torch.equal(ar.generate(prompt, 8, temperature=0.7, seed=3).tokens,
                       ar.generate(prompt, 8, temperature=0.7, seed=3).tokens)


# --- rejection sampling keeps the target distribution ----------------------------------------

SMALL = dict(vocab_size=6, num_layers=1, hidden_size=16, intermediate_size=16, num_heads=2, num_kv_heads=1,
             head_dim=8)
N_SAMPLES = 600


def _chi2_critical_001(df: int) -> float:
    """Upper 0.1% point of chi-square(df) by the Wilson-Hilferty approximation (z_0.999 = 3.0902);
    e.g. df=35 gives 66.7 (exact: 66.62), df=20 gives 45.4 (exact: 45.31)."""
    h = 2.0 / (9 * df)
    return df * (1 - h + 3.0902 * math.sqrt(h)) ** 3


def _exact_two_token_probs(target, prompt):
    """P(first two generated tokens = (a, b)) at temperature 1, by enumeration: [V, V]."""
    with torch.inference_mode():
        p0 = torch.softmax(target(prompt, target.new_cache(prompt.shape[1] + 1))[0, -1].double(), -1)
        rows = []
        for a in range(target.config.vocab_size):
            seq = torch.cat([prompt, torch.tensor([[a]])], 1)
            rows.append(torch.softmax(target(seq, target.new_cache(seq.shape[1]))[0, -1].double(), -1))
    return p0[:, None] * torch.stack(rows)


def _chi2(counts, expected_probs, n):
    """Pearson statistic with cells of expected count < 5 pooled into one; returns (stat, df)."""
    exp = (expected_probs * n).flatten()
    obs = counts.flatten().double()
    small = exp < 5
    e = torch.cat([exp[~small], exp[small].sum()[None]]) if small.any() else exp
    o = torch.cat([obs[~small], obs[small].sum()[None]]) if small.any() else obs
    keep = e > 0
    return float(((o[keep] - e[keep]) ** 2 / e[keep]).sum()), int(keep.sum()) - 1


def _sample_counts(sd, prompt, n):
    V = sd.target.config.vocab_size
    counts = torch.zeros(V, V, dtype=torch.long)
    hist = {}
    for seed in range(n):
        out = sd.generate(prompt, 2, temperature=1.0, seed=10_000 + seed)
        a, b = out.tokens[0].tolist()
        counts[a, b] += 1
        for k, v in out.stats["accepted_hist"].items():
            hist[k] = hist.get(k, 0) + v
    return counts, hist


@pytest.fixture(scope="module")
def rejection_setup():
    # Seeds and prompt picked (by computing p and q) so that the draft's first token is accepted
    # about 42% of the time and a wrong residual shifts the first token's distribution a lot:
    # sum((p_wrong - p)^2 / p) = 0.23, i.e. a chi-square excess of ~140 at 600 samples.
    target = random_model(seed=5, **SMALL)
    draft = random_model(seed=11, **SMALL)
    prompt = torch.tensor([[0]])
    return target, draft, prompt, _exact_two_token_probs(target, prompt)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny forwards: thread hand-offs cost more than they save
    yield
    torch.set_num_threads(threads)


def test_rejection_sampling_matches_target_distribution(rejection_setup, one_thread, monkeypatch):
    target, draft, prompt, probs = rejection_setup
    monkeypatch.delenv("MIRROR_RT_BACKEND", raising=False)
    sd = SpeculativeDecoder(target, draft, window=3)
    counts, hist = _sample_counts(sd, prompt, N_SAMPLES)
    assert hist.get(0, 0) > N_SAMPLES // 10 and hist.get(1, 0) > N_SAMPLES // 10, hist  # both paths exercised
    stat, df = _chi2(counts, probs, N_SAMPLES)
    assert df >= 8
    assert stat < _chi2_critical_001(df), f"chi2 {stat:.1f} >= {_chi2_critical_001(df):.1f} (df {df})\n{counts}"


def test_wrong_residual_fails_the_chi_square(rejection_setup, one_thread, monkeypatch):
    """The same test, sample count and seeds, with the correction drawn from p: it must fail."""
    target, draft, prompt, probs = rejection_setup
    from mirror_rt.decoders import verify

    real = verify._rejection

    def wrong_residual(window, p, q, uniforms):  # the correction drawn from p, not norm(max(0, p - q))
        accepted, _ = real(window, p, q, uniforms)
        return accepted, verify.sample_rows(p[accepted][None], uniforms[:1])[0]

    monkeypatch.setattr(verify, "_rejection", wrong_residual)
    counts, _ = _sample_counts(SpeculativeDecoder(target, draft, window=3), prompt, N_SAMPLES)
    stat, df = _chi2(counts, probs, N_SAMPLES)
    assert stat > 2 * _chi2_critical_001(df), f"a wrong residual went unnoticed: chi2 {stat:.1f} (df {df})"


def test_chi2_critical_values():
    """Spot checks of the hard-coded approximation against tabulated chi-square quantiles."""
    for df, exact in [(5, 20.515), (10, 29.588), (20, 45.315), (35, 66.619)]:
        assert abs(_chi2_critical_001(df) - exact) / exact < 0.015


# --- validation -------------------------------------------------------------------------------

def _decoders(target):
    return [AutoregressiveDecoder(target), SpeculativeDecoder(target, truncated_copy(target, 1), 3)]


@pytest.mark.parametrize("prompt,exc,match", [
    (torch.zeros(1, 0, dtype=torch.long), ValueError, "input_ids.*empty"),
    (torch.tensor([[1, VOCAB]]), ValueError, "input_ids"),
    (torch.tensor([[-1, 2]]), ValueError, "input_ids"),
    (torch.zeros(2, 3, dtype=torch.long), ValueError, "input_ids"),
    (torch.zeros(1, 1, 3, dtype=torch.long), ValueError, "input_ids"),
    (torch.zeros(1, 3), TypeError, "input_ids"),
    ([[1, 2, 3]], TypeError, "input_ids"),
])
def test_bad_prompt(target, prompt, exc, match):
    for dec in _decoders(target):
        with pytest.raises(exc, match=match):
            dec.generate(prompt, 4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=1.0, top_p=0.0), "top_p"),
    (dict(temperature=1.0, top_p=1.5), "top_p"),
    (dict(temperature=1.0, top_k=-1), "top_k"),
])
def test_bad_generation_args(target, kwargs, match):
    kwargs = {"max_new_tokens": 4, **kwargs}
    for dec in _decoders(target):
        with pytest.raises(ValueError, match=match):
            dec.generate(torch.tensor([[1, 2]]), **kwargs)


def test_context_overflow():
    small = random_model(seed=0, max_position=32)
    for dec in _decoders(small):
        dec.generate(torch.zeros(1, 10, dtype=torch.long), 16)  # fits, window slack included
        with pytest.raises(ValueError, match="max_new_tokens.*context"):
            dec.generate(torch.zeros(1, 20, dtype=torch.long), 20)


def test_bad_pair_and_window(target):
    other = random_model(seed=0, vocab_size=VOCAB + 1)
    with pytest.raises(ValueError, match="vocabulary"):
        SpeculativeDecoder(target, other, 3)
    for window in (0, -1, 33, 65, 2.5, "3"):
        with pytest.raises(ValueError, match="window"):
            SpeculativeDecoder(target, target, window)


@pytest.mark.parametrize("draft_kind", ["truncated", "random"])
@pytest.mark.parametrize("min_prob", [0.05, 0.3, 0.95])
def test_greedy_sd_with_an_unsure_draft_stopping_early_equals_ar(target, draft_kind, min_prob):
    draft = _draft(draft_kind, target)
    sd = SpeculativeDecoder(target, draft, window=5, min_draft_prob=min_prob)
    full = SpeculativeDecoder(target, draft, window=5)
    empty = 0
    for seed, length, n in [(0, 1, 21), (1, 9, 16), (2, 33, 19)]:
        prompt = _prompt(length, seed)
        out = sd.generate(prompt, n)
        assert torch.equal(out.tokens, _ar(target, prompt, n))
        s = out.stats
        empty += s["empty_steps"]
        windows = s["steps"] - s["empty_steps"]
        assert s["mean_accepted_per_window"] == pytest.approx(s["mean_accepted"] * s["steps"] / max(windows, 1))
        if min_prob >= 0.95:  # hardly a token is that sure: most steps are plain target steps
            assert s["empty_steps"] >= s["steps"] // 2
        assert full.generate(prompt, n).stats["empty_steps"] == 0
    assert empty > 0 or min_prob < 0.95


def test_rejection_sampling_with_empty_windows_matches_target_distribution(rejection_setup, one_thread, monkeypatch):
    """A draft too unsure to propose anything: every step verifies an empty window, and the
    tokens still follow the target's distribution."""
    target, draft, prompt, probs = rejection_setup
    monkeypatch.delenv("MIRROR_RT_BACKEND", raising=False)
    sd = SpeculativeDecoder(target, draft, window=3, min_draft_prob=0.999)
    counts, hist = _sample_counts(sd, prompt, N_SAMPLES)
    assert set(hist) == {0}
    stat, df = _chi2(counts, probs, N_SAMPLES)
    assert stat < _chi2_critical_001(df), f"chi2 {stat:.1f} >= {_chi2_critical_001(df):.1f} (df {df})\n{counts}"


@pytest.mark.parametrize("bad", [-0.1, 1.0, 2, "0.5", None, True])
def test_bad_min_draft_prob(target, bad):
    with pytest.raises(ValueError, match="min_draft_prob"):
        SpeculativeDecoder(target, target, window=3, min_draft_prob=bad)
