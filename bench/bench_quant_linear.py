"""The quantized-weight kernel's streaming rate against core_bandwidth's fp32 figure, same run.

    python bench/bench_quant_linear.py [--threads 2] [--layers 30] [--rows 1 2 4 8] [--csv out.csv]

Streams every linear of a SmolLM2-135M-shaped stack (``bench_small_linear.LAYER_SHAPES``, distinct
random weights per layer, as a decoding pass reads them) in each block type, plus the default's
LM head (49152 x 576, Q8_0), at each row count: the kernel alone (``_C.quant_linear_ptr`` into
preallocated outputs) and through ``QuantLinear`` (the model's call, Python included). GB/s counts
the weight bytes each pass moves. ``fp32`` is ``core_bandwidth.stream_rate`` (ops.linear, fp32
weights, 1 row) with the same threads: the rate memory gives a streaming kernel on this machine.
The issue's goal: the quantized kernel at 1 row >= 70% of that rate.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_small_linear import LAYER_SHAPES  # noqa: E402
from core_bandwidth import stream_rate  # noqa: E402

from mirror_rt import _C  # noqa: E402
from mirror_rt.models.quant import QuantLinear, quantize  # noqa: E402

HEAD_SHAPE = (49152, 576)


def _stack(qtype: str, layers: int, head: bool):
    g = torch.Generator().manual_seed(0)
    shapes = [s for _ in range(layers) for s in LAYER_SHAPES] if not head else [HEAD_SHAPE]
    return [QuantLinear(quantize(torch.randn(*s, generator=g), qtype), qtype, s) for s in shapes]


def _median_seconds(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(qtype: str, rows: int, threads: int, layers: int, reps: int, head: bool = False) -> dict:
    mods = _stack(qtype, layers, head)
    xs = {k: torch.randn(rows, k) for k in {m.in_features for m in mods}}
    outs = [torch.empty(rows, m.out_features) for m in mods]
    nbytes = sum(m.blocks.numel() for m in mods)

    def bare():
        for m, y in zip(mods, outs):
            _C.quant_linear_ptr(xs[m.in_features].data_ptr(), rows, m.in_features, m.blocks.data_ptr(),
                                m.out_features, m.qtype, 0, y.data_ptr(), threads, m.packed)

    def module():
        for m in mods:
            m(xs[m.in_features])

    with torch.inference_mode():
        s_bare, s_mod = _median_seconds(bare, reps), _median_seconds(module, reps)
    return {"qtype": qtype, "what": "head" if head else f"{layers} layers", "rows": rows, "threads": threads,
            "mb": nbytes / 1e6, "kernel_ms": s_bare * 1e3, "kernel_gbs": nbytes / s_bare / 1e9,
            "module_ms": s_mod * 1e3, "module_gbs": nbytes / s_mod / 1e9}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--qtypes", nargs="+", default=["q4_1", "q4_0", "q8_0"])
    p.add_argument("--csv", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    fp32 = stream_rate(args.threads, args.layers, args.reps)
    print(f"# {args.threads} threads; fp32 weight streaming (core_bandwidth, ops.linear, 1 row): {fp32:.2f} GB/s")
    print(f"{'type':5} {'weights':10} {'rows':>4} {'MB':>6} {'kernel ms':>9} {'GB/s':>6} {'of fp32':>7} "
          f"{'module ms':>9} {'GB/s':>6}")
    results = []
    for qtype in args.qtypes:
        for rows in args.rows:
            for head in (False, True) if qtype == "q8_0" else (False,):
                r = measure(qtype, rows, args.threads, args.layers, args.reps, head)
                r["fp32_gbs"], r["of_fp32"] = fp32, r["kernel_gbs"] / fp32
                results.append(r)
                print(f"{qtype:5} {r['what']:10} {rows:4d} {r['mb']:6.1f} {r['kernel_ms']:9.2f} {r['kernel_gbs']:6.2f} "
                      f"{r['of_fp32']:7.0%} {r['module_ms']:9.2f} {r['module_gbs']:6.2f}")
    if args.csv:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(results[0]))
            w.writeheader()
            w.writerows(results)
    return results


if __name__ == "__main__":
    main()
