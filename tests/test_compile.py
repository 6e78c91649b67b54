"""The compiled forward (mirror_rt.compiled): same tokens as eager, one graph per bucket with no
graph break, no recompilation over a long decode, a failing compile falls back once with a
warning, bad input keeps its errors. CPU tests trace with the aot_eager backend (the same dynamo
graphs, functionalized, without inductor's minutes of C++ compilation); GPU tests use inductor
with CUDA graphs."""
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

from mirror_rt import compiled
from mirror_rt.compiled import CompiledModel, prepare
from mirror_rt.models.derive import random_model

BACKEND = "aot_eager"


def _model(seed=11, **kw):
    shape = dict(num_layers=2, num_heads=6, num_kv_heads=2, head_dim=8, hidden_size=40)
    return random_model(seed=seed, **{**shape, **kw})


def _greedy(model, steps, prompt_len=7, capacity=64, chunk=1):
    """Greedy decoding by hand: prefill, then steps of `chunk` tokens (the greedy token repeated:
    a verification-shaped forward of T = chunk), committing one each step."""
    cache = model.new_cache(capacity)
    ids = torch.randint(0, 64, (1, prompt_len), generator=torch.Generator().manual_seed(0)).to(model.device)
    out = []
    with torch.inference_mode():
        model(ids[:, :-1], cache)
        cache.commit(prompt_len - 1)
        tok = ids[:, -1:]
        for _ in range(steps):
            logits = model(tok.expand(1, chunk), cache)
            cache.commit(1)
            tok = logits[:, :1].argmax(-1)
            out.append(int(tok))
    return out


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_prepare_choices():
    m = _model()
    assert prepare(m, False) is m
    assert prepare(m, "auto") is m  # CPU: "auto" stays eager (compiled.resolve says why)
    c = prepare(m, True, backend=BACKEND)
    assert isinstance(c, CompiledModel) and prepare(c, True) is c
    assert (c.num_layers, c.config, c.device, c.dtype) == (m.num_layers, m.config, m.device, m.dtype)
    for bad in ("yes", 1, None, "AUTO"):
        with pytest.raises(ValueError, match="compile must be"):
            prepare(m, bad)


def test_environment_decides_auto_only(monkeypatch):
    m = _model()
    monkeypatch.setenv("MIRROR_RT_COMPILE", "1")
    assert isinstance(prepare(m, "auto", backend=BACKEND), CompiledModel) and prepare(m, False) is m
    monkeypatch.setenv("MIRROR_RT_COMPILE", "off")
    assert prepare(m, "auto") is m and isinstance(prepare(m, True, backend=BACKEND), CompiledModel)
    assert compiled.resolve("auto", "cuda") is False


@pytest.mark.parametrize("chunk", [1, 3])
def test_compiled_greedy_equals_eager(chunk):
    m = _model()
    c = prepare(m, True, backend=BACKEND)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback would warn
        got = _greedy(c, 24, chunk=chunk)
    assert got == _greedy(m, 24, chunk=chunk)
    assert c.enabled and len(c.buckets) == 1  # one bucket for the steps; the prefill ran eagerly


def test_pieces_and_trees_equal_eager():
    """run_layers over a prefix and a suffix, head, and a tree forward with positions and
    tree_offset (the Mirror-SD and rollout shapes), compiled, equal the eager pieces."""
    m = _model(num_layers=3)
    c = prepare(m, True, backend=BACKEND, min_uses=1)
    g = torch.Generator().manual_seed(5)
    prefix, new = torch.randint(0, 64, (1, 9), generator=g), torch.randint(0, 64, (1, 4), generator=g)
    parents = [-1, 0, 0, 1]
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    positions = torch.tensor([[9, 10, 10, 11]])
    results = []
    for model in (m, c):
        cache = model.new_cache(32)
        with torch.inference_mode():
            m(prefix, cache)  # the prefill eagerly, for both
            cache.commit(9)
            h = model.run_layers(model.embed(new), 0, 1, cache)
            exit_logits = model.head(h)
            logits = model.head(model.run_layers(h, 1, 3, cache))
            tree = model(new, cache, positions=positions, tree_mask=mask[None])
            # the tree's last two nodes again, after its first two sit in uncommitted slots
            split = model(new[:, 2:], cache, positions=positions[:, 2:], tree_mask=mask[None, 2:], tree_offset=2)
        results.append((exit_logits, logits, tree, split))
    assert c.enabled and len(c.buckets) >= 5
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(results[1][3], results[1][2][:, 2:], atol=1e-4, rtol=1e-4)
    assert parents  # the mask above is this tree's ancestor mask


def test_every_bucket_is_one_graph():
    """Each bucket's forward is captured whole: dynamo's explain finds no graph break."""
    m = _model()
    cache = m.new_cache(32)
    with torch.inference_mode():
        m(torch.tensor([[1, 2, 3]]), cache)
        cache.commit(3)
        cases = [dict(T=1), dict(T=5), dict(T=4, tree=True)]
        for case in cases:
            T = case["T"]
            ids = torch.arange(T)[None]
            mask = torch.ones(1, T, T, dtype=torch.bool).tril() if case.get("tree") else None
            explained = torch._dynamo.explain(compiled._forward)(m, ids, cache.k, cache.v, cache.length_t, None,
                                                                  mask, 0)
            assert explained.graph_break_count == 0, (case, explained.break_reasons)
            assert explained.graph_count == 1


def test_200_steps_compile_each_bucket_once():
    m = _model()
    c = prepare(m, True, backend=BACKEND)
    _greedy(c, 3, capacity=256)  # warm: the T = 1 bucket compiles
    before = counters["stats"]["unique_graphs"]
    _greedy(c, 200, capacity=256)  # a new cache of the same capacity, 200 steps at growing lengths
    assert counters["stats"]["unique_graphs"] == before, "a decode step recompiled"
    assert c.enabled and len(c.buckets) == 1


def test_compile_failure_falls_back_with_one_warning():
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no compiler here")

    m = _model()
    c = prepare(m, True, backend=broken_backend, min_uses=1)
    with pytest.warns(RuntimeWarning, match="running it eagerly") as caught:
        got = _greedy(c, 12)
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert got == _greedy(m, 12) and not c.enabled and c.error is not None


def test_bad_input_keeps_its_errors():
    c = prepare(_model(), True, backend=BACKEND, min_uses=1)
    cache = c.new_cache(8)
    assert cache.max_len == compiled.CAPACITY_STEP  # rounded up so lengths share artifacts
    h = c.embed(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="layer range"):
        c.run_layers(h, 1, 5, cache)
    with pytest.raises(ValueError, match="tree_mask must be"):
        c(torch.tensor([[1, 2]]), cache, tree_mask=torch.ones(1, 2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="KV cache full"):
        c(torch.ones(1, compiled.CAPACITY_STEP + 1, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        c.new_cache(c.config.max_position + 1)
    assert c.enabled


@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager():
    """CUDA graphs (inductor, mode="reduce-overhead"), bf16: greedy tokens equal eager's, token
    for token, for a one-token bucket and a verification-sized one (one dtype: each bucket
    compiles for tens of seconds inside the suite's short GPU-test step)."""
    m = _model().to(device="cuda", dtype=torch.bfloat16)
    c = prepare(m, True, backend="inductor")
    assert c.mode == "reduce-overhead"
    assert _greedy(c, 40, chunk=1) == _greedy(m, 40, chunk=1)
    assert _greedy(c, 20, chunk=5) == _greedy(m, 20, chunk=5)
    assert c.enabled, c.error



def test_many_buckets_on_another_thread_and_after_pickling():
    """A lane's thread compiles past dynamo's default limit of 8 graphs a function (its config
    is per thread), and a pickled CompiledModel (a process lane's draft) compiles on its own."""
    import pickle
    import threading

    m = _model(num_layers=1)
    c = pickle.loads(pickle.dumps(prepare(m, True, backend="eager", min_uses=1)))

    def run():
        cache = c.new_cache(32)
        with torch.inference_mode():
            for T in range(1, 11):
                c(torch.ones(1, T, dtype=torch.long), cache)

    worker = threading.Thread(target=run)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        worker.start()
        worker.join()
    assert isinstance(c, CompiledModel) and c.enabled and len(c.buckets) == 10, c.error
