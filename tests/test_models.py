"""The Llama-family runner: parity with transformers, the layer-range split, tree attention."""
import json
import random

import pytest
import torch

from helpers import assert_close, hf_logits, save_hf_checkpoint
from mirror_rt.models import ModelConfig, load_model
from mirror_rt.models.derive import random_model, truncated_copy

ATOL = 1e-4
ODD = dict(num_attention_heads=9, num_key_value_heads=3, head_dim=48, hidden_size=72)

CASES = [
    ("llama", {}),
    ("llama", dict(tie_word_embeddings=True)),
    ("llama", ODD),
    ("llama", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                   rope_theta=500.0)),
    ("mistral", dict(num_key_value_heads=1)),
    ("qwen2", {}),
    ("qwen2", dict(ODD, tie_word_embeddings=True)),
    ("qwen3", {}),
    ("qwen3", dict(ODD, tie_word_embeddings=True)),
]
IDS = [f"{a}-" + ("-".join(f"{k}={v}" for k, v in kw.items() if k != "rope_scaling")
                  + ("-llama3rope" if "rope_scaling" in kw else "") or "base") for a, kw in CASES]


@pytest.fixture(params=CASES, ids=IDS)
def hf_pair(request, tmp_path):
    arch, kw = request.param
    hf = save_hf_checkpoint(tmp_path, arch, seed=len(request.node.name), **kw)
    return hf, load_model(tmp_path), arch, kw


def test_loaded_config_matches(hf_pair):
    hf, ours, arch, kw = hf_pair
    c = ours.config
    assert c.arch == arch
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (hf.config.num_attention_heads,
                                                          hf.config.num_key_value_heads,
                                                          hf.model.layers[0].self_attn.head_dim)
    assert c.tie_embeddings == bool(kw.get("tie_word_embeddings", False))
    if c.tie_embeddings:
        assert ours.lm_head.weight.data_ptr() == ours.embed_tokens.weight.data_ptr()
    else:
        assert not torch.equal(ours.lm_head.weight, ours.embed_tokens.weight)
    assert c.qkv_bias == (arch == "qwen2") and c.qk_norm == (arch == "qwen3")
    assert (c.rope_scaling is not None) == ("rope_scaling" in kw)


def test_prefill_logits_match_transformers(hf_pair):
    hf, ours, arch, _ = hf_pair
    ids = torch.randint(0, hf.config.vocab_size, (1, 37), generator=torch.Generator().manual_seed(1))
    expected = hf_logits(hf, ids)
    got = ours(ids, ours.new_cache(64))
    assert_close(got, expected, ATOL, f"{arch} prefill logits")


def test_cached_decoding_matches_transformers(hf_pair):
    """Prefill a prefix, then feed one token at a time (and one chunk of 3) through the cache."""
    hf, ours, arch, _ = hf_pair
    ids = torch.randint(0, hf.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(2))
    expected = hf_logits(hf, ids)
    cache = ours.new_cache(40)
    P = 11
    got = [ours(ids[:, :P], cache)]
    cache.commit(P)
    t = P
    while t < ids.shape[1]:
        step = 3 if t == 20 else 1
        got.append(ours(ids[:, t:t + step], cache))
        cache.commit(step)
        t += step
    assert cache.length == ids.shape[1]
    assert_close(torch.cat(got, 1), expected, ATOL, f"{arch} cached decoding logits")


def test_cached_decoding_is_not_trivially_equal(hf_pair):
    """Sanity for the parity tests: forgetting to commit the cache changes the logits."""
    hf, ours, _, _ = hf_pair
    ids = torch.randint(0, hf.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    expected = hf_logits(hf, ids)[:, -1]
    cache = ours.new_cache(16)
    ours(ids[:, :-1], cache)  # not committed: the last token sees no prefix
    assert (ours(ids[:, -1:], cache)[:, -1] - expected).abs().max() > 1e-2


def test_sharded_checkpoint(tmp_path):
    hf = save_hf_checkpoint(tmp_path, "qwen2", seed=5, max_shard_size="20KB")
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 2, shards
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = load_model(tmp_path)
    ids = torch.randint(0, hf.config.vocab_size, (1, 19), generator=torch.Generator().manual_seed(4))
    assert_close(ours(ids, ours.new_cache(19)), hf_logits(hf, ids), ATOL, "sharded checkpoint logits")


def test_mistral_sliding_window_keeps_the_context(tmp_path):
    """The window is applied in attention (tests/test_hf_habits.py checks it against transformers
    past the window); the context stays max_position_embeddings."""
    save_hf_checkpoint(tmp_path, "mistral", sliding_window=32)
    model = load_model(tmp_path)
    assert (model.config.max_position, model.config.sliding_window) == (256, 32)
    assert model.new_cache(33).max_len == 33


def test_llama3_rope_scaling_is_used(tmp_path):
    """The scaled rope must differ from the unscaled one (else the parity case proves nothing)."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    save_hf_checkpoint(tmp_path, "llama", rope_scaling=scaling, rope_theta=500.0)
    scaled = load_model(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("rope_scaling", None)
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 500.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    plain = load_model(tmp_path)
    assert not torch.allclose(scaled.inv_freq, plain.inv_freq)
    ids = torch.arange(40)[None] % 61
    assert (scaled(ids, scaled.new_cache(40)) - plain(ids, plain.new_cache(40))).abs().max() > 1e-3


# --- layer-range split ------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_layer_split_equals_full_forward_for_every_l(arch):
    extra = dict(arch=arch, qk_norm=arch == "qwen3", num_layers=5)
    model = random_model(seed=7, **extra)
    N = model.num_layers
    g = torch.Generator().manual_seed(8)
    prefix = torch.randint(0, 64, (1, 9), generator=g)
    new = torch.randint(0, 64, (1, 4), generator=g)

    def run(split):
        cache = model.new_cache(16)
        model(prefix, cache)
        cache.commit(prefix.shape[1])
        if split is None:
            logits = model(new, cache)
        else:
            with torch.inference_mode():
                h = model.run_layers(model.embed(new), 0, split, cache)
                h = model.run_layers(h, split, N, cache)
                logits = model.head(h)
        return logits, cache

    full, full_cache = run(None)
    for split in range(N + 1):
        logits, cache = run(split)
        assert_close(logits, full, 1e-6, f"logits with split at layer {split}")
        for layer in range(N):
            assert_close(cache.k[layer][:, :13], full_cache.k[layer][:, :13], 1e-6, f"K of layer {layer}, split {split}")
            assert_close(cache.v[layer][:, :13], full_cache.v[layer][:, :13], 1e-6, f"V of layer {layer}, split {split}")


def test_run_layers_rejects_bad_range():
    model = random_model(seed=0)
    cache = model.new_cache(8)
    h = model.embed(torch.zeros(1, 2, dtype=torch.long))
    for start, end in [(-1, 2), (3, 2), (0, model.num_layers + 1)]:
        with pytest.raises(ValueError, match="layer range"):
            model.run_layers(h, start, end, cache)


# --- tree attention in the runner -------------------------------------------------------------

@pytest.fixture(params=["ref", "default"])
def backend(request, monkeypatch):
    """Tree attention through the torch reference, and through whatever the default dispatch picks
    on this machine (the C++ operator when the extension has it)."""
    if request.param == "ref":
        monkeypatch.setenv("MIRROR_RT_BACKEND", "ref")
    else:
        monkeypatch.delenv("MIRROR_RT_BACKEND", raising=False)
    return request.param


def _model():
    return random_model(seed=11, num_layers=3, num_heads=6, num_kv_heads=2, head_dim=8, hidden_size=40)


def _prefilled(model, prefix, capacity=64):
    cache = model.new_cache(capacity)
    model(prefix, cache)
    cache.commit(prefix.shape[1])
    return cache


def _random_tree(rng: random.Random, T: int):
    parents = [-1] + [rng.randrange(i) for i in range(1, T)]
    depth = [0] * T
    for i in range(1, T):
        depth[i] = depth[parents[i]] + 1
    mask = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        j = i
        while j >= 0:
            mask[i, j] = True
            j = parents[j]
    return parents, depth, mask


def _path(parents, i):
    path = []
    while i >= 0:
        path.append(i)
        i = parents[i]
    return path[::-1]


def test_chain_tree_mask_equals_causal(backend):
    model = _model()
    g = torch.Generator().manual_seed(0)
    prefix, new = torch.randint(0, 64, (1, 10), generator=g), torch.randint(0, 64, (1, 6), generator=g)
    causal = model(new, _prefilled(model, prefix))
    chain = torch.ones(1, 6, 6, dtype=torch.bool).tril()
    tree = model(new, _prefilled(model, prefix), tree_mask=chain)
    assert_close(tree, causal, 1e-4, "chain-shaped tree vs causal")
    # and with an empty committed prefix
    assert_close(model(new, model.new_cache(8), tree_mask=chain), model(new, model.new_cache(8)), 1e-4,
                 "chain-shaped tree vs causal, no prefix")


@pytest.mark.parametrize("seed", range(4))
def test_random_tree_equals_each_path_separately(seed, backend):
    model = _model()
    rng = random.Random(seed)
    T = rng.randrange(2, 12)
    parents, depth, mask = _random_tree(rng, T)
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, 64, (1, rng.randrange(1, 9)), generator=g)
    tokens = torch.randint(0, 64, (1, T), generator=g)
    L = prefix.shape[1]
    positions = (L + torch.tensor(depth))[None]
    cache = _prefilled(model, prefix)
    tree_logits = model(tokens, cache, positions=positions, tree_mask=mask[None])
    assert cache.length == L  # nothing committed by a forward
    for i in range(T):
        path = _path(parents, i)
        ref = model(torch.cat([prefix, tokens[:, path]], 1), model.new_cache(L + len(path)))[:, -1]
        assert_close(tree_logits[:, i], ref, 1e-4, f"tree node {i} (path {path}, parents {parents})")


@pytest.mark.parametrize("seed", range(3))
def test_tree_offset_split_equals_one_call(seed, backend):
    """Nodes already written in earlier uncommitted slots: feeding the tree in two calls (the
    second with tree_offset=k and mask rows [k, T)) gives the one-call logits."""
    model = _model()
    rng = random.Random(100 + seed)
    T = rng.randrange(3, 10)
    k = rng.randrange(1, T)
    parents, depth, mask = _random_tree(rng, T)
    g = torch.Generator().manual_seed(seed)
    prefix, tokens = torch.randint(0, 64, (1, 5), generator=g), torch.randint(0, 64, (1, T), generator=g)
    positions = (5 + torch.tensor(depth))[None]
    one = model(tokens, _prefilled(model, prefix), positions=positions, tree_mask=mask[None])
    cache = _prefilled(model, prefix)
    first = model(tokens[:, :k], cache, positions=positions[:, :k], tree_mask=mask[None, :k, :k])
    second = model(tokens[:, k:], cache, positions=positions[:, k:], tree_mask=mask[None, k:, :], tree_offset=k)
    assert_close(torch.cat([first, second], 1), one, 1e-4, f"tree fed in two calls (k={k}, parents {parents})")


def test_chain_tree_offset_without_mask():
    """tree_mask=None with tree_offset: a causal chain after earlier uncommitted chain slots."""
    model = _model()
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(5))
    full = model(ids, model.new_cache(12))
    cache = _prefilled(model, ids[:, :4])
    a = model(ids[:, 4:7], cache)
    b = model(ids[:, 7:], cache, tree_offset=3)
    assert_close(torch.cat([a, b], 1), full[:, 4:], 1e-4, "chain continued with tree_offset")


def test_commit_path_after_tree_then_continue(backend):
    """Commit an accepted root-to-leaf path with commit_path; the next forward equals the full
    forward of prefix + path + next token."""
    model = _model()
    parents = [-1, 0, 0, 1, 2, 2, 4, 3]
    T = len(parents)
    depth = [0] * T
    for i in range(1, T):
        depth[i] = depth[parents[i]] + 1
    mask = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        for j in _path(parents, i):
            mask[i, j] = True
    g = torch.Generator().manual_seed(9)
    prefix, tokens = torch.randint(0, 64, (1, 6), generator=g), torch.randint(0, 64, (1, T), generator=g)
    nxt = torch.randint(0, 64, (1, 1), generator=g)
    for leaf in (6, 7, 5, 0):
        cache = _prefilled(model, prefix)
        model(tokens, cache, positions=(6 + torch.tensor(depth))[None], tree_mask=mask[None])
        path = _path(parents, leaf)
        cache.commit_path(path)
        assert cache.length == 6 + len(path)
        got = model(nxt, cache)[:, -1]
        seq = torch.cat([prefix, tokens[:, path], nxt], 1)
        ref = model(seq, model.new_cache(seq.shape[1]))[:, -1]
        assert_close(got, ref, 1e-4, f"continuation after committing path {path}")


def test_tree_mask_shape_checked():
    model = _model()
    cache = model.new_cache(8)
    with pytest.raises(ValueError, match="tree_mask"):
        model(torch.zeros(1, 3, dtype=torch.long), cache, tree_mask=torch.ones(1, 3, 4, dtype=torch.bool))


# --- derived models ---------------------------------------------------------------------------

def test_truncated_copy_shares_weights_and_runs_first_layers():
    model = random_model(seed=3, num_layers=4)
    draft = truncated_copy(model, 2)
    assert draft.num_layers == 2 and "2 of 4" in draft.name
    assert draft.lm_head.weight is model.lm_head.weight and draft.layers[1] is model.layers[1]
    ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        cache = model.new_cache(7)
        ref = model.head(model.run_layers(model.embed(ids), 0, 2, cache))
    assert_close(draft(ids, draft.new_cache(7)), ref, 1e-6, "truncated copy vs first two layers + head")
    for bad in (0, 5):
        with pytest.raises(ValueError, match="num_layers"):
            truncated_copy(model, bad)


def test_model_config_validation():
    base = dict(arch="llama", vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                num_heads=2, num_kv_heads=2, head_dim=4)
    ModelConfig(**base)
    for field, value, match in [("arch", "gpt2", "architecture"), ("num_heads", 3, "num_heads"),
                                ("head_dim", 5, "head_dim"), ("vocab_size", 0, "vocab_size")]:
        with pytest.raises(ValueError, match=match):
            ModelConfig(**{**base, field: value})
