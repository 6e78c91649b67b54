"""Tree attention: Triton kernel vs masked torch SDPA, the eager reference and FlashInfer.

    python bench/bench_tree_attention.py [--quick] [--csv PATH] [--device cuda|cpu]

GPU grid (the issue's): prefix S {1k, 4k, 16k, 64k} x T {8, 16, 32, 64} x B {1, 8}, Hq/Hkv 32/8,
D 128, bf16, every prefix full. --quick (and any CPU run) uses small fp32 shapes and only the
torch providers, plus Triton under the interpreter for one tiny shape when TRITON_INTERPRET=1.
Rows: us (median), GB/s of the ideal traffic (prefix + tree K/V, q, out), bw_frac (of the
measured device copy bandwidth) and speedup_vs_sdpa; `err` is the max |triton - sdpa|.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Bench, measure_copy_bandwidth, parse_bench_args  # noqa: E402

from mirror_rt.ops.reference import tree_attention_ref  # noqa: E402


def inputs(B, T, S, Hq, Hkv, D, dtype, device):
    q = torch.randn(B, T, Hq, D, dtype=dtype, device=device)
    k_cache = torch.randn(B, S, Hkv, D, dtype=dtype, device=device)
    v_cache = torch.randn_like(k_cache)
    k_tree = torch.randn(B, T, Hkv, D, dtype=dtype, device=device)
    v_tree = torch.randn_like(k_tree)
    seqlens = torch.full((B,), S, dtype=torch.int32, device=device)
    # A random tree in topological order: each node sees its ancestors and itself.
    parents = [-1] + [int(torch.randint(0, i, ())) for i in range(1, T)]
    mask = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        node = i
        while node >= 0:
            mask[i, node] = True
            node = parents[node]
    return q, k_cache, v_cache, seqlens, k_tree, v_tree, mask.to(device).expand(B, T, T).contiguous()


def sdpa_provider(q, k_cache, v_cache, seqlens, k_tree, v_tree, mask):
    """Masked SDPA over the concatenated keys. The concatenation is done once, outside the
    timing (as if the cache already held the tree), so SDPA is timed on its attention alone."""
    B, T, Hq, D = q.shape
    S = k_cache.shape[1]
    keys = torch.cat([k_cache, k_tree], 1).transpose(1, 2)  # [B, Hkv, S+T, D]
    vals = torch.cat([v_cache, v_tree], 1).transpose(1, 2)
    full = torch.cat([torch.ones(B, T, S, dtype=torch.bool, device=q.device), mask], 2)[:, None]
    qh = q.transpose(1, 2)
    group = Hq // keys.shape[1]
    if group > 1:
        try:  # torch >= 2.5 reads shared KV heads without copying them
            F.scaled_dot_product_attention(qh[:, :, :1], keys[:, :, :1], vals[:, :, :1],
                                           attn_mask=full[:, :, :1, :1], enable_gqa=True)
            return lambda: F.scaled_dot_product_attention(qh, keys, vals, attn_mask=full, enable_gqa=True).transpose(1, 2)
        except TypeError:
            keys, vals = keys.repeat_interleave(group, 1), vals.repeat_interleave(group, 1)
    return lambda: F.scaled_dot_product_attention(qh, keys, vals, attn_mask=full).transpose(1, 2)


def flashinfer_provider(q, k_cache, v_cache, seqlens, k_tree, v_tree, mask):
    """FlashInfer's single-sequence prefill with a custom mask (B = 1 only), or None."""
    try:
        import flashinfer
    except ImportError:
        return None
    if q.shape[0] != 1 or not q.is_cuda:
        return None
    S = k_cache.shape[1]
    k = torch.cat([k_cache[0], k_tree[0]], 0)
    v = torch.cat([v_cache[0], v_tree[0]], 0)
    T = q.shape[1]
    full = torch.cat([torch.ones(T, S, dtype=torch.bool, device=q.device), mask[0]], 1)
    return lambda: flashinfer.single_prefill_with_kv_cache(q[0], k, v, custom_mask=full)


def main(argv=None):
    args, on_gpu = parse_bench_args(__doc__, argv)
    dev = args.device
    if on_gpu and not args.quick:
        grid = [(B, T, S) for B in (1, 8) for S in (1024, 4096, 16384, 65536) for T in (8, 16, 32, 64)]
        Hq, Hkv, D, dtype = 32, 8, 128, torch.bfloat16
    else:
        grid = [(B, T, S) for B in (1, 2) for S in (256, 2048) for T in (8, 32)]
        Hq, Hkv, D, dtype = 8, 2, 64, torch.float32
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    run_triton = on_gpu or interp
    if run_triton:
        from mirror_rt.triton_kernels.tree_attention import pack_tree_mask, tree_attention_packed

    bench = Bench("tree_attention", dev, argv=[sys.argv[0]] + list(argv if argv is not None else sys.argv[1:]))
    peak = measure_copy_bandwidth(dev)
    print(f"# copy bandwidth on {bench.device_label}: {peak / 1e9:.0f} GB/s")
    elt = torch.finfo(dtype).bits // 8
    for B, T, S in grid:
        shape = dict(B=B, T=T, S=S, Hq=Hq, Hkv=Hkv, D=D, dtype=str(dtype)[6:])
        args_ = inputs(B, T, S, Hq, Hkv, D, dtype, dev)
        nbytes = elt * (2 * B * (S + T) * Hkv * D + 2 * B * T * Hq * D)
        sdpa = sdpa_provider(*args_)
        want = sdpa()
        bench.row("sdpa", shape, sdpa, nbytes, peak_bw=peak)
        # Triton: compiled on the GPU; under the interpreter only the smallest CPU shape.
        if run_triton and (on_gpu or (B == 1 and S == 256 and T == 8)):
            bits = pack_tree_mask(args_[-1])  # packed once per step and shared by all layers
            tri = lambda: tree_attention_packed(*args_[:-1], bits)  # noqa: E731
            err = (tri().float() - want.float()).abs().max().item()
            bench.row("triton", shape, tri, nbytes, baseline="sdpa", peak_bw=peak, err=f"{err:.2g}")
        if not on_gpu or S <= 4096:  # the reference is a python loop over rows: skip huge shapes
            bench.row("reference", shape, lambda: tree_attention_ref(*args_), nbytes, baseline="sdpa", peak_bw=peak)
        fi = flashinfer_provider(*args_)
        if fi is not None:
            try:
                bench.row("flashinfer", shape, fi, nbytes, baseline="sdpa", peak_bw=peak)
            except Exception as exc:  # report, keep benchmarking the rest
                print(f"# flashinfer failed on {shape}: {exc}")
        del args_, sdpa, want
    bench.finish(args.csv)


if __name__ == "__main__":
    main()
