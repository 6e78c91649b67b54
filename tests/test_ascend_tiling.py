"""The AscendC kernels' host tiling (csrc/ascend/tiling.h, compiled into mirror_rt._C) on CPU."""
import pytest
from hypothesis import given, settings, strategies as st

_C = pytest.importorskip("mirror_rt._C")
if not hasattr(_C, "ascend_tiling"):
    pytest.skip("extension built without the tiling bindings", allow_module_level=True)


def check(t, ub_bytes, num_cores):
    assert t["group"] * t["Hkv"] == t["Hq"]
    assert t["d_pad"] % 16 == 0 and t["d_pad"] >= t["D"]
    assert t["kv_block"] in (16, 32, 64, 128)
    assert 1 <= t["q_block"] <= t["Tq"] and t["rows"] == t["group"] * t["q_block"] <= 64
    assert t["num_q_blocks"] * t["q_block"] >= t["Tq"] > (t["num_q_blocks"] - 1) * t["q_block"]
    assert t["num_tasks"] == t["B"] * t["Hkv"] * t["num_q_blocks"]
    assert t["ub_bytes"] <= ub_bytes
    assert t["mask_words"] * 32 >= t["T"]
    assert 1 <= t["block_dim"] <= min(num_cores, t["num_tasks"])
    # every task on exactly one core, contiguous, balanced to within one task
    ranges = t["core_ranges"]
    assert len(ranges) == t["block_dim"]
    assert [b for b, _ in ranges] == [sum(c for _, c in ranges[:i]) for i in range(len(ranges))]
    assert sum(c for _, c in ranges) == t["num_tasks"]
    counts = [c for _, c in ranges]
    assert max(counts) - min(counts) <= 1 and min(counts) >= 1


@settings(max_examples=200, deadline=None)
@given(B=st.integers(1, 8), T=st.integers(1, 256), tq_frac=st.floats(0.01, 1.0), S=st.integers(0, 65536),
       hkv=st.integers(1, 16), group=st.integers(1, 16), D=st.integers(1, 256), elem=st.sampled_from([2, 4]),
       cores=st.integers(1, 64), ub=st.sampled_from([192 * 1024, 248 * 1024, 96 * 1024]))
def test_tiling_invariants(B, T, tq_frac, S, hkv, group, D, elem, cores, ub):
    Tq = max(1, int(T * tq_frac))
    try:
        t = _C.ascend_tiling(B, Tq, T, S, hkv * group, hkv, D, elem, 0.125, num_cores=cores, ub_bytes=ub)
    except ValueError as e:  # only when even one query and 16 keys overflow the UB
        assert "ub_bytes" in str(e)
        big = _C.ascend_tiling(B, 1, T, S, hkv * group, hkv, D, elem, num_cores=cores, ub_bytes=1 << 30)
        assert big["q_block"] == 1 and big["ub_bytes"] > ub
        return
    check(t, ub, cores)


def test_known_shapes():
    t = _C.ascend_tiling(1, 64, 64, 2048, 9, 3, 64, 2)  # the embedded draft, bf16, 40 cores
    check(t, 192 * 1024, 40)
    assert t["num_tasks"] >= 40 and t["block_dim"] == 40
    t = _C.ascend_tiling(4, 128, 128, 4096, 32, 8, 128, 2, num_cores=20)
    assert t["q_block"] == 16 and t["rows"] == 64  # the row cap, cores already busy


def test_errors():
    with pytest.raises(ValueError, match="bad shape"):
        _C.ascend_tiling(1, 8, 8, 16, 9, 2, 64, 2)
    with pytest.raises(ValueError, match="256"):
        _C.ascend_tiling(1, 8, 300, 16, 8, 2, 64, 2)
    with pytest.raises(ValueError, match="elem_bytes"):
        _C.ascend_tiling(1, 8, 8, 16, 8, 2, 64, 8)
    with pytest.raises(ValueError, match="ub_bytes"):
        _C.ascend_tiling(1, 8, 8, 16, 8, 2, 4096, 4, ub_bytes=64 * 1024)


def test_branch_tree_tiling():
    t = _C.ascend_branch_tree_tiling(7, 8, -1, 256)
    assert t["max_branches"] == 64 and t["mask_words"] == 8 and t["ub_bytes"] <= 192 * 1024
    assert _C.ascend_branch_tree_tiling(7, 8, 16, 128)["max_branches"] == 16
    with pytest.raises(ValueError, match="ub_bytes"):
        _C.ascend_branch_tree_tiling(7, 8, -1, 4096, ub_bytes=1024)
