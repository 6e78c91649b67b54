"""How fast the target's share of the cores streams weights beside the draft's, against every core.

Mirror-SD's overlap on a CPU gives the draft some of the cores and leaves the target's suffix the
rest. Decoding a small model is weight streaming (a few rows through every weight matrix), so
what matters is the rate each side keeps. This streams the embedded default's layer linears
(SmolLM2-135M shapes, random fp32 weights, 1 row, through ``ops.linear``) three ways:

- ``all``: one process with every thread (``--threads``, default: torch's count here);
- ``alone``: one process with the draft's share (``--draft-threads``, default half), alone;
- ``split``: two processes at once, the target's share (threads - draft threads) and the draft's.

With the target's suffix costing T_s and the draft's window D on every core, the overlapped part
of Mirror's step takes max(r_t * T_s, r_d * D), where r_t and r_d are the all-core rate over the
target's and the draft's rate in the split; SD's serial part takes T_s + D. So Mirror's overlap
beats SD's serial draft only while max(r_t * T_s, r_d * D) < T_s + D. At best (r_t * T_s = r_d * D)
it takes r_t * r_d / (r_t + r_d) of SD's time, and never less: on 2 cores r_t = r_d = r, so r / 2.

    python bench/core_bandwidth.py                 # every thread, the draft on half of them
    python bench/core_bandwidth.py --threads 16 --draft-threads 2
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_small_linear import LAYER_SHAPES  # noqa: E402  (the default's layer linears, one list for both)


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
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="every thread (the caller's)")
    p.add_argument("--draft-threads", type=int, default=None, help="the draft's share (default: half)")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:  # a child: stream and print the rate
        print(f"rate {stream_rate(args.worker, args.layers, args.reps):.3f}", flush=True)
        return {}
    draft = args.draft_threads or max(1, args.threads // 2)
    if not 1 <= draft < args.threads:
        p.error(f"--draft-threads must be in [1, {args.threads - 1}] (the target keeps the rest), got {draft}")
    target = args.threads - draft
    rates = {"all": _run([_worker_cmd(args.threads, args)])[0], "alone": _run([_worker_cmd(draft, args)])[0]}
    rates["target"], rates["draft"] = _run([_worker_cmd(target, args), _worker_cmd(draft, args)])
    r_t, r_d = rates["all"] / rates["target"], rates["all"] / rates["draft"]
    best = r_t * r_d / (r_t + r_d)
    print(f"# weight streaming, {args.layers} SmolLM2-shaped layers at 1 row (ops.linear, fp32), median of {args.reps}")
    print(f"all {args.threads} threads: {rates['all']:.1f} GB/s")
    print(f"the draft's {draft} alone: {rates['alone']:.1f} GB/s")
    print(f"split, the target's {target} beside the draft's {draft}: {rates['target']:.1f} and {rates['draft']:.1f} GB/s")
    verdict = f"at best in {best:.2f} of SD's serial time" if best < 1 else "never"
    print(f"r_t = {r_t:.2f}, r_d = {r_d:.2f}: Mirror's overlap beats SD's serial draft {verdict}")
    return dict(rates, r_target=r_t, r_draft=r_d, best=best)


if __name__ == "__main__":
    main()
