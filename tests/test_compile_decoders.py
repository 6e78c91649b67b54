"""Decoders with compile=True give eager's greedy tokens (AR, SD, Mirror-SD on the in-process
CPU lanes), through mirror_rt.compiled.prepare as the decoders call it."""
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

from mirror_rt import compiled
from mirror_rt.models.derive import random_model


def _model(seed=11, **kw):
    shape = dict(num_layers=2, num_heads=6, num_kv_heads=2, head_dim=8, hidden_size=40)
    return random_model(seed=seed, **{**shape, **kw})


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _decoder_tokens(kind, compile, lane="inline"):
    from mirror_rt.decoders import AutoregressiveDecoder, MirrorConfig, MirrorDecoder, SpeculativeDecoder
    from mirror_rt.placement import Placement

    target, draft = _model(seed=11), _model(seed=12, num_layers=1)
    prompt = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(7))
    if kind == "ar":
        dec = AutoregressiveDecoder(target, compile=compile)
    elif kind == "sd":
        dec = SpeculativeDecoder(target, draft, 3, compile=compile)
    else:
        dec = MirrorDecoder(target, draft, MirrorConfig(exit_layer=1, kappa=2, window=3),
                            placement=Placement(lane=lane, compile=compile))
    try:
        return [dec.generate(prompt, 14).tokens.tolist() for _ in range(2)]  # the second run reuses the buckets
    finally:
        if hasattr(dec, "close"):
            dec.close()


@pytest.mark.parametrize("kind,lane", [("ar", None), ("sd", None), ("mirror", "inline"), ("mirror", "thread")])
def test_decoders_compiled_give_eager_tokens(kind, lane, monkeypatch):
    """Greedy tokens of every decoder (Mirror-SD on the CPU lanes that share the process) equal
    eager's with compile=True. Dynamo's "eager" backend: the captured graphs run as they are (the
    tests above check the functionalized ones), so the many draft buckets stay cheap."""
    monkeypatch.setattr(compiled, "BACKEND", "eager")
    graphs = counters["stats"]["unique_graphs"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback
        got = _decoder_tokens(kind, True, lane)
    assert counters["stats"]["unique_graphs"] > graphs, "nothing was compiled"
    assert got == _decoder_tokens(kind, False, lane)


def test_prompts_of_other_lengths_reuse_the_compiled_buckets(monkeypatch):
    """The decoder's target cache comes from the prepared model (capacity rounded up), so a second
    prompt of another length meets no new bucket."""
    from mirror_rt.decoders import AutoregressiveDecoder

    monkeypatch.setattr(compiled, "BACKEND", "eager")
    dec = AutoregressiveDecoder(_model(seed=11), compile=True)
    first = dec.generate(torch.tensor([[3, 1, 4, 1, 5, 9]]), 6).tokens
    buckets = set(dec.runner.buckets)
    assert buckets, "nothing was compiled"
    dec.generate(torch.tensor([[2, 7, 1, 8, 2, 8, 1, 8, 2]]), 6)
    assert set(dec.runner.buckets) == buckets
    assert torch.equal(first, AutoregressiveDecoder(_model(seed=11)).generate(torch.tensor([[3, 1, 4, 1, 5, 9]]), 6).tokens)
