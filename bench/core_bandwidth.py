"""How fast one core streams weights, alone and beside a second streamer, against every core.

Mirror-SD's overlap on a CPU gives the draft some of the cores and leaves the target's suffix the
rest. Decoding a small model is weight streaming (a few rows through every weight matrix), so
what matters is the rate each side keeps. This streams the embedded default's layer linears
(SmolLM2-135M shapes, random fp32 weights, 1 row, through ``ops.linear``) three ways:

- ``all``: one process with every core (``--threads``, default 2);
- ``one``: one process with 1 thread, alone;
- ``pair``: two 1-thread processes at once (the suffix beside the draft's rollouts).

and prints the ratio r = rate(all) / rate(one core in the pair). With the target's suffix costing
T_s and the draft's window D on all cores, the overlapped part of Mirror's step (suffix on one core
beside the rollouts on the other) takes r * max(T_s, D), and SD's serial part T_s + D. So Mirror's
overlap beats SD's serial draft only while r * max(T_s, D) < T_s + D: never once r >= 2, and at
best (T_s = D) it takes r / 2 of SD's time.

    python bench/core_bandwidth.py
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch

LAYER_SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def stream_rate(threads: int, layers: int, reps: int) -> float:
    """GB/s of weights moved by ``layers`` layers' linears at 1 row (median over reps)."""
    from mirror_rt import ops

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(o, i, generator=g) for _ in range(layers) for (o, i) in LAYER_SHAPES]
    rows = {576: torch.randn(1, 1, 576), 1536: torch.randn(1, 1, 1536)}
    seconds = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for w in weights:
            ops.linear(rows[w.shape[1]], w)
        seconds.append(time.perf_counter() - t0)
    return sum(w.numel() * 4 for w in weights) / statistics.median(seconds) / 1e9


def _worker_cmd(threads: int, args) -> list[str]:
    return [sys.executable, __file__, "--worker", str(threads), "--layers", str(args.layers), "--reps", str(args.reps)]


def _run(cmds: list[list[str]]) -> list[float]:
    """Run the worker commands at once; each prints its rate."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, text=True) for c in cmds]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a streaming worker failed: {outs}")
    return [float(o.split()[-1]) for o in outs]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2, help="threads of the 'all' run (the caller's cores)")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:  # a child: stream and print the rate
        print(f"rate {stream_rate(args.worker, args.layers, args.reps):.3f}", flush=True)
        return {}
    rates = {"all": _run([_worker_cmd(args.threads, args)])[0], "one": _run([_worker_cmd(1, args)])[0]}
    pair = _run([_worker_cmd(1, args), _worker_cmd(1, args)])
    rates["pair"] = min(pair)
    print(f"# weight streaming, {args.layers} SmolLM2-shaped layers at 1 row (ops.linear, fp32), median of {args.reps}")
    print(f"all cores ({args.threads} threads): {rates['all']:.1f} GB/s")
    print(f"one core alone:          {rates['one']:.1f} GB/s")
    print(f"one core beside another: {pair[0]:.1f} and {pair[1]:.1f} GB/s")
    ratio = rates["all"] / rates["pair"]
    verdict = (f"at best (suffix = draft) in {ratio / 2:.2f} of SD's serial time" if ratio < 2 else "never")
    print(f"r = all / one core in the pair = {ratio:.2f}: Mirror's overlap beats SD's serial draft {verdict}")
    return dict(rates, ratio=ratio)


if __name__ == "__main__":
    main()
