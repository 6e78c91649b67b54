"""bench/feature_draft_feasibility.py: the batched rollouts equal a plain recomputation per start,
and the SD walk accepts what vanilla SD would."""
import pytest
import torch
from helpers import load_bench_script

from mirror_rt.models.derive import random_model

V = 40


@pytest.fixture(scope="module")
def fd():
    return load_bench_script("feature_draft_feasibility.py")


def _pair(fd, seed=0):
    torch.manual_seed(seed)
    target = random_model(seed, vocab_size=V, num_layers=2, hidden_size=32, intermediate_size=48, tie_embeddings=True)
    for p in target.parameters():
        p.requires_grad_(False)
    return target, fd.FeatureDraft(target, "random").eval()


@pytest.mark.parametrize("unit", [False, True])
def test_batched_rollouts_equal_a_full_recomputation_per_start(fd, unit):
    target, draft = _pair(fd)
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, V, (19,), generator=g).tolist()
    active = torch.tensor([0, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37])  # a reduced vocabulary, odd size
    starts = torch.tensor([0, 4, 9, 16])
    got = fd.rollouts(draft, target, active, seq, starts, unit, window=5)
    feats = fd.target_features(target, [seq], unit)[0]
    head = target.lm_head.weight[active] * (target.norm.weight if unit else 1.0)
    with torch.no_grad():
        for row, c in enumerate(starts.tolist()):
            ids, fs, want = seq[1:c + 2], list(feats[:c + 1]), []
            for _ in range(5):  # the whole sequence again, one step longer each time
                out = draft.block(draft.inputs(torch.tensor([ids]), torch.stack(fs)[None]),
                                  torch.arange(len(ids))[None])[0][0, -1]
                tok = int(active[(out @ head.T).argmax()])
                want.append(tok)
                ids, fs = ids + [tok], fs + [out]
            assert got[row].tolist() == want, f"start {c}"


def test_walk_accepts_the_longest_matching_prefix_then_the_targets_token(fd, monkeypatch):
    target, draft = _pair(fd)
    prompt, answer = [1, 2, 3], list(range(4, 24))  # 20 answer tokens
    vocab = torch.arange(V)

    def perfect(draft_, target_, active, seq, starts, unit, window=7):
        return torch.tensor([[seq[min(c + 2 + k, len(seq) - 1)] for k in range(window)] for c in starts.tolist()])
    monkeypatch.setattr(fd, "rollouts", perfect)
    assert fd.walk(draft, target, vocab, prompt, answer, False) == [7, 7, 3]  # the last token is the target's

    def wrong_after_two(draft_, target_, active, seq, starts, unit, window=7):
        return torch.tensor([[seq[c + 2 + k] if k < 2 and c + 2 + k < len(seq) else -1 for k in range(window)]
                             for c in starts.tolist()])
    monkeypatch.setattr(fd, "rollouts", wrong_after_two)
    assert fd.walk(draft, target, vocab, prompt, answer, False) == [2] * 6 + [1]  # 6 x 3 tokens, then 2 left
