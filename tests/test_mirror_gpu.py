"""Mirror-SD on a CUDA GPU: the compiled kernels inside the decoders, and the stream lane."""
import pytest
import torch

from mirror_rt.decoders import AutoregressiveDecoder, MirrorConfig, MirrorDecoder, Placement, SpeculativeDecoder
from mirror_rt.models.derive import random_model

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("lane", ["inline", "cuda", "thread"])
def test_greedy_mirror_equals_ar_on_gpu(lane):
    target = random_model(0, vocab_size=256, num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2,
                          head_dim=16).cuda()
    draft = random_model(1, vocab_size=256, num_layers=1, hidden_size=64, num_heads=4, num_kv_heads=2,
                         head_dim=16).cuda()
    ids = torch.arange(1, 12, device="cuda")[None]
    ref = AutoregressiveDecoder(target).generate(ids, 48).tokens.tolist()
    assert SpeculativeDecoder(target, draft, 5).generate(ids, 48).tokens.tolist() == ref
    with MirrorDecoder(target, draft, MirrorConfig(exit_layer=2, kappa=4, window=5), Placement(lane=lane)) as dec:
        out = dec.generate(ids, 48)
    assert out.tokens.tolist() == ref
    assert out.stats["lane"] == ("stream" if lane == "cuda" else lane)
