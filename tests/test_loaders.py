"""Loaders: GGUF (with llama.cpp's q/k row permutation) and the errors of bad checkpoints."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import (assert_close, hf_logits, permute_for_gguf, random_hf_model, save_hf_checkpoint,
                     write_tiny_gguf)
from mirror_rt.models import load_model
from mirror_rt.models.loader import _unpermute_rope


def _gguf_kwargs(hf):
    c = hf.config
    return dict(vocab_size=c.vocab_size, hidden=c.hidden_size, ffn=c.intermediate_size,
                layers=c.num_hidden_layers, heads=c.num_attention_heads, kv_heads=c.num_key_value_heads,
                eps=c.rms_norm_eps)


@pytest.fixture(scope="module")
def hf_llama():
    return random_hf_model("llama", seed=3, num_attention_heads=4, num_key_value_heads=2)


def _ids(hf, n=23, seed=0):
    return torch.randint(0, hf.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(6 * 2 * 8 * 5, dtype=np.float32).reshape(6 * 2 * 8, 5)
    for heads in (1, 2, 6):
        permuted = permute_for_gguf(w, heads)
        assert not np.array_equal(permuted, w)
        np.testing.assert_array_equal(_unpermute_rope(permuted, heads), w)


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_weights_and_logits_match_source(tmp_path, tied):
    hf = random_hf_model("llama", seed=4, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, hf.state_dict(), tied=tied, **_gguf_kwargs(hf))
    ours = load_model(path)
    assert ours.config.tie_embeddings == tied and ours.config.num_kv_heads == 2
    assert ours.tokenizer_tokens == tuple(f"t{i}" for i in range(hf.config.vocab_size))
    assert ours.config.eos_token_ids == [2]
    source = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    for name, param in ours.named_parameters():
        assert torch.equal(param, source[name]), f"GGUF tensor {name} differs from the source weight"
    ids = _ids(hf)
    assert_close(ours(ids, ours.new_cache(ids.shape[1])), hf_logits(hf, ids), 1e-4, "GGUF logits")


def test_gguf_agrees_with_transformers_gguf_loader(tmp_path, hf_llama):
    """An independent check of the permutation convention: transformers' own GGUF loader reads
    the file we wrote into the same model."""
    transformers = pytest.importorskip("transformers")
    write_tiny_gguf(tmp_path / "tiny.gguf", hf_llama.state_dict(), **_gguf_kwargs(hf_llama))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32)
    ours = load_model(tmp_path / "tiny.gguf")
    ids = _ids(hf_llama, seed=1)
    assert_close(ours(ids, ours.new_cache(ids.shape[1])), hf_logits(theirs.eval(), ids), 1e-4,
                 "ours vs transformers on the same GGUF")


def test_gguf_without_permutation_is_detected(tmp_path, hf_llama):
    """Sanity for the test above: an unpermuted file gives different logits (our loader really
    undoes a permutation)."""
    write_tiny_gguf(tmp_path / "raw.gguf", hf_llama.state_dict(), permute=False, **_gguf_kwargs(hf_llama))
    ours = load_model(tmp_path / "raw.gguf")
    ids = _ids(hf_llama)
    assert (ours(ids, ours.new_cache(ids.shape[1])) - hf_logits(hf_llama, ids)).abs().max() > 1e-2


def test_load_dtype_keeps_rope_frequencies_fp32(tmp_path):
    """Parameters take the requested dtype; the rotary frequencies stay fp32 (as transformers
    keeps them): bf16 frequencies put the angles off by radians at long positions."""
    save_hf_checkpoint(tmp_path, "llama")
    fp32, bf16 = load_model(tmp_path), load_model(tmp_path, dtype=torch.bfloat16)
    assert bf16.embed_tokens.weight.dtype == torch.bfloat16 and bf16.lm_head.weight.dtype == torch.bfloat16
    assert bf16.inv_freq.dtype == torch.float32
    assert torch.equal(bf16.inv_freq, fp32.inv_freq)
    assert fp32.source == str(tmp_path) and not fp32.training


# --- bad checkpoints --------------------------------------------------------------------------

@pytest.fixture
def hf_dir(tmp_path):
    save_hf_checkpoint(tmp_path, "llama", seed=1)
    return tmp_path


def test_tokenizer_tokens_from_tokenizer_json(hf_dir):
    assert load_model(hf_dir).tokenizer_tokens is None  # no tokenizer.json: unknown, not checked
    spec = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "Ġc": 3}},
            "added_tokens": [{"id": 4, "content": "<|end|>"}, {"id": 1, "content": "b"}]}
    (hf_dir / "tokenizer.json").write_text(json.dumps(spec))
    assert load_model(hf_dir).tokenizer_tokens == ("a", "b", None, "Ġc", "<|end|>")


@pytest.mark.parametrize("cut", [4, 50, 0.5, -1])
def test_truncated_safetensors(hf_dir, cut):
    f = hf_dir / "model.safetensors"
    data = f.read_bytes()
    n = cut if isinstance(cut, int) and cut > 0 else (len(data) - 1 if cut == -1 else int(len(data) * cut))
    f.write_bytes(data[:n])
    with pytest.raises(ValueError, match=r"model\.safetensors.*(corrupt|truncated)"):
        load_model(hf_dir)


def test_garbage_safetensors(hf_dir):
    (hf_dir / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"not json at all!")
    with pytest.raises(ValueError, match="corrupt"):
        load_model(hf_dir)


@pytest.mark.parametrize("key", ["hidden_size", "num_hidden_layers", "vocab_size", "model_type"])
def test_missing_config_key(hf_dir, key):
    cfg = json.loads((hf_dir / "config.json").read_text())
    del cfg[key]
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=key):
        load_model(hf_dir)


def test_bad_config_values(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type"):
        load_model(hf_dir)
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "intermediate_size": "40"}))
    with pytest.raises(ValueError, match="intermediate_size"):
        load_model(hf_dir)
    (hf_dir / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        load_model(hf_dir)
    (hf_dir / "config.json").unlink()
    with pytest.raises(ValueError, match="config.json"):
        load_model(hf_dir)


def test_wrong_and_missing_tensors(hf_dir):
    f = hf_dir / "model.safetensors"
    tensors = load_file(f)
    name = "model.layers.1.mlp.up_proj.weight"
    bad = dict(tensors)
    bad[name] = torch.zeros(7, 32)
    save_file(bad, f)
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.up_proj\.weight.*\(7, 32\)"):
        load_model(hf_dir)
    missing = {k: v for k, v in tensors.items() if k != name}
    save_file(missing, f)
    with pytest.raises(ValueError, match=r"missing tensors.*layers\.1\.mlp\.up_proj\.weight"):
        load_model(hf_dir)
    f.unlink()
    with pytest.raises(ValueError, match="safetensors"):
        load_model(hf_dir)


def test_bad_paths(tmp_path):
    with pytest.raises(ValueError, match="neither"):
        load_model(tmp_path / "nope")
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="neither"):
        load_model(tmp_path / "model.bin")


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory, hf_llama):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path, hf_llama.state_dict(), **_gguf_kwargs(hf_llama))
    return path.read_bytes()


@pytest.mark.parametrize("frac", [0.0001, 0.001, 0.01, 0.03, 0.5, 0.999])
def test_truncated_gguf(tmp_path, gguf_bytes, frac):
    path = tmp_path / "cut.gguf"
    path.write_bytes(gguf_bytes[: max(1, int(len(gguf_bytes) * frac))])
    with pytest.raises(ValueError, match=r"cut\.gguf.*(corrupt|truncated|cannot be read)"):
        load_model(path)


def test_garbage_gguf(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 2)
    with pytest.raises(ValueError, match="junk.gguf"):
        load_model(path)


def test_gguf_missing_metadata_and_tensors(tmp_path, hf_llama):
    kw = _gguf_kwargs(hf_llama)
    write_tiny_gguf(tmp_path / "a.gguf", hf_llama.state_dict(), skip=("llama.block_count",), **kw)
    with pytest.raises(ValueError, match="block_count"):
        load_model(tmp_path / "a.gguf")
    write_tiny_gguf(tmp_path / "b.gguf", hf_llama.state_dict(), skip=("blk.2.ffn_up.weight",), **kw)
    with pytest.raises(ValueError, match=r"missing tensors.*layers\.2\.mlp\.up_proj\.weight"):
        load_model(tmp_path / "b.gguf")


@pytest.mark.parametrize("name,shape", [("model.layers.1.mlp.up_proj.weight", (24, 32)),
                                        ("model.layers.1.self_attn.k_proj.weight", (32, 32)),
                                        ("model.layers.0.self_attn.q_proj.weight", (30, 32))])
def test_gguf_wrong_tensor_shape(tmp_path, hf_llama, name, shape):
    state = dict(hf_llama.state_dict())
    state[name] = torch.zeros(shape)
    write_tiny_gguf(tmp_path / "w.gguf", state, permute=False, **_gguf_kwargs(hf_llama))
    short = name.removeprefix("model.")
    with pytest.raises(ValueError, match=rf"w\.gguf.*{short.split('.')[-2]}.*{shape[0]}, {shape[1]}"):
        load_model(tmp_path / "w.gguf")
