"""Generation conventions every decoder shares (decoders/base.py): the model's EOS by default,
``max_new_tokens=0``, stop strings cut at the token that completes them, streamed id lists."""
from __future__ import annotations

import pytest
import torch

from mirror_helpers import tiny_pair
from mirror_rt.decoders import AutoregressiveDecoder, MirrorConfig, MirrorDecoder, Placement, SpeculativeDecoder

IDS = torch.tensor([[4, 8, 15, 16, 23, 42]])


class TwoLetterTokenizer:
    """Token i decodes to two letters, so a stop string can span tokens or end inside one."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(97 + i % 26) + chr(97 + (i // 26) % 26) for i in ids)


@pytest.fixture(scope="module")
def pair():
    return tiny_pair()


def decoders(pair, lane="inline"):
    target, draft = pair
    return {"ar": AutoregressiveDecoder(target), "sd": SpeculativeDecoder(target, draft, 3),
            "mirror": MirrorDecoder(target, draft, MirrorConfig(kappa=2, window=3), Placement(lane=lane))}


def test_zero_new_tokens_is_an_empty_result(pair):
    for name, dec in decoders(pair).items():
        out = dec.generate(IDS, 0)
        assert out.tokens.shape == (1, 0) and out.tokens.dtype == torch.int64, name
        assert out.stats["new_tokens"] == 0


def test_eos_defaults_to_the_models_own(pair):
    target, _ = pair
    full = AutoregressiveDecoder(target).generate(IDS, 24).tokens[0].tolist()
    eos = full[7]
    stop_at = full.index(eos) + 1
    target.config.eos_token_ids = [eos, 1000]  # a list, one id past the vocabulary (never generated)
    try:
        for name, dec in decoders(pair).items():
            assert dec.generate(IDS, 24).tokens[0].tolist() == full[:stop_at], name
            assert dec.generate(IDS, 24, eos_token_id=[]).tokens[0].tolist() == full, name  # EOS off
            assert dec.generate(IDS, 24, eos_token_id=full[2]).tokens[0].tolist() == full[:full.index(full[2]) + 1]
    finally:
        target.config.eos_token_ids = []


def first_cut(ids, stop, tok):
    """The reference rule: the shortest prefix whose text contains a stop string."""
    for m in range(1, len(ids) + 1):
        if any(s in tok.decode(ids[:m]) for s in stop):
            return ids[:m]
    return ids


@pytest.mark.parametrize("lane", ["inline", "thread"])
def test_stop_strings_cut_after_the_completing_token(pair, lane):
    tok = TwoLetterTokenizer()
    target, _ = pair
    full = AutoregressiveDecoder(target).generate(IDS, 30).tokens[0].tolist()
    text = tok.decode(full)
    cases = [[text[10:14]],          # spans tokens 5 and 6 exactly at their boundaries
             [text[11:14]],          # starts inside token 5, ends at a boundary
             [text[13:17]],          # ends inside token 8: the whole token is kept
             ["zzzzzz", text[20:23]]]  # the first of several that occurs
    for stop in cases:
        want = first_cut(full, stop, tok)
        assert len(want) < len(full)
        for name, dec in decoders(pair, lane).items():
            seen = []
            out = dec.generate(IDS, 30, stop=stop, tokenizer=tok, stream=seen.extend)
            assert out.tokens[0].tolist() == want, (name, stop)
            assert seen == want  # the stream never shows a token past the cut
            if hasattr(dec, "close"):
                dec.close()


def test_stop_strings_need_a_tokenizer(pair):
    for dec in decoders(pair).values():
        with pytest.raises(TypeError, match="tokenizer"):
            dec.generate(IDS, 4, stop=["x"])
