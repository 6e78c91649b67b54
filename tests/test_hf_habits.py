"""What a transformers user expects: EOS from the model, stop strings, streamed text, loaded
models in, loading conventions, sliding windows, and errors before any work."""
from __future__ import annotations

import pytest
import torch

from mirror_rt.generation import StopStrings, TextStreamer, resolve_eos


@pytest.fixture(scope="module")
def byte_tok():
    """A tiny byte-level BPE tokenizer trained here: 'Ġworld' is one token, non-ASCII characters
    are split into one token per UTF-8 byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["hello world, the world says hello"] * 50 + ["Stop here. END of text\n"] * 20
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"], show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    assert tok.token_to_id("Ġworld") is not None
    return tok


def _ids(tok, text):
    return tok.encode(text).ids


# --- EOS ------------------------------------------------------------------------------------

class _Cfg:
    def __init__(self, eos, vocab=100):
        self.eos_token_ids, self.vocab_size = eos, vocab


class _Model:
    def __init__(self, eos, gen=None):
        self.config = _Cfg(eos)
        if gen is not None:
            self.generation_config = gen


def test_resolve_eos_defaults_to_the_models():
    assert resolve_eos(_Model([2])) == [2]
    assert resolve_eos(_Model([2], {"eos_token_id": [7, 2, 9]})) == [2, 7, 9]
    assert resolve_eos(_Model([], {"eos_token_id": 5})) == [5]
    assert resolve_eos(_Model([2]), 3) == [3]
    assert resolve_eos(_Model([2]), [3, 4]) == [3, 4]
    assert resolve_eos(_Model([2]), torch.tensor(4)) == [4]
    assert resolve_eos(_Model([2]), []) == []


@pytest.mark.parametrize("bad, exc", [("2", TypeError), ([1.5], TypeError), (True, TypeError), (-1, ValueError),
                                      (100, ValueError)])
def test_resolve_eos_refuses_bad_ids(bad, exc):
    with pytest.raises(exc, match="eos_token_id"):
        resolve_eos(_Model([2]), bad)


# --- stop strings ---------------------------------------------------------------------------

def _cut(stop, ids):
    """Index after which the output ends (feed one id at a time), or None."""
    for i, t in enumerate(ids):
        if stop.push(t):
            return i
    return None


def test_stop_string_across_tokens(byte_tok):
    ids = _ids(byte_tok, "Stop here. END of text")
    # ". END" spans '.' and 'ĠEND': the output ends right after 'ĠEND'.
    end = ids.index(byte_tok.token_to_id("ĠEND"))
    assert _cut(StopStrings([". END"], byte_tok), ids) == end
    assert StopStrings([". END"], byte_tok).feed(ids) == end + 1


def test_stop_string_inside_a_longer_token(byte_tok):
    ids = _ids(byte_tok, "hello world, the world")
    first_world = ids.index(byte_tok.token_to_id("Ġworld"))
    # "orl" ends inside 'Ġworld': cut after that whole token (a cut can only fall between tokens).
    assert _cut(StopStrings(["orl"], byte_tok), ids) == first_world
    # the first stop string to complete wins, whichever is listed first
    assert _cut(StopStrings(["the", "orl"], byte_tok), ids) == first_world


def test_stop_string_exact_at_a_token_boundary(byte_tok):
    ids = _ids(byte_tok, "hello world, the world")
    comma = ids.index(byte_tok.token_to_id(","))
    assert _cut(StopStrings(["world,"], byte_tok), ids) == comma
    assert _cut(StopStrings(["absent"], byte_tok), ids) is None


def test_stop_string_made_of_split_utf8_bytes(byte_tok):
    ids = _ids(byte_tok, "héllo wörld")
    # 'ö' is two byte tokens: the stop completes with the second.
    o_bytes = [byte_tok.token_to_id(t) for t in byte_tok.encode("ö").tokens]
    assert len(o_bytes) == 2
    second = [i for i in range(len(ids) - 1) if ids[i:i + 2] == o_bytes][0] + 1
    assert _cut(StopStrings("ö", byte_tok), ids) == second


def test_stop_strings_refuse_bad_input(byte_tok):
    with pytest.raises(ValueError, match="stop"):
        StopStrings([], byte_tok)
    with pytest.raises(ValueError, match="stop"):
        StopStrings([""], byte_tok)
    with pytest.raises(TypeError, match="tokenizer"):
        StopStrings(["x"], None)


# --- text streaming -------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["héllo wörld, the world says 日本語 hello\nStop here. END", "日本"])
def test_streamer_hands_on_stable_text_only(byte_tok, text):
    ids = _ids(byte_tok, text)
    pieces = []
    streamer = TextStreamer(byte_tok, pieces.append)
    for t in ids:  # one token at a time: multi-byte characters arrive split
        streamer([t])
        assert "\ufffd" not in "".join(pieces)
    streamer.end()
    assert "".join(pieces) == byte_tok.decode(ids) == text == streamer.text
    assert len(pieces) >= 2  # it streamed, not one piece at the end


def test_streamer_takes_batches_and_tensors(byte_tok, capsys):
    ids = _ids(byte_tok, "hello world, the world says hello")
    streamer = TextStreamer(byte_tok)  # default: print to stdout
    streamer(torch.tensor(ids[:3]))
    streamer(ids[3:])
    streamer.end()
    assert capsys.readouterr().out == "hello world, the world says hello"
