"""One decoding step of the target, eager against compiled: host time, device time and kernel
launches per step (torch.profiler), and what compiling cost.

    python bench/bench_step.py                                   # the embedded default, CPU
    python bench/bench_step.py --shape llama3-8b --device cuda   # random bf16 weights, CUDA graphs
    python bench/bench_step.py --shape tiny --backend aot_eager --steps 5   # a smoke run

A step is a forward of T new tokens (T = 1: autoregressive; T = window + 1: verification) after
a prompt of --prompt-len tokens, committing one token, as decoding does. Per mode and T:
  step_ms     wall time of a step, synchronized (what decoding sees)
  host_ms     time until the call returns, unsynchronized (on a GPU: the host's share; on a CPU
              the same as step_ms)
  device_ms   kernel time per step from the profiler (CUDA only)
  launches    kernel launches (cudaLaunchKernel, cudaGraphLaunch) per step on CUDA; on a CPU the
              aten operators dispatched per step
  compile_s   wall time of the first compiled steps beyond eager's (compiling the bucket; with
              a warm inductor cache on disk, loading it)
  breakeven   tokens after which compiling has paid for itself (compile_s / time saved a step)
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import device_name, git_commit  # noqa: E402
from mirror_rt.compiled import prepare  # noqa: E402


def load_target(shape: str, device: str, dtype: torch.dtype | None, quant=None):
    """The embedded default (shape "default"; quant as load_model's) or a systems.py shape with
    random weights."""
    if shape == "default":
        from mirror_rt.default import default_target_path
        from mirror_rt.models.loader import load_model
        return load_model(default_target_path(), device=device, dtype=dtype, quant=quant)
    from systems import build
    return build(shape, None, torch.device(device), dtype or (torch.bfloat16 if device == "cuda" else torch.float32),
                 seed=1)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _step_fn(model, cache, T: int, vocab: int):
    ids = torch.randint(0, vocab, (1, T), device=cache.device, generator=None)

    def step():
        logits = model(ids, cache)
        cache.commit(1)
        return logits
    return step


def _profile_step(step, device, steps: int):
    """(device_ms, launches) per step from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    events = prof.events()
    if device.type == "cuda":
        launches = sum(1 for e in events if e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch",
                                                        "cuLaunchKernelEx", "cudaLaunchKernelExC"))
        kernel_us = sum(e.device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        return kernel_us / 1e3 / steps, launches / steps
    return None, sum(1 for e in events if e.name.startswith("aten::")) / steps


def measure(model, mode: str, T: int, args, device) -> dict:
    runner = prepare(model, mode == "compiled", backend=args.backend)
    vocab = model.config.vocab_size
    need = args.prompt_len + args.warmup + 3 * args.steps + 8 + T
    cache = runner.new_cache(need)
    prompt = torch.randint(0, vocab, (1, args.prompt_len), device=device)
    with torch.inference_mode():
        runner(prompt, cache)
        cache.commit(args.prompt_len)
        step = _step_fn(runner, cache, T, vocab)
        t0 = time.perf_counter()
        for _ in range(args.warmup):  # compiles the bucket (second use) and warms caches
            step()
        _sync(device)
        warm_s = time.perf_counter() - t0
        host, wall = [], []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            host.append(time.perf_counter() - t0)
            _sync(device)
            wall.append(time.perf_counter() - t0)
        device_ms, launches = _profile_step(step, device, args.steps)
    med = sorted(wall)[len(wall) // 2]
    return {"shape": args.shape, "device": device_name(str(device)), "threads": torch.get_num_threads(), "mode": mode,
            "T": T, "step_ms": round(med * 1e3, 3), "host_ms": round(sorted(host)[len(host) // 2] * 1e3, 3),
            "device_ms": None if device_ms is None else round(device_ms, 3),
            "launches": round(launches, 1), "warm_s": round(warm_s, 2),
            "compiled": bool(getattr(runner, "enabled", False) and getattr(runner, "buckets", ())),
            "commit": git_commit()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="default", help="default (the embedded model) or a bench/systems.py shape")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=[None, "float32", "bfloat16", "float16"])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 5], help="new tokens per step (buckets)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--quant", default=None, help="the default's weights: load_model's quant (e.g. dequantize)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--backend", default=None, help="torch.compile backend (default: mirror_rt.compiled.BACKEND)")
    p.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    p.add_argument("--csv", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = load_target(args.shape, args.device, dtype, args.quant)
    rows = []
    for T in args.tokens:
        by_mode = {}
        for mode in args.modes:
            row = measure(model, mode, T, args, device)
            by_mode[mode] = row
            rows.append(row)
        eager, comp = by_mode.get("eager"), by_mode.get("compiled")
        if eager and comp:
            comp["speedup"] = round(eager["step_ms"] / comp["step_ms"], 3)
            comp["compile_s"] = round(max(0.0, comp["warm_s"] - eager["warm_s"]), 2)
            saved = (eager["step_ms"] - comp["step_ms"]) / 1e3
            comp["breakeven_tokens"] = round(comp["compile_s"] / saved) if saved > 0 else None
        for row in (eager, comp):
            if row:
                print(_fmt(row), flush=True)
    if args.csv:
        import csv
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
    return rows


def _fmt(r):
    if r["mode"] == "compiled" and not r["compiled"]:
        return f"{r['shape']:>10} {r['mode']:>8} T={r['T']:<3} did not compile (ran eagerly; see the warning)"
    extra = "" if "speedup" not in r else (f"  x{r['speedup']} vs eager, compile {r['compile_s']} s, "
                                           f"pays after {r['breakeven_tokens']} tokens")
    dev = "" if r["device_ms"] is None else f" device {r['device_ms']:>8} ms"
    return (f"{r['shape']:>10} {r['mode']:>8} T={r['T']:<3} step {r['step_ms']:>8} ms  host {r['host_ms']:>8} ms{dev}"
            f"  launches {r['launches']:>7}{extra}")


if __name__ == "__main__":
    main()
