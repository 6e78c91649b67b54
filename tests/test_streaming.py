"""Speculative Streaming draft: self-verification equals the draft's own AR output, stream KV is
never cached, n_streams = 0 is a plain draft, training and inference streams agree, files."""
import copy

import pytest
import torch

from mirror_rt.decoders.base import Sampler, prefill
from mirror_rt.models.derive import random_model
from mirror_rt.models.llama import LlamaModel
from mirror_rt.models.streaming import NEG, StreamingDraft, load_streaming_draft, save_streaming_draft
from mirror_rt.answers import sd_acceptance
from mirror_rt.train.train_draft import train_draft

V = 48


def _target():
    return random_model(0, vocab_size=V, num_layers=3, hidden_size=32, intermediate_size=48, tie_embeddings=True)


def _cyclic(n_seqs=24, length=40, seed=0):
    """Sequences that follow a fixed successor table: easy for streams to learn."""
    g = torch.Generator().manual_seed(seed)
    succ = torch.randperm(V, generator=g)
    seqs = []
    for _ in range(n_seqs):
        t = int(torch.randint(0, V, (1,), generator=g))
        s = []
        for _ in range(length):
            s.append(t)
            t = int(succ[t])
        seqs.append(s)
    return seqs


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    target = _target()
    draft = StreamingDraft.from_target(target, num_layers=2, n_streams=3, stream_layers=1, init="first")
    seqs = _cyclic()
    train_draft(draft, seqs, [[1.0] * len(s) for s in seqs], steps=80, batch_size=8, max_len=40, lr=1e-2,
                stream_weight=1.0, log=lambda *a: None)
    return target, draft.eval(), seqs


def _ar(draft, cache, first, n, offset=0, pick=None):
    pick = pick or (lambda lg: (int(lg.argmax()), None))
    out, feed = [], first
    for i in range(n):
        logits = draft(torch.tensor([[feed]]), cache, tree_offset=offset + i)[0, -1]
        feed, _ = pick(logits)
        out.append(feed)
    return out


def _fresh(draft, prompt, size=128):
    cache = draft.new_cache(size)
    prefill(draft, cache, torch.tensor(prompt))
    return cache


def test_streams_equal_autoregressive_and_save_passes(trained):
    _, draft, seqs = trained
    total_passes = total = 0
    for s in seqs[:6] + [[1, 2, 3], [7]]:
        prompt = s[:9]
        for n in (1, 5, 12):
            c1, c2 = _fresh(draft, prompt), _fresh(draft, prompt)
            toks, qs, info = draft.propose_streams(c1, prompt[-1], n)
            assert toks == _ar(draft, c2, prompt[-1], n), (prompt, n)
            assert len(toks) == n and all(q is None for q in qs)
            if n > 1:
                total_passes += info["passes"]
                total += n
    assert total_passes < 0.85 * total, "trained streams should let one pass emit several tokens"


def test_streams_equal_autoregressive_when_sampling(trained):
    _, draft, seqs = trained
    prompt = seqs[0][:7]
    c1, c2 = _fresh(draft, prompt), _fresh(draft, prompt)
    s1 = Sampler(0.9, 0, 1.0, 123, "cpu")
    s2 = Sampler(0.9, 0, 1.0, 123, "cpu")
    toks, qs, _ = draft.propose_streams(c1, prompt[-1], 10, pick=s1.pick)
    assert toks == _ar(draft, c2, prompt[-1], 10, pick=s2.pick)
    assert all(q is not None and abs(float(q.sum()) - 1) < 1e-4 for q in qs)


def test_stream_kv_is_not_cached(trained):
    _, draft, seqs = trained
    prompt = seqs[1][:10]
    cache = _fresh(draft, prompt)
    _, split = draft.main_pass([prompt[-1], 5, 6], cache, 0)
    before = [t.clone() for t in cache.k + cache.v]
    draft.stream_guesses(split[:, 1:2], cache, 1)
    assert all(torch.equal(a, b) for a, b in zip(before, cache.k + cache.v)), "streams wrote to the KV cache"
    # after a whole proposal the region holds exactly the main-stream KV of n chain forwards
    n = 9
    c1, c2 = _fresh(draft, prompt), _fresh(draft, prompt)
    draft.propose_streams(c1, prompt[-1], n)
    _ar(draft, c2, prompt[-1], n)
    end = c1.length + n
    for a, b in zip(c1.k + c1.v, c2.k + c2.v):
        torch.testing.assert_close(a[:, :end], b[:, :end], atol=1e-5, rtol=1e-5)


def test_training_streams_match_inference_streams(trained):
    _, draft, seqs = trained
    ids = torch.tensor([seqs[2][:12]])
    with torch.no_grad():
        main, streams = draft.ss_forward(ids)
    for t in (0, 4, 11):
        cache = draft.new_cache(32)
        prefill(draft, cache, ids[0, : t + 1])  # commits tokens < t; token t is fed below
        logits, split = draft.main_pass([int(ids[0, t])], cache, 0)
        torch.testing.assert_close(logits[0], main[0, t], atol=1e-4, rtol=1e-4)
        pos = torch.tensor([[cache.length]])
        s = draft.stream_hidden(split, pos, cache, cache.length + 1)
        torch.testing.assert_close(draft.head_draft(s)[0, 0], streams[0, t], atol=1e-4, rtol=1e-4)


def test_no_streams_is_a_plain_draft():
    target = _target()
    draft = StreamingDraft.from_target(target, num_layers=2, n_streams=0, init="first")
    plain = copy.deepcopy(target)
    plain.layers = torch.nn.ModuleList([copy.deepcopy(draft.layers[i]) for i in range(2)])
    plain.config = copy.copy(plain.config)
    plain.config.num_layers = 2
    ids = torch.tensor([[3, 9, 1, 4, 4, 20]])
    torch.testing.assert_close(draft(ids, draft.new_cache(16)), LlamaModel.forward(plain, ids, plain.new_cache(16)))
    main, streams = draft.ss_forward(ids)
    assert streams is None and main.shape == (1, 6, V)
    cache = _fresh(draft, [3, 9, 1])
    toks, _, info = draft.propose_streams(cache, 1, 6)
    assert info["passes"] == 6 and toks == _ar(draft, _fresh(draft, [3, 9, 1]), 1, 6)
    assert draft.added_state_dict().keys() >= {"layers.0.mlp.up_proj.weight"}
    assert not any(k.startswith(("embed", "lm_head", "norm")) for k in draft.added_state_dict())


def test_reduced_vocabulary_head():
    target = _target()
    vocab = torch.tensor([0, 2, 5, 7, 11, 30, 47])
    draft = StreamingDraft.from_target(target, num_layers=1, n_streams=2, vocab_ids=vocab)
    logits = draft(torch.tensor([[1, 2, 3]]), draft.new_cache(8))
    assert torch.isfinite(logits).all() and logits.shape == (1, 3, V)
    outside = torch.ones(V, dtype=torch.bool)
    outside[vocab] = False
    assert (logits[..., outside] == NEG).all()
    full = target.lm_head(target.norm(draft.run_layers(draft.embed(torch.tensor([[1, 2, 3]])), 0, 1,
                                                       draft.new_cache(8))))
    torch.testing.assert_close(logits[..., vocab], full[..., vocab].float())
    toks, _, _ = draft.propose_streams(_fresh(draft, [4, 4]), 4, 5)
    assert set(toks) <= set(vocab.tolist())
    draft.set_context_tokens([3, 9, 0])  # prompt tokens join the draft vocabulary
    logits = draft(torch.tensor([[1, 2, 3]]), draft.new_cache(8))
    assert (logits[..., [3, 9]] > NEG).all() and (logits[..., 4] == NEG).all()
    torch.testing.assert_close(logits[..., 9], full[..., 9].float())
    draft.set_context_tokens(None)
    assert (draft(torch.tensor([[1]]), draft.new_cache(8))[..., 9] == NEG).all()


def test_save_load_roundtrip(tmp_path, trained):
    target, draft, _ = trained
    files = save_streaming_draft(draft, str(tmp_path / "d.safetensors"), dtype=torch.float32, max_bytes=20_000)
    assert len(files) > 1, "small max_bytes should shard the file"
    loaded = load_streaming_draft(files[0], target)
    ids = torch.tensor([[1, 5, 9, 2]])
    torch.testing.assert_close(loaded(ids, loaded.new_cache(8)), draft(ids, draft.new_cache(8)))
    assert loaded.n_streams == 3 and loaded.embed_tokens is target.embed_tokens
    with pytest.raises(FileNotFoundError):
        load_streaming_draft(str(tmp_path / "missing.safetensors"), target)


def test_sd_decoders_stay_lossless_with_the_trained_pair(trained):
    from mirror_rt.decoders import AutoregressiveDecoder, MirrorConfig, MirrorDecoder, Placement, SpeculativeDecoder
    from mirror_rt.exit_head import new_exit_head

    target, draft, seqs = trained
    head = new_exit_head(target, 2, rank=4)
    with torch.no_grad():
        head.adapter.up.weight.normal_(0, 0.1)  # a non-trivial adapter: output must stay the target's
    for s in seqs[:2]:
        ids = torch.tensor([s[:6]])
        ref = AutoregressiveDecoder(target).generate(ids, 20).tokens
        assert torch.equal(SpeculativeDecoder(target, draft, 4).generate(ids, 20).tokens, ref)
        with MirrorDecoder(target, draft, MirrorConfig(exit_layer=2, exit_head=head, kappa=3, window=3),
                           Placement(lane="inline")) as dec:
            assert torch.equal(dec.generate(ids, 20).tokens, ref)
    acc = sd_acceptance(draft, [s[:6] for s in seqs[:2]], [s[6:20] for s in seqs[:2]], window=4)
    assert acc["steps"] > 0 and 0 <= acc["mean_accepted"] <= 4


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_decoders_streams_path_equals_plain_loop(trained, temperature):
    """With stream proposals on, DraftState.propose and MirrorDraft.fresh_window give the same
    window, same q rows and the same cache length as the one-token loop."""
    from mirror_rt.decoders.drafting import DraftState
    from mirror_rt.decoders.mirror_draft import MirrorDraft

    target, draft, seqs = trained
    prompt = seqs[3][:9]
    results = []
    for streams in (True, False):
        d = copy.copy(draft)
        d.stream_proposals = streams  # off: the plain one-token loop
        calls = []
        d.propose_streams = lambda *a, **k: calls.append(1) or StreamingDraft.propose_streams(d, *a, **k)
        state = DraftState(d, 128)
        state.prefill(torch.tensor(prompt))
        w, q = state.propose(prompt, 6, Sampler(temperature, 0, 1.0, 7, "cpu"), 0)
        mirror = MirrorDraft(d, 6, None)
        mirror.start(prompt, 64, (temperature, 0, 1.0), 7)
        mw, mq = mirror.fresh_window(6)
        results.append((w, q, state.cache.length, mw, mq))
        assert len(calls) == (2 if streams else 0)
    (w1, q1, len1, mw1, mq1), (w2, q2, len2, mw2, mq2) = results
    assert w1 == w2 and len1 == len2 and mw1 == mw2
    if temperature:
        assert torch.allclose(q1, q2, atol=1e-5) and torch.allclose(mq1, mq2, atol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_an_unsure_draft_ends_its_window_early_on_both_paths(trained, temperature):
    """min_draft_prob: the window ends before the first token whose draft probability is below it,
    with the stream path equal to the plain loop (window, q rows, cache length), and the next
    window continues from the right context."""
    from mirror_rt.decoders.drafting import DraftState

    target, draft, seqs = trained
    prompt = seqs[5][:7]
    plain = copy.copy(draft)
    plain.stream_proposals = False
    ref = DraftState(plain, 128)
    ref.prefill(torch.tensor(prompt))
    full, _ = ref.propose(prompt, 6, Sampler(temperature, 0, 1.0, 3, "cpu"), 0)
    # the draft's own top probability at each of the full window's positions
    probs, ctx = [], list(prompt)
    for tok in full:
        cache = draft.new_cache(64)
        logits = draft(torch.tensor([ctx]), cache)[0, -1]
        probs.append(float(torch.softmax(logits.float(), -1).max()))
        ctx.append(tok)
    cut = min(range(1, len(full)), key=lambda i: probs[i])  # stop at the least sure position after the first
    tau = probs[cut] + 1e-6
    if any(p < tau for p in probs[:cut]):
        pytest.skip("no position is less sure than every earlier one")
    results = []
    for streams in (True, False):
        d = copy.copy(draft)
        d.stream_proposals = streams
        state = DraftState(d, 128)
        state.prefill(torch.tensor(prompt))
        w, q = state.propose(prompt, 6, Sampler(temperature, 0, 1.0, 3, "cpu"), 0, min_prob=tau)
        results.append((w, q, state.cache.length))
        assert w == full[:cut], (streams, w, full, cut)
        after = prompt + w + [full[cut]]  # the target's token after the cut window
        nxt, _ = state.propose(after, 3, Sampler(0.0, 0, 1.0, None, "cpu"), 1)
        fresh = DraftState(plain, 128)
        fresh.prefill(torch.tensor(after))
        assert nxt == fresh.propose(after, 3, Sampler(0.0, 0, 1.0, None, "cpu"), 0)[0]  # the cache stayed right
    (w1, q1, len1), (w2, q2, len2) = results
    assert len1 == len2
    if temperature:
        assert torch.allclose(q1, q2, atol=1e-5) and q1.shape[0] == cut
