"""The quantized-weight kernels (mirror_rt._C.quant_linear, dequantize_rows) against their references:
odd shapes, 1-8 rows and a prefill size, both code paths, bitwise row consistency, bad blocks."""
import numpy as np
import pytest
import torch

from mirror_rt import _C, ops
from mirror_rt.models.quant import QuantEmbedding, QuantLinear, quantize
from mirror_rt.ops.quant import (QuantWeight, check_blocks, dequantize_ref, int8_grid_ref, pack_rows8, quant_linear,
                                  pack_rows8_ref, quant_linear_ref, quantize_x_ref,
                                  unpack_rows8)

QTYPES = ("q8_0", "q4_0", "q4_1")
LAYOUTS = ("rows", "packed")


def _weight(out, in_, qtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, in_, generator=g)
    return w, quantize(w, qtype)


def _in_layout(blocks, qtype, shape, layout) -> QuantWeight:
    """The row-major blocks as the kernel's input in ``layout`` (the packed one: pack_rows8)."""
    if layout == "packed":
        return QuantWeight(pack_rows8(blocks, qtype), qtype, shape, packed=True)
    return QuantWeight(blocks, qtype, shape)


def _odd(out, layout):
    """An odd feature count for the row-major layout, an odd number of 8-row groups for the packed."""
    return out if layout == "rows" else (out // 16) * 16 + 8


@pytest.fixture(params=["avx2", "portable"])
def isa(request):
    if request.param == "avx2" and _C.quant_linear_isa() != "avx2":
        pytest.skip("no AVX2 on this CPU")
    _C.quant_linear_force_portable(request.param == "portable")
    yield request.param
    _C.quant_linear_force_portable(False)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 37])
def test_kernel_matches_references(qtype, rows, isa, layout):
    out = _odd(67, layout)
    w, blocks = _weight(out, 160, qtype, seed=rows)  # odd feature count, an odd number of blocks
    x = torch.randn(rows, 160, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(out)
    got = quant_linear(x, _in_layout(blocks, qtype, w.shape, layout), bias)
    # float64 against the dequantized weight, and dequantize-then-matmul in float32 (x quantized as
    # the kernel quantizes it in both): rounding apart
    torch.testing.assert_close(got, quant_linear_ref(x, blocks, qtype, w.shape, bias), atol=1e-4, rtol=1e-5)
    want = int8_grid_ref(x) @ dequantize_ref(blocks, qtype, w.shape).T + bias
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-5)
    # and x's quantization costs what int8 costs: within 2% of the unquantized product's scale
    exact = x @ dequantize_ref(blocks, qtype, w.shape).T + bias
    assert (got - exact).abs().max() <= 0.02 * exact.abs().max()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_each_row_is_bitwise_the_same_whatever_rows_come_with_it(qtype, threads, isa, layout):
    w, blocks = _weight(_odd(333, layout), 96, qtype)
    W = _in_layout(blocks, qtype, w.shape, layout)
    x = torch.randn(19, 96)
    torch.set_num_threads(threads)
    try:
        together = quant_linear(x, W)
        for m in (0, 7, 8, 18):
            assert torch.equal(quant_linear(x[m:m + 1], W)[0], together[m])
        for r in range(1, 9):
            assert torch.equal(quant_linear(x[:r], W), together[:r])
    finally:
        torch.set_num_threads(2)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("qtype", QTYPES)
def test_dequantize_rows_and_embedding(qtype, layout):
    w, blocks = _weight(_odd(41, layout), 64, qtype)
    ref = dequantize_ref(blocks, qtype, w.shape)
    assert torch.equal(_in_layout(blocks, qtype, w.shape, layout).dequantize(), ref)
    ids = torch.tensor([[3, 39, 0], [3, 7, 7]])
    emb = QuantEmbedding(blocks, qtype, w.shape)  # packs a multiple of 8 rows by itself
    assert emb.packed == (layout == "packed")
    assert torch.equal(emb(ids), ref[ids])
    assert torch.equal(emb.weight[torch.tensor([39, 2])].blocks, blocks[[39, 2]])  # rows selected row-major
    with pytest.raises(ValueError, match="outside"):
        emb(torch.tensor([w.shape[0]]))
    # quantizing a float weight and back stays within the format's step
    step = {"q8_0": 1 / 127, "q4_0": 1 / 7, "q4_1": 1 / 15}[qtype]
    assert ((ref - w).abs().amax(1) <= step * w.abs().amax(1) * 1.01 + 1e-6).all()


def test_quantizers_match_ggml_bitwise():
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize as gguf_quantize

    w = torch.randn(9, 128)
    for qtype, gtype in (("q8_0", Q.Q8_0), ("q4_0", Q.Q4_0), ("q4_1", Q.Q4_1)):
        assert torch.equal(quantize(w, qtype), torch.from_numpy(gguf_quantize(w.numpy(), gtype)))


def test_ops_linear_front_door_and_module():
    w, blocks = _weight(48, 64, "q4_0")
    layer = QuantLinear(blocks, "q4_0", w.shape, bias=torch.zeros(48))
    x = torch.randn(2, 3, 64)
    want = quant_linear_ref(x, blocks, "q4_0", w.shape)
    torch.testing.assert_close(layer(x), want, atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(ops.linear(x, layer.weight), want, atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(ops.linear(x.double(), layer.weight), want.double(), atol=2e-4, rtol=1e-5)
    sub = layer.weight.detach()[torch.tensor([5, 1])]
    torch.testing.assert_close(ops.linear(x, sub), want[..., [5, 1]], atol=2e-4, rtol=1e-5)
    with pytest.raises(RuntimeError, match="inference only"):
        layer(torch.randn(1, 64, requires_grad=True))
    with pytest.raises(ValueError, match=r"\[\.\.\., 64\]"):
        layer(torch.randn(1, 63))


def test_bad_blocks_get_clear_errors():
    w, blocks = _weight(4, 64, "q8_0")
    with pytest.raises(ValueError, match="truncated"):
        check_blocks(blocks.reshape(-1)[:-5], "q8_0", w.shape)
    with pytest.raises(ValueError, match="multiple of 32"):
        check_blocks(blocks, "q8_0", (4, 60))
    with pytest.raises(TypeError, match="uint8"):
        check_blocks(blocks.float(), "q8_0", w.shape)
    with pytest.raises(ValueError, match="one of"):
        check_blocks(blocks, "q5_k", w.shape)
    bad = blocks.clone()
    bad[2, 0:2] = torch.tensor(np.array([np.inf], dtype=np.float16).view(np.uint8))
    with pytest.raises(ValueError, match="row 2"):
        QuantLinear(bad, "q8_0", w.shape)
    out = torch.empty(1, 4)
    with pytest.raises(ValueError, match="truncated"):
        _C.quant_linear(torch.randn(1, 64), blocks[:, :-1], 8, None, out)
    with pytest.raises(ValueError, match="qtype"):
        _C.quant_linear(torch.randn(1, 64), blocks, 12, None, out)
    with pytest.raises(ValueError, match="shape"):
        _C.quant_linear(torch.randn(2, 64), blocks, 8, None, out)


def test_custom_op_opcheck():
    w, blocks = _weight(24, 64, "q4_1")
    x = torch.randn(3, 64)
    torch.library.opcheck(torch.ops.mirror_rt.quant_linear, (x, blocks, 3, 24, None))
    torch.library.opcheck(torch.ops.mirror_rt.quant_linear, (x, blocks, 3, 24, torch.randn(24)))
    torch.testing.assert_close(torch.ops.mirror_rt.quant_linear(x, blocks, 3, 24, None),
                               quant_linear_ref(x, blocks, "q4_1", w.shape), atol=2e-4, rtol=1e-5)
    ids = torch.tensor([4, 0, 23, 4])
    torch.library.opcheck(torch.ops.mirror_rt.dequantize_rows, (blocks, 3, ids, 64))
    assert torch.equal(torch.ops.mirror_rt.dequantize_rows(blocks, 3, ids, 64), dequantize_ref(blocks, 3, w.shape)[ids])


def test_activation_quantization_follows_ggml():
    """quantize_x_ref is ggml's quantize_row_q8_0 rule (gguf's Python quantizer), d kept in fp32."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize

    x = torch.randn(3, 96) * torch.tensor([0.01, 1.0, 300.0]).repeat_interleave(32)
    x[0, :32] = 0.0  # an all-zero block: d = 0, q = 0
    x[1, 40] = 0.5 * x[1, 32:64].abs().max() / 127 * 3  # a value exactly halfway: rounds away from zero
    q, d = quantize_x_ref(x)
    ggml = torch.from_numpy(gguf_quantize(x.numpy(), GGMLQuantizationType.Q8_0)).reshape(3, 3, 34)
    assert torch.equal(q.reshape(3, 3, 32), ggml[..., 2:].view(torch.int8))
    assert torch.equal(d.half(), ggml[..., :2].contiguous().view(torch.float16).squeeze(-1))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("qtype", QTYPES)
def test_avx2_and_portable_paths_agree_bitwise(qtype, layout):
    if _C.quant_linear_isa() != "avx2":
        pytest.skip("no AVX2 on this CPU")
    w, blocks = _weight(_odd(45, layout), 224, qtype, seed=5)
    W = _in_layout(blocks, qtype, w.shape, layout)
    x = torch.randn(11, 224) * 3
    x[0, :32] = torch.arange(32) - 15.5  # with x[0, 0] = 127 below: d = 1, every value an exact half
    x[0, 0] = 127.0
    fast = quant_linear(x, W)
    _C.quant_linear_force_portable(True)
    try:
        slow = quant_linear(x, W)
    finally:
        _C.quant_linear_force_portable(False)
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("qtype", QTYPES)
def test_packed_layout_holds_the_same_bytes_and_unpacks_exactly(qtype):
    w, blocks = _weight(24, 96, qtype)
    packed = pack_rows8(blocks, qtype)
    assert torch.equal(packed, pack_rows8_ref(blocks, qtype))  # the C++ packer and the torch reference
    assert packed.shape == blocks.shape and torch.equal(unpack_rows8(packed, qtype), blocks)
    assert torch.equal(packed.flatten().sort()[0], blocks.flatten().sort()[0])  # the same bytes, reordered
    # group 1, block 2: the 8 rows' fp16 d first, then (Q4_1) their m, then 4-byte pieces of rows 0..7
    nbytes = blocks.shape[1] // 3
    rec = packed[8:16].reshape(-1)[2 * 8 * nbytes:3 * 8 * nbytes]
    rows = blocks[8:16, 2 * nbytes:3 * nbytes]
    assert torch.equal(rec[:16], rows[:, :2].reshape(-1))
    header = 4 if qtype == "q4_1" else 2
    assert torch.equal(rec[8 * header:8 * header + 32], rows[:, header:header + 4].reshape(-1))
    for pack in (pack_rows8, pack_rows8_ref):
        with pytest.raises(ValueError, match="multiple of 8"):
            pack(blocks[:12], qtype)
    with pytest.raises(ValueError, match="multiple of 8"):
        _C.quant_linear(torch.randn(1, 96), blocks[:12], 8 if qtype == "q8_0" else 2 if qtype == "q4_0" else 3,
                        None, torch.empty(1, 12), 0, packed=True)
    with pytest.raises(ValueError, match="multiple of 8"):
        QuantLinear(blocks[:12], qtype, (12, 96), layout="packed")
    with pytest.raises(ValueError, match="layout"):
        QuantLinear(blocks, qtype, (24, 96), layout="interleaved")
    assert QuantLinear(blocks, qtype, (24, 96)).packed and not QuantLinear(blocks, qtype, (24, 96), layout="rows").packed
    assert not QuantLinear(blocks[:12], qtype, (12, 96)).packed  # not whole groups: kept row-major
    # rows selected from a packed weight: the same blocks, packed again when they make whole groups
    W = QuantWeight(packed, qtype, (24, 96), packed=True)
    ids = torch.tensor([23, 0, 9, 9, 17, 4, 5, 1])
    eight = W[ids]
    assert eight.packed and torch.equal(eight.row_blocks(), blocks[ids])
    three = W[ids[:3]]
    assert not three.packed and torch.equal(three.blocks, blocks[ids[:3]])
    with pytest.raises(ValueError, match="outside"):
        W[torch.tensor([24])]


def test_packed_custom_op_opcheck():
    w, blocks = _weight(24, 64, "q4_0")
    packed = pack_rows8(blocks, "q4_0")
    x = torch.randn(3, 64)
    torch.library.opcheck(torch.ops.mirror_rt.quant_linear, (x, packed, 2, 24, None, True))
    assert torch.equal(torch.ops.mirror_rt.quant_linear(x, packed, 2, 24, None, True),
                       quant_linear(x, QuantWeight(packed, "q4_0", w.shape, packed=True)))
    ids = torch.tensor([4, 0, 23, 4])
    assert torch.equal(torch.ops.mirror_rt.dequantize_rows(packed, 2, ids, 64, True), dequantize_ref(blocks, 2, w.shape)[ids])
