"""Fused verify/accept: Triton kernel vs the eager torch reference.

    python bench/bench_verify_accept.py [--quick] [--csv PATH] [--device cuda|cpu]

GPU grid (the issue's): V {32000, 151936} x T {8, 64} x B {1, 16}, bf16 logits, chain trees;
modes greedy and match (temperature 0.8: fully fused) everywhere, rejection (torch
pre-processing + kernel) at T = 8. --quick (and any CPU run) uses small shapes and only the
reference provider. Rows: us (median), GB/s of one read of the logits, bw_frac (of the measured
copy bandwidth) and speedup_vs_reference; `same` says whether the outputs equal the reference's.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Bench, measure_copy_bandwidth, parse_bench_args  # noqa: E402

from mirror_rt.ops.reference import verify_accept_ref  # noqa: E402


def inputs(B, T, V, mode, dtype, device):
    logits = torch.randn(B, T, V, device=device).mul_(3).to(dtype)
    parents = (torch.arange(T, device=device, dtype=torch.int32) - 1).expand(B, T).contiguous()
    # Chains that follow the target's argmax half of the way, so the walk has work to do.
    tokens = torch.roll(logits.float().argmax(-1), 1, dims=1)
    tokens[:, T // 2:] = torch.randint(0, V, (B, T - T // 2), device=device)
    kw = {}
    if mode != "greedy":
        kw = dict(temperature=0.8, uniforms=torch.rand(B, T, device=device))
    if mode == "rejection":
        kw["draft_probs"] = torch.softmax(torch.randn(B, T, V, device=device), -1)
    return tokens, parents, logits, kw


def main(argv=None):
    args, on_gpu = parse_bench_args(__doc__, argv)
    dev = args.device
    if on_gpu and not args.quick:
        grid = [(B, T, V) for V in (32000, 151936) for T in (8, 64) for B in (1, 16)]
        dtype = torch.bfloat16
    else:
        grid = [(B, T, V) for V in (1000, 32000) for T in (8,) for B in (1, 4)]
        dtype = torch.float32
    if on_gpu:
        from mirror_rt.triton_kernels.verify_accept import verify_accept

    bench = Bench("verify_accept", dev, argv=[sys.argv[0]] + list(argv if argv is not None else sys.argv[1:]))
    peak = measure_copy_bandwidth(dev)
    print(f"# copy bandwidth on {bench.device_label}: {peak / 1e9:.0f} GB/s")
    elt = torch.finfo(dtype).bits // 8
    for B, T, V in grid:
        for mode in ("greedy", "match", "rejection"):
            if mode == "rejection" and T > 8:
                continue
            shape = dict(mode=mode, B=B, T=T, V=V, dtype=str(dtype)[6:])
            tokens, parents, logits, kw = inputs(B, T, V, mode, dtype, dev)
            nbytes = B * T * V * (elt + (4 if mode == "rejection" else 0))  # rejection also reads fp32 q
            ref = lambda: verify_accept_ref(tokens, parents, logits, mode, **kw)  # noqa: E731
            want = ref()
            bench.row("reference", shape, ref, nbytes, peak_bw=peak)
            if on_gpu:
                tri = lambda: verify_accept(tokens, parents, logits, mode, **kw)  # noqa: E731
                same = all(torch.equal(a, b) for a, b in zip(tri(), want))
                bench.row("triton", shape, tri, nbytes, baseline="reference", peak_bw=peak, same=same)
    bench.finish(args.csv)


if __name__ == "__main__":
    main()
