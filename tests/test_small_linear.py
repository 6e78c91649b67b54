"""C++ small-row linear (mirror_rt._C.small_linear, through ops.linear) against the float64
reference, its row independence, its argument checks, and where ops.linear sends each call."""
import os
import re
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

import mirror_rt.ops as ops
from mirror_rt.ops.reference import linear_ref

_C = pytest.importorskip("mirror_rt._C")
if not hasattr(_C, "small_linear"):
    pytest.skip("extension built without small_linear", allow_module_level=True)
from mirror_rt.ops.cpu import SMALL_LINEAR_MAX_ROWS, small_linear_cpu  # noqa: E402


def rnd(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, SMALL_LINEAR_MAX_ROWS), k=st.integers(1, 70), n=st.integers(1, 150),
       bias=st.booleans(), threads=st.integers(1, 3), seed=st.integers(0, 99))
def test_matches_the_reference_on_odd_shapes(rows, k, n, bias, threads, seed):
    x, w = rnd(rows, k, seed=seed), rnd(n, k, seed=seed + 1)
    b = rnd(n, seed=seed + 2) if bias else None
    got = small_linear_cpu(x, w, b, num_threads=threads)
    torch.testing.assert_close(got, linear_ref(x, w, b), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("k,n", [(576, 1536), (1536, 576), (576, 49152 // 16 + 3)])
def test_model_shapes(k, n):
    x, w, b = rnd(5, k), rnd(n, k, seed=1), rnd(n, seed=2)
    torch.testing.assert_close(small_linear_cpu(x, w, b), linear_ref(x, w, b), atol=1e-3, rtol=1e-4)


def test_a_row_does_not_depend_on_its_companions_or_the_threads():
    """Bitwise: a token's logits in a verification pass of 8 equal those of a one-token step."""
    x, w = rnd(SMALL_LINEAR_MAX_ROWS, 577), rnd(301, 577, seed=1)
    for threads in (2, 3, 5):  # 301 features split at different places, a partial block in each
        together = small_linear_cpu(x, w, num_threads=threads)
        for m in range(x.shape[0]):
            alone = small_linear_cpu(x[m:m + 1], w, num_threads=1)
            assert torch.equal(alone[0], together[m]), (m, threads)


def test_leading_dims_and_strided_rows():
    x = rnd(2, 3, 40)[:, :, :33]  # [2, 3, 33], rows not contiguous with each other
    w = rnd(17, 33, seed=1)
    got = small_linear_cpu(x, w)
    assert got.shape == (2, 3, 17)
    torch.testing.assert_close(got, linear_ref(x, w), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case,exc,match", [
    ("rows", ValueError, "between 1 and 8 rows"),
    ("in", ValueError, r"weight must be \[out, in=5\]"),
    ("dtype", TypeError, "float32"),
    ("bias", ValueError, r"bias must be \[out=3\]"),
    ("weight_stride", ValueError, "contiguous in its last dimension"),
])
def test_bad_arguments_are_named(case, exc, match):
    x, w, b, out = rnd(2, 5), rnd(3, 5), None, torch.empty(2, 3)
    if case == "rows":
        x, out = rnd(9, 5), torch.empty(9, 3)
    elif case == "in":
        w = rnd(3, 4)
    elif case == "dtype":
        x = x.double()
    elif case == "bias":
        b = rnd(4)
    elif case == "weight_stride":
        w = rnd(5, 3).t()
    with pytest.raises(exc, match=match):
        _C.small_linear(x, w, b, out, 1)


def spy(monkeypatch):
    """Records the rows of every call that reaches the kernel through ops.linear."""
    calls = []
    real = _C.small_linear_ptr
    monkeypatch.setattr(_C, "small_linear_ptr", lambda *a: calls.append(a[1]) or real(*a))
    return calls


def test_ops_linear_takes_the_kernel_only_where_it_applies(monkeypatch):
    calls = spy(monkeypatch)
    w, b = rnd(7, 6, seed=1), rnd(7, seed=2)
    with torch.inference_mode():
        for x in (rnd(1, 6), rnd(1, 8, 6), rnd(9, 6), rnd(3, 6).double(), rnd(2, 9)[:, :6]):
            for bias in (None, b):
                bias = None if bias is None else bias.to(x.dtype)
                want = linear_ref(x, w.to(x.dtype), bias)
                torch.testing.assert_close(ops.linear(x, w.to(x.dtype), bias), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ops.linear(rnd(2, 6), rnd(6, 7).t()), linear_ref(rnd(2, 6), rnd(6, 7).t()))
        assert ops.linear(rnd(2, 6), rnd(0, 6)).shape == (2, 0)  # no outputs: torch's answer
    # 1 and 8 rows, and 2 strided rows (made contiguous), each without and with bias; not 9 rows,
    # not float64, not a weight that is not contiguous
    assert calls == [1, 1, 8, 8, 2, 2]
    wg = w.clone().requires_grad_()
    y = ops.linear(rnd(2, 6), wg)  # autograd: torch's GEMM, and gradients flow
    y.sum().backward()
    assert wg.grad is not None and len(calls) == 6


def test_ops_linear_output_is_float32_whatever_the_default_dtype():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.inference_mode():
            x, w = rnd(3, 5).float(), rnd(4, 5, seed=1).float()
            y = ops.linear(x, w)
    finally:
        torch.set_default_dtype(before)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, linear_ref(x, w), atol=1e-5, rtol=1e-5)


def test_forced_reference_backend_skips_the_kernel(monkeypatch):
    calls = spy(monkeypatch)
    monkeypatch.setenv("MIRROR_RT_BACKEND", "ref")
    with torch.inference_mode():
        ops.linear(rnd(2, 6), rnd(7, 6, seed=1))
    assert calls == []


@pytest.mark.parametrize("forced,takes_kernel", [("cpp", True), ("triton", False)])
def test_forced_backends_as_pick_backend_reads_them(monkeypatch, forced, takes_kernel):
    calls = spy(monkeypatch)
    monkeypatch.setenv("MIRROR_RT_BACKEND", forced)
    with torch.inference_mode():
        ops.linear(rnd(2, 6), rnd(7, 6, seed=1))
    assert calls == ([2] if takes_kernel else [])
    monkeypatch.setenv("MIRROR_RT_BACKEND", "cuda")
    with pytest.raises(ValueError, match="MIRROR_RT_BACKEND must be one of"):
        ops.linear(rnd(2, 6), rnd(7, 6, seed=1))


def test_the_address_entry_refuses_what_would_crash():
    out = torch.empty(2, 3)
    with pytest.raises(ValueError, match="rows must be in"):
        _C.small_linear_ptr(rnd(9, 5).data_ptr(), 9, 5, rnd(3, 5).data_ptr(), 3, 0, out.data_ptr(), 1)
    with pytest.raises(ValueError, match="non-null"):
        _C.small_linear_ptr(0, 2, 5, rnd(3, 5).data_ptr(), 3, 0, out.data_ptr(), 1)


def test_linear_note_names_the_backend_and_times_the_kernel(monkeypatch):
    """The demo's line on the few-row linears: with the kernel, a measured ratio per row count;
    forced to torch, it says so."""
    from mirror_helpers import tiny_pair

    from mirror_rt.demo import linear_note

    target, _ = tiny_pair()
    monkeypatch.delenv("MIRROR_RT_BACKEND", raising=False)
    note = linear_note(target, rows=(1, 3), reps=1)
    assert re.fullmatch(r"linears: C\+\+ small-row kernel \(prefetch (nta|t2)\), \d+\.\d\dx at 1 row and "
                        r"\d+\.\d\dx at 3 rows against F\.linear on this CPU", note), note
    monkeypatch.setenv("MIRROR_RT_BACKEND", "ref")
    assert linear_note(target) == "linears: torch's F.linear (MIRROR_RT_BACKEND=ref)"


def test_a_smaller_openmp_team_than_asked_still_covers_every_output():
    """OMP_THREAD_LIMIT=1 hands the kernel a team of 1 when it asks for 3 (as a nested call would
    get): every output feature must still be computed."""
    code = ("import torch; from mirror_rt.ops.cpu import small_linear_cpu; "
            "from mirror_rt.ops.reference import linear_ref; g = torch.Generator().manual_seed(0); "
            "x, w = torch.randn(2, 96, generator=g), torch.randn(301, 96, generator=g); "
            "torch.testing.assert_close(small_linear_cpu(x, w, num_threads=3), linear_ref(x, w), atol=1e-4, rtol=1e-4)")
    env = dict(os.environ, OMP_THREAD_LIMIT="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
