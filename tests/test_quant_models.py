"""Quantized models: GGUF blocks kept at load (each kept type), quantizing at load, the weight-bytes
count, the Speculative Streaming draft quantized and exported, and greedy SD / Mirror-SD lossless
against AR on a quantized target."""
import numpy as np
import pytest
import torch

from helpers import permute_for_gguf
from mirror_rt.decoders import AutoregressiveDecoder, MirrorConfig, MirrorDecoder, Placement, SpeculativeDecoder
from mirror_rt.models import load_model
from mirror_rt.models.derive import random_model, truncated_copy
from mirror_rt.models.quant import QuantEmbedding, QuantLinear, quantize, quantize_model, weight_bytes
from mirror_rt.models.streaming import StreamingDraft, load_streaming_draft, save_streaming_draft
from mirror_rt.models import cpu_layer
from mirror_rt.ops.quant import int8_grid_ref

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4, num_kv_heads=2,
            head_dim=16, tie_embeddings=True, max_position=256)


def _write_gguf(path, model, layer_type: str):
    """A llama GGUF of ``model``: layer linears in ``layer_type``, embedding Q8_0, norms F32."""
    import gguf

    G = gguf.GGMLQuantizationType
    kinds = {"q8_0": G.Q8_0, "q4_0": G.Q4_0, "q4_1": G.Q4_1}
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("context_length", c.max_position), ("embedding_length", c.hidden_size),
                       ("block_count", c.num_layers), ("feed_forward_length", c.intermediate_size),
                       ("attention.head_count", c.num_heads), ("attention.head_count_kv", c.num_kv_heads),
                       ("vocab_size", c.vocab_size)):
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", c.rms_eps)
    w.add_token_list([f"t{i}".encode() for i in range(c.vocab_size)])
    w.add_eos_token_id(2)
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}

    def add(name, arr, kind):
        arr = arr.detach().float().numpy()
        if kind is None:
            w.add_tensor(name, np.ascontiguousarray(arr))
        else:
            blocks = quantize(torch.from_numpy(arr), kind).numpy()
            w.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=kinds[kind])

    add("token_embd.weight", model.embed_tokens.weight, "q8_0")
    add("output_norm.weight", model.norm.weight, None)
    for i, layer in enumerate(model.layers):
        add(f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight, None)
        add(f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight, None)
        for part in (layer.self_attn, layer.mlp):
            for attr, gname in names.items():
                if hasattr(part, attr):
                    weight = getattr(part, attr).weight.detach()
                    if attr in ("q_proj", "k_proj"):
                        heads = c.num_heads if attr == "q_proj" else c.num_kv_heads
                        weight = torch.from_numpy(np.ascontiguousarray(permute_for_gguf(weight.numpy(), heads)))
                    add(f"blk.{i}.{gname}.weight", weight, layer_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def source():
    return random_model(seed=3, **TINY)


@pytest.mark.parametrize("layer_type", ["q8_0", "q4_0", "q4_1"])
def test_gguf_blocks_are_kept_as_written(tmp_path, source, layer_type):
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, source, layer_type)
    model = load_model(path)
    parts = dict(model.layers[1].self_attn.qkv_proj.unfused())  # q, k, v: one call (fused at load)
    assert isinstance(model.embed_tokens, QuantEmbedding)
    # the file's rows of blocks, q/k rotary order undone: what quantizing the source's rows gives
    for mine, theirs in ((parts["q_proj"], source.layers[1].self_attn.q_proj),
                         (parts["k_proj"], source.layers[1].self_attn.k_proj),
                         (dict(model.layers[2].mlp.gate_up_proj.unfused())["up_proj"], source.layers[2].mlp.up_proj),
                         (model.layers[2].mlp.down_proj, source.layers[2].mlp.down_proj)):
        assert mine.qtype == {"q8_0": 8, "q4_0": 2, "q4_1": 3}[layer_type]
        assert torch.equal(mine.weight.row_blocks(), quantize(theirs.weight, layer_type))
    assert model.lm_head.blocks.data_ptr() == model.embed_tokens.blocks.data_ptr()  # tied: one table
    assert weight_bytes(model) <= 1.2 * path.stat().st_size
    dense = load_model(path, quant="dequantize")
    assert isinstance(dense.layers[0].self_attn.q_proj.weight, torch.nn.Parameter)
    assert weight_bytes(dense) > 2 * weight_bytes(model)
    for name, module in model.named_modules():  # the float load reads the same values
        if isinstance(module, QuantLinear) and name != "lm_head":
            parent = name.rpartition(".")[0]
            for part, q in (module.unfused() if hasattr(module, "parts") else [(name.rpartition(".")[2], module)]):
                assert torch.equal(q.weight.dequantize(), dense.get_submodule(f"{parent}.{part}").weight)
    for module in dense.modules():  # the float model with its linears' inputs quantized as the kernel does
        if isinstance(module, torch.nn.Linear):
            module.forward = lambda x, m=module: torch.nn.functional.linear(int8_grid_ref(x), m.weight, m.bias)
    ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
    with torch.inference_mode():
        got, want = model(ids, model.new_cache(16)), dense(ids, dense.new_cache(16))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)  # fp32 arithmetic both: rounding apart



def test_bad_quant_arguments(tmp_path, source):
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, source, "q4_0")
    with pytest.raises(ValueError, match="quant must be one of"):
        load_model(path, quant="q3_k")
    with pytest.raises(ValueError, match="CPU in float32"):
        load_model(path, dtype="bfloat16", quant="q8_0")
    with pytest.warns(UserWarning, match="dequantizing"):
        bf = load_model(path, dtype="bfloat16")
    assert not any(isinstance(m, QuantLinear) for m in bf.modules())
    data = bytearray(path.read_bytes())
    data[-40:] = b"\xff" * 40  # a Q4_0 block's scale turns NaN in the last tensor
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"bad\.gguf.*(finite|corrupt)"):
        load_model(bad)


def _quantized_pair(qtype):
    target = quantize_model(random_model(seed=7, **TINY), qtype)
    return target, truncated_copy(target, 1)


@pytest.mark.parametrize("qtype", ["q4_0", "q8_0"])
def test_sd_and_mirror_are_lossless_on_a_quantized_target(qtype):
    target, draft = _quantized_pair(qtype)
    assert isinstance(target.layers[0].mlp.gate_up_proj, QuantLinear)
    prompt = torch.tensor([[1, 17, 42, 5, 88, 23, 9]])
    ar = AutoregressiveDecoder(target).generate(prompt, 24).tokens
    for window in (2, 5):
        assert torch.equal(SpeculativeDecoder(target, draft, window=window).generate(prompt, 24).tokens, ar)
    with MirrorDecoder(target, draft, MirrorConfig(window=3, kappa=2), Placement(lane="inline")) as dec:
        assert torch.equal(dec.generate(prompt, 24).tokens, ar)


def test_streaming_draft_runs_quantized_and_exports_blocks(tmp_path):
    target, _ = _quantized_pair("q4_0")
    with torch.no_grad():
        draft = StreamingDraft.from_target(target, num_layers=1, n_streams=2, vocab_ids=list(range(0, 96, 2)))
    files = save_streaming_draft(draft, str(tmp_path / "d.safetensors"), quant="q4_0")
    loaded = load_streaming_draft(files[0], target)
    assert loaded.layers[0].mlp.gate_up_proj.qtype == 2 and loaded.layers[0].mlp.down_proj.qtype == 2
    plain = save_streaming_draft(draft, str(tmp_path / "p.safetensors"))
    assert (tmp_path / "d.safetensors").stat().st_size < 0.5 * (tmp_path / "p.safetensors").stat().st_size
    auto = load_streaming_draft(plain[0], target)  # float file, quantized target: the draft goes Q8_0
    assert auto.layers[0].self_attn.qkv_proj.qtype == 8
    prompt = torch.tensor([[1, 17, 42, 5, 88]])
    ar = AutoregressiveDecoder(target).generate(prompt, 16).tokens
    for d in (loaded, auto):
        with torch.inference_mode():
            logits = d(prompt, d.new_cache(16))
        assert torch.isfinite(logits).all() and (logits[..., 1::2] < -1e8).all()  # outside the draft vocab
        assert torch.equal(SpeculativeDecoder(target, d, window=3).generate(prompt, 16).tokens, ar)


def test_fused_projections_give_the_same_bits():
    fused = quantize_model(random_model(seed=9, **TINY), "q4_1")
    plain = quantize_model(random_model(seed=9, **TINY), "q4_1", fuse=False)
    assert hasattr(fused.layers[0].self_attn, "qkv_proj") and hasattr(fused.layers[0].mlp, "gate_up_proj")
    assert hasattr(plain.layers[0].self_attn, "q_proj")
    ids = torch.tensor([[1, 17, 42, 5, 88, 23, 9, 60, 3, 11]])
    with torch.inference_mode():
        one = fused(ids[:, :1], fused.new_cache(16))  # a row alone equals the same row in a batch of 10
        assert torch.equal(one[0, 0], fused(ids, fused.new_cache(16))[0, 0])
        for layer in fused.layers:  # in torch's layers (not csrc/core/decoder_layer's), fusing changes no bit
            cpu_layer.run_in_torch(layer)
        assert torch.equal(fused(ids, fused.new_cache(16)), plain(ids, plain.new_cache(16)))
    assert weight_bytes(fused) == weight_bytes(plain)


def test_hf_checkpoint_quantized_at_load(tmp_path):
    from helpers import save_hf_checkpoint

    save_hf_checkpoint(tmp_path, "llama", hidden_size=64, intermediate_size=96, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16)
    dense = load_model(tmp_path, quant="dequantize")
    model = load_model(tmp_path, quant="q4_0")
    assert model.layers[0].mlp.down_proj.qtype == 2 and isinstance(model.embed_tokens, QuantEmbedding)
    assert weight_bytes(model) < 0.5 * weight_bytes(dense)
    want = quantize_model(dense, "q4_0")  # the same quantization applied to the loaded float model
    ids = torch.tensor([[1, 5, 9, 33]])
    with torch.inference_mode():
        assert torch.equal(model(ids, model.new_cache(8)), want(ids, want.new_cache(8)))


def test_float_draft_file_quantized_as_read_equals_quantizing_the_loaded_draft(tmp_path):
    """Loading a float draft file beside a quantized target quantizes each weight as it is read;
    the blocks are the ones quantizing the whole float draft afterwards gives."""
    from mirror_rt.models.streaming import quantize_draft

    target, _ = _quantized_pair("q4_1")
    float_target = random_model(seed=3, **TINY)
    with torch.no_grad():
        draft = StreamingDraft.from_target(target, num_layers=2, n_streams=2)
    files = save_streaming_draft(draft, str(tmp_path / "d.safetensors"))
    as_read = load_streaming_draft(files[0], target)
    afterwards = quantize_draft(load_streaming_draft(files[0], float_target).float(), "q8_0")
    blocks = {k: v for k, v in as_read.state_dict().items() if k.startswith("layers.")}
    other = {k: v for k, v in afterwards.state_dict().items() if k.startswith("layers.")}
    assert sorted(blocks) == sorted(other) and any(k.endswith(".blocks") for k in blocks)
    assert all(torch.equal(blocks[k], other[k]) for k in blocks)
