"""Exit-head adapter: an untrained head is the logit lens, files round-trip, a trained adapter
beats the logit lens on a small synthetic task, and Mirror-SD accepts it."""
import pytest
import torch

from mirror_rt.exit_head import ExitHead, load_exit_head, new_exit_head, save_exit_head
from mirror_rt.models.derive import random_model
from mirror_rt.train.train_exit import collect, containment, evaluate_heads, train_exit_heads


def _target():
    return random_model(1, vocab_size=64, num_layers=4, hidden_size=32, intermediate_size=48, tie_embeddings=True)


def test_untrained_head_is_the_logit_lens():
    t = _target()
    h = torch.randn(1, 5, 32) * 3
    head = new_exit_head(t, 2, rank=8)
    out = head(h)
    assert out.shape == (1, 5, 64) and out.dtype == torch.float32
    torch.testing.assert_close(out, t.head(h), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError):
        new_exit_head(t, 4)


def test_save_load_roundtrip(tmp_path):
    from mirror_rt.decoders import MirrorConfig

    t = _target()
    head = new_exit_head(t, 2, rank=8, act="linear")
    with torch.no_grad():
        head.adapter.up.weight.normal_(0, 0.3)
    path = str(tmp_path / "exit.safetensors")
    save_exit_head(head, path, {"note": "test"}, dtype=torch.float32)
    loaded = load_exit_head(path, t)
    assert isinstance(loaded, ExitHead) and loaded.exit_layer == 2 and loaded.meta["note"] == "test"
    h = torch.randn(1, 3, 32)
    torch.testing.assert_close(loaded(h), head(h))
    assert not any(p.requires_grad for p in loaded.parameters())
    assert MirrorConfig(exit_layer=loaded.exit_layer, exit_head=loaded).validate(t.num_layers).exit_head is loaded
    other = random_model(0, vocab_size=64, hidden_size=16, num_heads=2, num_kv_heads=1, head_dim=8)
    with pytest.raises(ValueError, match="hidden size"):
        load_exit_head(path, other)
    with pytest.raises(FileNotFoundError):
        load_exit_head(str(tmp_path / "nope.safetensors"), t)
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError):
        load_exit_head(str(tmp_path / "bad.safetensors"), t)


def test_trained_adapter_beats_the_logit_lens():
    torch.manual_seed(0)
    t = _target()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 64, (32,), generator=g).tolist() for _ in range(40)]
    w = [[1.0] * 32 for _ in seqs]
    hs, fin = collect(t, seqs[:32], w[:32], [2], batch_size=16)
    heads, hist = train_exit_heads(t, hs, fin, rank=16, steps=60, batch_tokens=512, lr=5e-3, log=lambda *a: None)
    assert hist["l2"][-1] < hist["l2"][0]
    ev_hs, ev_fin = collect(t, seqs[32:], w[32:], [2])
    rows = evaluate_heads(t, ev_hs, ev_fin, heads, kappas=(1, 4))
    lens, adapter = rows["lens@2"], rows["adapter@2"]
    assert adapter[1][0] > lens[1][0] + 0.05, (lens, adapter)
    assert adapter[4][1] > lens[4][1], "Omega_4 should improve too"


def test_containment_definition():
    final = torch.tensor([[0.0, 5.0, 1.0, 2.0], [3.0, 0.0, 0.0, 1.0]])
    exit_logits = torch.tensor([[0.0, 1.0, 3.0, 2.0], [0.0, 1.0, 2.0, 3.0]])
    c = containment(exit_logits, final, kappas=(1, 2, 4))
    assert c[1][0] == 0.0 and c[2][0] == 0.0 and c[4][0] == 1.0
    p = torch.softmax(final, -1)
    assert abs(c[1][1] - float((p[0, 2] + p[1, 3]) / 2)) < 1e-6
    wide = containment(exit_logits, final, kappas=(2, 16))  # kappa above the vocabulary: all of it
    assert wide[2] == c[2] and wide[16][0] == 1.0 and abs(wide[16][1] - 1.0) < 1e-6
