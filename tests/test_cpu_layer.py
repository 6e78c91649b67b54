"""One C++ call per quantized decoder layer for decoding steps (mirror_rt/models/cpu_layer.py,
csrc/core/decoder_layer.cpp): close to the torch layers it replaces, row-exact, and used only where
it applies."""
import pytest
import torch

from mirror_rt.models import cpu_layer
from mirror_rt.models.derive import random_model
from mirror_rt.models.quant import quantize_model


SHAPE = dict(vocab_size=96, hidden_size=96, intermediate_size=160, num_layers=3, num_heads=6, num_kv_heads=2,
             head_dim=16, max_position=256)


def _model(qtype="q4_1", seed=0, **extra):
    return quantize_model(random_model(seed=seed, **SHAPE, **extra), qtype)


def _torch_only(model):
    for layer in model.layers:
        cpu_layer.run_in_torch(layer)


@torch.inference_mode()
def _decode(model, prompt, new, window):
    """Logits of `new` given tokens, fed `window` at a time after the prompt (committed as it goes)."""
    cache = model.new_cache(128)
    model(prompt, cache)
    cache.commit(prompt.shape[1])
    out = []
    for i in range(0, new.shape[1], window):
        ids = new[:, i:i + window]
        out.append(model(ids, cache))
        cache.commit(ids.shape[1])
    return torch.cat(out, 1)


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q8_0"])
def test_matches_the_torch_layers(qtype):
    model = _model(qtype)
    g = torch.Generator().manual_seed(1)
    prompt, new = torch.randint(0, 96, (1, 70), generator=g), torch.randint(0, 96, (1, 9), generator=g)
    fused = _decode(model, prompt, new, 3)
    assert all(isinstance(cpu_layer._STEPS.get(layer), cpu_layer.LayerStep) for layer in model.layers)
    _torch_only(model)
    plain = _decode(model, prompt, new, 3)
    # the same model up to rounding; int8 activations may move a value by one level now and then
    assert (fused - plain).abs().max() <= 0.05 * plain.abs().max()  # a wrong slot, norm or angle: O(1)
    assert torch.equal(fused.argmax(-1), plain.argmax(-1))


@pytest.mark.parametrize("threads", [1, 2])
def test_a_token_alone_equals_the_token_in_a_window(threads):
    model = _model()
    g = torch.Generator().manual_seed(2)
    prompt, new = torch.randint(0, 96, (1, 11), generator=g), torch.randint(0, 96, (1, 8), generator=g)
    torch.set_num_threads(threads)
    try:
        alone, windows = _decode(model, prompt, new, 1), _decode(model, prompt, new, 5)
    finally:
        torch.set_num_threads(2)
    assert torch.equal(alone, windows)


@torch.inference_mode()
def test_the_callers_hidden_state_is_not_changed():
    model = _model()
    cache = model.new_cache(16)
    h = model.embed(torch.tensor([[1, 2, 3]]))
    before = h.clone()
    model.run_layers(h, 0, 2, cache)
    assert torch.equal(h, before)


def test_layers_it_does_not_cover_run_in_torch():
    dense = random_model(seed=0, **SHAPE)
    with torch.inference_mode():
        dense(torch.tensor([[1, 2]]), dense.new_cache(8))
    assert all(cpu_layer.layer_step(layer, dense.config) is None for layer in dense.layers)  # float layers
    model = _model()
    layer = model.layers[0]
    first = cpu_layer.layer_step(layer, model.config)
    assert first is not None and cpu_layer.layer_step(layer, model.config) is first  # built once
    layer.mlp = _model(seed=5).layers[0].mlp  # a swapped module: built again from the new weights
    assert cpu_layer.layer_step(layer, model.config) is not first


def test_a_model_pickled_or_moved_after_a_step_still_decodes_right():
    import pickle

    model = _model()
    g = torch.Generator().manual_seed(3)
    prompt, new = torch.randint(0, 96, (1, 7), generator=g), torch.randint(0, 96, (1, 6), generator=g)
    first = _decode(model, prompt, new, 2)
    copy = pickle.loads(pickle.dumps(model))  # no C++ object or address travels with it (process lanes)
    assert torch.equal(_decode(copy, prompt, new, 2), first)
    before = model.layers[0].mlp.down_proj.blocks.data_ptr()
    model.share_memory()  # moves every tensor, as a process lane does: the steps follow
    assert model.layers[0].mlp.down_proj.blocks.data_ptr() != before
    assert torch.equal(_decode(model, prompt, new, 2), first)


@torch.inference_mode()
def test_a_long_prefill_equals_the_same_tokens_fed_one_by_one():
    """Prompt and output fed again in one forward (as the auto decoder's pieces do) give the bits
    the step-by-step decode gave."""
    model = _model()
    g = torch.Generator().manual_seed(4)
    prompt, new = torch.randint(0, 96, (1, 100), generator=g), torch.randint(0, 96, (1, 6), generator=g)
    stepped = _decode(model, prompt, new, 1)
    whole = model(torch.cat([prompt, new], 1), model.new_cache(128))[:, -new.shape[1]:]
    assert torch.equal(stepped, whole)
