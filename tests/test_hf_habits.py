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


# --- loaded transformers models in ----------------------------------------------------------

def _our_logits(model, ids):
    return model(ids, model.new_cache(ids.shape[1]))


@pytest.mark.parametrize("arch, tied", [("llama", False), ("llama", True), ("qwen2", False), ("qwen3", False),
                                        ("mistral", False)])
def test_loaded_transformers_model_shares_its_weights(arch, tied):
    import mirror_rt
    from helpers import assert_close, hf_logits, random_hf_model

    hf = random_hf_model(arch, seed=3, tie_word_embeddings=tied)
    model = mirror_rt.load_model(hf)
    ours = dict(model.named_parameters(remove_duplicate=False))
    for name, p in hf.named_parameters(remove_duplicate=False):
        assert ours[name.removeprefix("model.")].data_ptr() == p.data_ptr(), f"{name} was copied"
    ids = torch.randint(0, hf.config.vocab_size, (1, 17), generator=torch.Generator().manual_seed(0))
    assert_close(_our_logits(model, ids), hf_logits(hf, ids), 1e-4, f"{arch} logits")
    with torch.no_grad():  # an in-place edit of hf's weights shows in ours: one storage
        hf.model.norm.weight.mul_(0.5)
    assert_close(_our_logits(model, ids), hf_logits(hf, ids), 1e-4, f"{arch} logits after an edit")
    assert hf.model.norm.weight.requires_grad  # we did not change hf's parameters' flags
    assert mirror_rt.generation.resolve_eos(model) == [2]  # the checkpoint's EOS
    assert mirror_rt.from_hf(hf).embed_tokens.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()


def test_unsupported_transformers_model_lists_the_supported():
    import transformers

    from mirror_rt import load_model

    cfg = transformers.GPT2Config(vocab_size=61, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    with pytest.raises(ValueError, match="LlamaForCausalLM.*Qwen3ForCausalLM"):
        load_model(transformers.GPT2LMHeadModel(cfg))
    with pytest.raises(TypeError, match="checkpoint path or a loaded transformers model"):
        load_model(42)


def test_decoder_guard_points_to_load_model():
    from helpers import random_hf_model

    from mirror_rt import load_model
    from mirror_rt.models.from_hf import check_model

    hf = random_hf_model("llama")
    with pytest.raises(TypeError, match=r"load_model\(target\)"):
        check_model(hf, "target")
    check_model(load_model(hf))  # ours passes
    with pytest.raises(TypeError, match="mirror_rt model"):
        check_model(object())
    # the decoders call it: a transformers model handed to one is named, with the way out
    import mirror_rt

    ours = load_model(hf)
    with pytest.raises(TypeError, match=r"target is a transformers LlamaForCausalLM.*load_model\(target\)"):
        mirror_rt.AutoregressiveDecoder(hf).generate(torch.tensor([[1, 2]]), 3)
    with pytest.raises(TypeError, match=r"draft is a transformers LlamaForCausalLM.*load_model\(draft\)"):
        mirror_rt.SpeculativeDecoder(ours, hf)
    with pytest.raises(TypeError, match=r"target is a transformers"):
        mirror_rt.MirrorDecoder(hf, ours)


# --- loading conventions --------------------------------------------------------------------

@pytest.fixture
def hf_dir(tmp_path):
    from helpers import save_hf_checkpoint

    hf = save_hf_checkpoint(tmp_path, "llama", seed=1)
    return tmp_path, hf


@pytest.mark.parametrize("name, dtype", [("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16),
                                         ("float32", torch.float32), ("fp16", torch.float16),
                                         ("torch.float16", torch.float16), (torch.bfloat16, torch.bfloat16)])
def test_dtype_names(hf_dir, name, dtype):
    from mirror_rt import load_model

    model = load_model(hf_dir[0], dtype=name)
    assert model.dtype == dtype and model.inv_freq.dtype == torch.float32


@pytest.mark.parametrize("bad, exc", [("bfloat", ValueError), (torch.int8, ValueError), (3, TypeError)])
def test_bad_dtype_named(hf_dir, bad, exc):
    from mirror_rt import load_model

    with pytest.raises(exc, match="dtype"):
        load_model(hf_dir[0], dtype=bad)


def test_single_safetensors_file(hf_dir):
    from helpers import assert_close, hf_logits

    from mirror_rt import load_model

    path, hf = hf_dir
    (path / "generation_config.json").write_text('{"eos_token_id": [2, 5]}')
    model = load_model(path / "model.safetensors")
    ids = torch.arange(3, 20)[None]
    assert_close(_our_logits(model, ids), hf_logits(hf, ids), 1e-4, "single file")
    assert model.source == str(path)  # the tokenizer is looked up in the folder
    assert mirror_rt_eos(model) == [2, 5]
    lonely = path / "elsewhere"
    lonely.mkdir()
    (lonely / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="no config.json"):
        load_model(lonely / "model.safetensors")


def mirror_rt_eos(model):
    from mirror_rt.generation import resolve_eos

    return resolve_eos(model)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU-only torch")
def test_device_checked_before_loading(tmp_path):
    from mirror_rt import load_model

    # the path does not exist: the device error comes first, before any file is read
    with pytest.raises(ValueError, match=r"device 'cuda' requested but .*(no CUDA|no CUDA GPU).*available: cpu"):
        load_model(tmp_path / "nothing", device="cuda")
    with pytest.raises(ValueError, match="not a torch device"):
        load_model(tmp_path / "nothing", device="gpu0")


# --- errors before work: the CLI ------------------------------------------------------------

@pytest.fixture
def no_loading(monkeypatch):
    """Any model load fails the test: the CLI must refuse bad arguments before loading."""
    import mirror_rt.models

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(mirror_rt.models, "load_model", refuse)
    monkeypatch.setattr("mirror_rt.models.loader.load_model", refuse)


@pytest.mark.parametrize("argv, message", [
    (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--temperature", "nan"], "--temperature must be >= 0"),
    (["--window", "0"], "--window must be >= 1"),
    (["--window", "65"], "--window must be <= 64"),
    (["--kappa", "0"], "--kappa must be >= 1"),
    (["--min-draft-prob", "1.5"], "--min-draft-prob must be in"),
    (["--min-branch-prob", "-0.1"], "--min-branch-prob must be in"),
    (["--lane", "gpu"], "--lane must be one of"),
    (["--target", "/no/such/dir"], "no such file"),
    (["--draft", "truncated:x"], "truncated:N"),
    (["--exit-head", "/no/such/head.safetensors"], "no such file"),
])
def test_cli_checks_arguments_before_loading(no_loading, capsys, argv, message):
    import time

    from mirror_rt.cli import main

    t0 = time.perf_counter()
    assert main(["generate", "hi", *argv]) == 2
    assert time.perf_counter() - t0 < 2.0
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU-only torch")
def test_cli_checks_the_device_before_loading(no_loading, capsys):
    from mirror_rt.cli import main

    assert main(["generate", "hi", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "device 'cuda' requested" in err and "Traceback" not in err


def test_cli_target_without_tokenizer_says_so(no_loading, tmp_path, capsys):
    from helpers import save_hf_checkpoint

    from mirror_rt.cli import main

    save_hf_checkpoint(tmp_path, "llama")
    assert main(["generate", "hi", "--target", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "has no tokenizer files" in err and "sentencepiece" not in err


@pytest.fixture
def tiny_dir_with_tokenizer(tmp_path, byte_tok):
    """A tiny random Llama saved with the byte-level tokenizer (vocabulary 300 >= its 287 tokens)."""
    from transformers import PreTrainedTokenizerFast

    from helpers import save_hf_checkpoint

    save_hf_checkpoint(tmp_path, "llama", seed=2, vocab_size=300, eos_token_id=299)
    PreTrainedTokenizerFast(tokenizer_object=byte_tok).save_pretrained(str(tmp_path))
    return tmp_path


def test_cli_ar_streams_text_and_names_no_draft(tiny_dir_with_tokenizer, capsys):
    from mirror_rt import AutoregressiveDecoder, load_model
    from mirror_rt.cli import main

    assert main(["generate", "hello world", "--target", str(tiny_dir_with_tokenizer), "--decoder", "ar",
                 "--max-new-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    assert "draft:" not in err and "[ar] 6 tokens" in err
    model = load_model(tiny_dir_with_tokenizer)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_dir_with_tokenizer))
    ids = torch.tensor([tok("hello world")["input_ids"]])
    expected = AutoregressiveDecoder(model).generate(ids, 6).tokens[0].tolist()
    assert out == tok.decode(expected, skip_special_tokens=True) + "\n"


# --- errors before work: the ops ------------------------------------------------------------

def test_forced_triton_on_cpu_says_why(monkeypatch):
    from mirror_rt import ops

    monkeypatch.setenv("MIRROR_RT_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(ops, "_triton_ok", lambda: True)  # installed or not, the device is the problem
    with pytest.raises(ValueError, match="MIRROR_RT_BACKEND=triton cannot run on cpu.*TRITON_INTERPRET=1"):
        ops.pick_backend(torch.device("cpu"))
    monkeypatch.setattr(ops, "_triton_ok", lambda: False)
    with pytest.raises(ValueError, match="MIRROR_RT_BACKEND=triton.*cannot be imported"):
        ops.pick_backend(torch.device("cuda"))


def test_forced_cpp_without_the_extension_says_why(monkeypatch):
    from mirror_rt import ops

    monkeypatch.setenv("MIRROR_RT_BACKEND", "cpp")
    monkeypatch.setattr(ops, "_cpp", lambda: None)
    with pytest.raises(ValueError, match="MIRROR_RT_BACKEND=cpp.*not built"):
        ops.pick_backend(torch.device("cpu"), "tree_attention")
    with pytest.raises(ValueError, match="MIRROR_RT_BACKEND=cpp.*CPU tensors"):
        ops.pick_backend(torch.device("meta"), "tree_attention")
    assert ops.pick_backend(torch.device("cpu")) == "cpp"  # an op without a C++ operator: the reference


@pytest.mark.parametrize("mode", ["greedy", "match", "rejection"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_verify_accept_refuses_non_finite_logits(mode, bad):
    from mirror_rt import ops

    tokens = torch.tensor([[5, 1, 2], [5, 3, 4]])
    parents = torch.tensor([[-1, 0, 1], [-1, 0, 1]], dtype=torch.int32)
    logits = torch.randn(2, 3, 11)
    extra = {"draft_probs": torch.full((2, 3, 11), 1 / 11)} if mode == "rejection" else {}
    ops.verify_accept(tokens, parents, logits, mode, **extra)  # finite: fine
    logits[1, 2, 7] = bad
    with pytest.raises(FloatingPointError, match=r"target_logits hold NaN/inf values \(batch rows \[1\]\)"):
        ops.verify_accept(tokens, parents, logits, mode, **extra)
    if mode == "rejection":
        extra["draft_probs"][0, 0, 0] = float("nan")
        with pytest.raises(FloatingPointError, match="draft_probs"):
            ops.verify_accept(tokens, parents, torch.randn(2, 3, 11), mode, **extra)


# --- the ops' docstrings are the contract ---------------------------------------------------

@pytest.mark.parametrize("name, phrases", [
    ("tree_attention", ["True = query i", "MAY", "cache_seqlens [B] int32", "[B, Tq, Hq, D]", "Hq % Hkv == 0",
                        "D ** -0.5", "float32"]),
    ("verify_accept", ["parents[:, 0] = -1", "parents[b, i] < i", "greedy", "match", "rejection",
                       "draft_probs   [B, T, V]", "uniforms", "NON-ROOT", "not counted", "-1", "next_token [B] int64",
                       "FloatingPointError", "min(1, p(x) / q(x))"]),
])
def test_ops_docstrings_carry_the_contract(name, phrases):
    import doctest

    from mirror_rt import ops

    fn = getattr(ops, name)
    for phrase in phrases:
        assert phrase in fn.__doc__, f"ops.{name}'s docstring does not say {phrase!r}"
    # its example runs and prints what it says
    test = doctest.DocTestFinder().find(fn, name, globs={"torch": torch, name: fn})[0]
    assert test.examples, f"ops.{name} has no example"
    result = doctest.DocTestRunner().run(test)
    assert result.failed == 0


# --- the example ----------------------------------------------------------------------------

def test_transformers_example_runs_and_agrees(capsys):
    import importlib.util
    import os

    from helpers import ROOT

    path = os.path.join(ROOT, "examples", "transformers_to_mirror_rt.py")
    spec = importlib.util.spec_from_file_location("transformers_to_mirror_rt", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main(["--max-new-tokens", "30"]) == 0
    out = capsys.readouterr().out
    # the stop string ended both runs at the 6th of 30 allowed tokens, with the same tokens
    assert "6 tokens" in out and "the same tokens as transformers" in out
    hf_text, ours_text = out.split("--- transformers ---\n")[1].split("\n--- mirror_rt (sd) ---\n")
    assert ours_text.splitlines()[0] == hf_text.strip("\n")



def test_cli_stop_string(tiny_dir_with_tokenizer, capsys):
    from mirror_rt.cli import main

    argv = ["generate", "hello world", "--target", str(tiny_dir_with_tokenizer), "--decoder", "sd",
            "--draft", "truncated:1", "--max-new-tokens", "12"]
    assert main(argv) == 0
    full = capsys.readouterr().out.rstrip("\n")
    stop = full[len(full) // 2:len(full) // 2 + 2]  # two characters from the middle of what it says
    assert main(argv + ["--stop", stop]) == 0
    cut = capsys.readouterr().out.rstrip("\n")
    end = full.index(stop) + len(stop)  # where the first occurrence of the stop string ends
    # the output ends with the token that completes it: past `end` by less than one token's text
    assert full.startswith(cut) and end <= len(cut) < len(full) and len(cut) - end < 8

# --- sliding-window attention ---------------------------------------------------------------

def _windowed(arch, **kw):
    from helpers import random_hf_model

    extra = {"sliding_window": 16}
    if arch != "mistral":  # Qwen2: the window only with use_sliding_window, from max_window_layers on
        extra.update(use_sliding_window=True, max_window_layers=1)
    extra.update(kw)
    return random_hf_model(arch, seed=4, **extra)


def test_sliding_window_config_follows_transformers():
    from mirror_rt.models.config import ModelConfig

    assert ModelConfig.from_hf(_windowed("mistral").config.to_dict()).sliding_layers == (0, 1, 2)
    cfg = ModelConfig.from_hf(_windowed("qwen2").config.to_dict())
    assert (cfg.sliding_window, cfg.sliding_layers, cfg.max_position) == (16, (1, 2), 256)
    off = ModelConfig.from_hf(_windowed("qwen2", use_sliding_window=False).config.to_dict())
    assert off.sliding_window is None and off.sliding_layers == ()


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_sliding_window_logits_past_the_window(arch):
    from helpers import assert_close, hf_logits

    from mirror_rt import load_model

    hf = _windowed(arch)
    model = load_model(hf)
    ids = torch.randint(3, 61, (1, 40), generator=torch.Generator().manual_seed(1))
    want = hf_logits(hf, ids)
    assert_close(_our_logits(model, ids), want, 1e-4, f"{arch} 40 tokens, window 16")
    # in pieces: a 30-token chain, then one token at a time (the slice path), then a 3-token chain
    cache = model.new_cache(40)
    got = [model(ids[:, :30], cache)]
    cache.commit(30)
    for t in range(30, 37):
        got.append(model(ids[:, t:t + 1], cache))
        cache.commit(1)
    got.append(model(ids[:, 37:], cache))
    assert_close(torch.cat(got, 1), want, 1e-4, f"{arch} incremental")
    # a chain-shaped tree past the window equals the chain (the dense masked path)
    cache.rollback(33)
    tree = torch.ones(1, 7, 7, dtype=torch.bool).tril()
    got = model(ids[:, 33:], cache, positions=torch.arange(33, 40)[None], tree_mask=tree)
    assert_close(got, want[:, 33:], 1e-4, f"{arch} tree")
    # a tree grown over several forwards deeper than the window: refused, naming the window
    cache.rollback(20)
    with pytest.raises(ValueError, match="sliding window \\(16 tokens\\)"):
        model(ids[:, :7], cache, positions=torch.arange(30, 37)[None], tree_mask=torch.ones(1, 7, 17, dtype=torch.bool),
              tree_offset=10)


@pytest.mark.parametrize("decoder", ["ar", "sd", "mirror"])
def test_sliding_window_generation_matches_transformers(decoder):
    import mirror_rt
    from mirror_rt.models.derive import truncated_copy

    hf = _windowed("mistral")
    target = mirror_rt.load_model(hf)
    draft = truncated_copy(target, 2)
    dec = {"ar": lambda: mirror_rt.AutoregressiveDecoder(target),
           "sd": lambda: mirror_rt.SpeculativeDecoder(target, draft, 3),
           "mirror": lambda: mirror_rt.MirrorDecoder(target, draft, mirror_rt.MirrorConfig(window=3))}
    ids = torch.randint(3, 61, (1, 40), generator=torch.Generator().manual_seed(2))
    want = hf.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None)[0, 40:].tolist()
    d = dec[decoder]()
    assert d.generate(ids, 24, eos_token_id=[]).tokens[0].tolist() == want


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_sliding_window_in_the_static_forward(arch):
    """The static-shape forward (what torch.compile traces) keeps the window too."""
    from helpers import assert_close, hf_logits

    from mirror_rt import load_model

    hf = _windowed(arch)
    model = load_model(hf)
    ids = torch.randint(3, 61, (1, 40), generator=torch.Generator().manual_seed(3))
    want = hf_logits(hf, ids)
    cache = model.new_cache(48)

    def static(new, **kw):
        with torch.inference_mode():
            h = model.run_layers_static(model.embed(new), 0, model.num_layers, cache.k, cache.v, cache.length_t, **kw)
            return model.head(h)

    assert_close(static(ids[:, :34]), want[:, :34], 1e-4, f"{arch} static chain")
    cache.commit(34)
    assert_close(static(ids[:, 34:35]), want[:, 34:35], 1e-4, f"{arch} static one token")
    tree = torch.ones(1, 6, 6, dtype=torch.bool).tril()
    got = static(ids[:, 34:], positions=torch.arange(34, 40)[None], tree_mask=tree)
    assert_close(got, want[:, 34:], 1e-4, f"{arch} static tree")
