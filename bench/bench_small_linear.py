"""C++ small-row linear (ops.linear's CPU kernel) vs torch's F.linear, on this CPU.

    python bench/bench_small_linear.py [--threads 2] [--layers 30] [--csv bench/results/small_linear.csv]

One call = every linear of a SmolLM2-135M-shaped stack (q, k, v, o, gate, up, down per layer:
576 -> 576/192/192/576/1536/1536, 1536 -> 576; distinct weights, --layers of them, 424 MB at 30)
applied to `rows` rows, as in one decoding pass of `rows` tokens: the weights stream from memory
as they do in the model, instead of sitting in cache as one repeated matrix would.
Providers: cpp (mirror_rt.ops.linear, the call the model's layers make: the C++ kernel through its
address entry), torch (F.linear; the baseline), cpp_bare (the same kernel called straight through
``_C.small_linear_ptr`` into preallocated outputs: no eligibility test, no allocation; cpp minus
cpp_bare is what ops.linear's Python wrapper costs).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Bench  # noqa: E402

from mirror_rt import ops  # noqa: E402

LAYER_SHAPES = ((576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536))


def bare_calls(x: dict, weights: list, threads: int):
    """The kernel alone on every weight: one _C.small_linear_ptr call each, outputs allocated once."""
    ptr = ops._cpp().small_linear_ptr
    outs = [torch.empty(x[w.shape[1]].shape[0], w.shape[0]) for w in weights]
    calls = [(x[w.shape[1]].data_ptr(), x[w.shape[1]].shape[0], w.shape[1], w.data_ptr(), w.shape[0], 0, y.data_ptr(),
              threads) for w, y in zip(weights, outs)]
    def run():
        for c in calls:
            ptr(*c)
        return outs  # held by the closure: the kernel writes into them
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--csv", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(o, i, generator=gen) for _ in range(args.layers) for o, i in LAYER_SHAPES]
    nbytes = sum(w.numel() * 4 for w in weights)
    bench = Bench("small_linear", "cpu", argv=sys.argv)
    with torch.inference_mode():
        for rows in (1, 2, 3, 4, 8):
            x = {k: torch.randn(rows, k, generator=gen) for k in (576, 1536)}
            shape = dict(rows=rows, layers=args.layers, MB=nbytes >> 20, threads=args.threads)
            bench.row("torch", shape, lambda: [F.linear(x[w.shape[1]], w) for w in weights], bytes_moved=nbytes)
            bench.row("cpp", shape, lambda: [ops.linear(x[w.shape[1]], w) for w in weights],
                      bytes_moved=nbytes, baseline="torch")
            if ops._small_linear_rows():  # without the extension, cpp above is torch again and there is no kernel
                bench.row("cpp_bare", shape, bare_calls(x, weights, args.threads), bytes_moved=nbytes,
                          baseline="torch")
    print(f"# C++ kernel's weight-prefetch hint on this CPU: {getattr(ops._cpp(), 'small_linear_prefetch_hint', '?')}")
    bench.finish(args.csv)


if __name__ == "__main__":
    main()
