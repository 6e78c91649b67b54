"""torch.ops.mirror_rt.*: every custom op passes torch.library.opcheck (schema, fake kernel,
dispatch) on odd shapes and gives what the front door gives; a graph holding them compiles whole."""
import pytest
import torch

from mirror_rt import ops
from mirror_rt.ops import library, reference


def _tree_case(B=2, Tq=3, T=5, Hq=6, Hkv=2, D=12, S=17, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, Tq, Hq, D, generator=g).to(dtype)
    kc, vc = (torch.randn(B, S, Hkv, D, generator=g).to(dtype) for _ in range(2))
    kt, vt = (torch.randn(B, T, Hkv, D, generator=g).to(dtype) for _ in range(2))
    seqlens = torch.tensor([min(7, S), 0, S][:B], dtype=torch.int32)
    mask = torch.rand(B, Tq, T, generator=g) > 0.3
    return q, kc, vc, seqlens, kt, vt, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tree_attention_opcheck_and_matches_reference(dtype):
    args = _tree_case(dtype=dtype)
    torch.library.opcheck(torch.ops.mirror_rt.tree_attention, (*args, None))
    torch.library.opcheck(torch.ops.mirror_rt.tree_attention, (*_tree_case(B=1, Tq=1, T=1, Hq=3, Hkv=3, D=5, S=1), 0.3))
    got = torch.ops.mirror_rt.tree_attention(*args)
    want = reference.tree_attention_ref(*args)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    torch.testing.assert_close(got, ops.tree_attention(*args), atol=tol, rtol=tol)


def test_verify_accept_opcheck_every_mode():
    g = torch.Generator().manual_seed(2)
    B, T, V = 2, 5, 13
    tokens = torch.randint(0, V, (B, T), generator=g)
    parents = torch.tensor([[-1, 0, 1, 1, 3], [-1, 0, 0, 2, 2]], dtype=torch.int32)
    logits = torch.randn(B, T, V, generator=g)
    tokens[0, 1] = logits[0, 0].argmax()  # at least one accepted node
    uniforms = torch.rand(B, T, generator=g)
    draft = torch.softmax(torch.randn(B, T, V, generator=g), -1)
    for mode, dp, u in (("greedy", None, None), ("match", None, uniforms), ("rejection", draft, uniforms)):
        args = (tokens, parents, logits, mode, 0.7, 0, 1.0, dp, u)
        torch.library.opcheck(torch.ops.mirror_rt.verify_accept, args)
        got = torch.ops.mirror_rt.verify_accept(*args)
        want = ops.verify_accept(tokens, parents, logits, mode, temperature=0.7, draft_probs=dp, uniforms=u)
        for a, b in zip(got, want):
            assert torch.equal(a, b), mode


@pytest.mark.parametrize("rows,k,n,bias", [(1, 37, 29, True), (3, 5, 1, False), (8, 64, 33, True), (11, 7, 9, True)])
def test_small_linear_opcheck_and_matches_reference(rows, k, n, bias):
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    torch.library.opcheck(torch.ops.mirror_rt.small_linear, (x, w, b))
    torch.testing.assert_close(torch.ops.mirror_rt.small_linear(x, w, b), reference.linear_ref(x, w, b),
                               atol=1e-4, rtol=1e-4)
    x3 = torch.randn(1, rows, k, generator=g)  # leading dims kept
    torch.testing.assert_close(library.linear_in_graph(x3, w, b), reference.linear_ref(x3, w, b), atol=1e-4, rtol=1e-4)


def test_small_linear_fits_only_what_the_kernel_takes():
    w = torch.randn(4, 6)
    assert library.small_linear_fits(torch.randn(2, 6), w, None) == (library._small_linear_rows() > 0)
    assert not library.small_linear_fits(torch.randn(2, 6, dtype=torch.float64), w.double(), None)
    assert not library.small_linear_fits(torch.randn(2, 6), torch.randn(6, 4).t(), None)  # strided weight
    assert not library.small_linear_fits(torch.randn(2, 5), w, None)
    assert not library.small_linear_fits(torch.randn(64, 6), w, None)


def test_ops_compile_into_one_graph():
    """A function calling every op compiles with fullgraph=True (no graph break) and matches eager."""
    args = _tree_case()
    w = torch.randn(9, 12)

    def step(q, kc, vc, seqlens, kt, vt, mask):
        out = torch.ops.mirror_rt.tree_attention(q, kc, vc, seqlens, kt, vt, mask)
        return library.linear_in_graph(out[:, :, 0], w)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), step(*args))
