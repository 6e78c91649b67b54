"""PrefixReuse: a generation starts from an earlier generation's target rows, bit for bit."""
import pytest
import torch
from mirror_helpers import tiny_pair

from mirror_rt.decoders import AutoregressiveDecoder, MirrorConfig, MirrorDecoder, SpeculativeDecoder
from mirror_rt.decoders.base import GenerateArgs, start_generation
from mirror_rt.decoders.reuse import PrefixReuse
from mirror_rt.models.derive import random_model
from mirror_rt.models.quant import quantize_model


def ids(seed, n, vocab=64):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def prefill_from(target, prompt, reuse):
    """The target's prefill as a decoder runs it (``Generation.prefill_target``): (cache, rows reused)."""
    gen = start_generation(target, prompt, GenerateArgs(8), "test", 1, reuse=reuse)
    gen.prefill_target(target)
    return gen.cache, gen.stats.counters["prefill_reused"]


def row_exact_target(layers):
    """A tiny target whose forward is row-exact: quantized linears (each row computed alone) and
    row-exact attention on a float32 CPU cache. (torch's fp32 matmul may round a row differently
    in a batch of another size when it runs on several threads.)"""
    return quantize_model(random_model(0, num_layers=layers, intermediate_size=64), "q8_0")


@pytest.mark.parametrize("threads", [1, 2])
def test_reused_rows_equal_a_full_prefill_bit_for_bit(threads):
    target = row_exact_target(3)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_reused_rows(target)
    finally:
        torch.set_num_threads(before)


def check_reused_rows(target):
    first = ids(0, 13)
    reuse = PrefixReuse()
    earlier, _ = prefill_from(target, first, None)
    reuse.keep(first.tolist(), earlier)  # rows of first[:12]; first[12] is pending
    longer = torch.cat([first, ids(1, 9)])
    full, _ = prefill_from(target, longer, None)
    started, reused = prefill_from(target, longer, reuse)
    assert reused == 12
    assert started.length == full.length == longer.numel() - 1
    for a, b in zip(full.k + full.v, started.k + started.v):
        assert torch.equal(a[:, :full.length], b[:, :full.length])


def test_only_the_common_prefix_is_reused():
    target, _ = tiny_pair(layers=2)
    first = ids(2, 10)
    reuse = PrefixReuse()
    cache, _ = prefill_from(target, first, None)
    reuse.keep(first.tolist(), cache)
    other = first.clone()
    other[4] = (other[4] + 1) % 64
    assert prefill_from(target, other, reuse)[1] == 4
    assert prefill_from(target, first[:3], reuse)[1] == 2  # never the pending last token
    assert prefill_from(target, first[:1], reuse)[1] == 0
    smaller, _ = tiny_pair(layers=1)  # another layout: nothing to take
    assert prefill_from(smaller, first, reuse)[1] == 0
    reuse.clear()
    assert prefill_from(target, first, reuse)[1] == 0


def test_each_decoder_continues_from_another_decoders_cache():
    """A generation that continues an earlier one (its prompt plus its output) reuses that one's
    rows and writes exactly what it writes without them."""
    _, draft = tiny_pair()
    target = row_exact_target(4)
    prompt = ids(3, 9)[None]
    decoders = [AutoregressiveDecoder(target), SpeculativeDecoder(target, draft, 3),
                MirrorDecoder(target, draft, MirrorConfig(window=3, kappa=2))]
    try:
        for writer in decoders:
            for reader in decoders:
                reuse = PrefixReuse()
                writer.reuse = reuse
                head = writer.generate(prompt, 6, eos_token_id=[]).tokens
                writer.reuse, reader.reuse = None, reuse
                longer = torch.cat([prompt, head], 1)
                out = reader.generate(longer, 10, eos_token_id=[])
                reader.reuse = None
                assert out.stats["prefill_reused"] >= prompt.shape[1] + 6 - 1
                assert out.tokens.tolist() == reader.generate(longer, 10, eos_token_id=[]).tokens.tolist()
    finally:
        decoders[2].close()
