"""Shared microbenchmark harness: median of repeated runs, rows stamped with device, commit, date.

    from harness import Bench
    bench = Bench("tree_attention", "cuda", argv=sys.argv)
    bench.row(provider="triton", shape=dict(B=1, S=4096), fn=lambda: op(...), bytes_moved=n)
    bench.finish(csv_path)   # prints the table, writes CSV

On CUDA, timing uses CUDA events after warm-up; on CPU, time.perf_counter. Each row carries the
one-line command that reproduces it.
"""
from __future__ import annotations

import csv
import datetime
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

import torch


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True).stdout.strip()
        return (out.stdout.strip() or "unknown") + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def time_fn(fn, device: str, warmup: int = 3, reps: int = 20, max_seconds: float = 5.0) -> float:
    """Median seconds per call of fn()."""
    for _ in range(warmup):
        fn()
    times = []
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        budget = time.perf_counter() + max_seconds
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            if time.perf_counter() > budget and len(times) >= 3:
                break
    return statistics.median(times)


def measure_copy_bandwidth(device: str, nbytes: int = 1 << 28) -> float:
    """Bytes/s of a device-to-device copy (read + write counted), the bandwidth reference."""
    if not device.startswith("cuda"):
        nbytes = 1 << 26
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, warmup=2, reps=10)
    return 2 * nbytes / t


def parse_bench_args(description: str, argv=None):
    """The options every kernel benchmark takes: --quick, --csv, --device. Returns (args, on_gpu)."""
    import argparse

    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes (CPU-friendly)")
    ap.add_argument("--csv", default=None, help="write the rows to this CSV file")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    return args, args.device.startswith("cuda")


class Bench:
    def __init__(self, op: str, device: str, argv=None):
        self.op, self.device = op, device
        self.device_label = device_name(device)
        self.commit = git_commit()
        self.date = datetime.date.today().isoformat()
        self.command = " ".join(shlex.quote(a) for a in (argv or sys.argv))
        self.rows: list[dict] = []

    def row(self, provider: str, shape: dict, fn, bytes_moved: int | None = None, baseline: str | None = None,
            peak_bw: float | None = None, **extra):
        """Time fn and record a row. `baseline`: provider name whose time (same shape) the ratio uses."""
        secs = time_fn(fn, self.device)
        rec = {"op": self.op, "provider": provider, **shape, "us": round(secs * 1e6, 2)}
        if bytes_moved is not None:
            rec["GB/s"] = round(bytes_moved / secs / 1e9, 2)
            if peak_bw:
                rec["bw_frac"] = round(bytes_moved / secs / peak_bw, 3)
        if baseline is not None:
            base = [r for r in self.rows if r["provider"] == baseline and all(r.get(k) == v for k, v in shape.items())]
            rec[f"speedup_vs_{baseline}"] = round(base[-1]["us"] / rec["us"], 3) if base else ""
        rec.update(extra)
        rec.update(device=self.device_label, commit=self.commit, date=self.date, command=self.command)
        self.rows.append(rec)
        return rec

    def finish(self, csv_path: str | None = None, show=("device", "commit", "date", "command")):
        if not self.rows:
            print("no rows")
            return
        keys = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        table_keys = [k for k in keys if k not in show]
        widths = {k: max(len(k), *(len(str(r.get(k, ""))) for r in self.rows)) for k in table_keys}
        print(f"# {self.op} on {self.device_label}, commit {self.commit}, {self.date}")
        print(f"# reproduce: {self.command}")
        print("  ".join(k.rjust(widths[k]) for k in table_keys))
        for r in self.rows:
            print("  ".join(str(r.get(k, "")).rjust(widths[k]) for k in table_keys))
        if csv_path:
            os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
            with open(csv_path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=keys)
                w.writeheader()
                w.writerows(self.rows)
            print(f"# wrote {csv_path}")
