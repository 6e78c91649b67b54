"""Server-scale latency model: vanilla SD and Mirror-SD step times and speedups on H100-class GPUs.

    python bench/simulate.py                                  # rates from the command line (defaults)
    python bench/simulate.py --from-csv bench/results/specbench/specbench.csv   # rates per task family
    python bench/simulate.py --from-stats stats.json --acceptance 0.7 --containment 0.5 --efficiency 0.6

A PREDICTION, not a measurement. Each forward pass costs its roofline time,
    t = max(bytes / (HBM bandwidth * eff), FLOPs / (matrix rate * eff)),
with bytes = bf16 weights read once + the KV cache read, FLOPs = 2 * tokens * weights + attention.
The step law is mirror_rt.sim's (DESIGN.md §1, plus the fallback term):
    AR:     T = target(1 token)                                      1 token per step
    SD:     T = gamma * draft(1 token) + target(gamma+1 tokens)      1 + E[A] tokens per step
    Mirror: T = prefix(layers < l_e) + exit head + rv_exit + max(suffix + LM head, rollouts) + rv_verify
                + fallback_rate * (fresh chain of gamma draft tokens)
            rollouts = ceil(gamma / eta) draft passes over (gamma+1) * kappa branch tokens as one tree
            (eta: tokens per draft pass; 1 = plain draft, > 1 = speculative streaming).
The draft runs on a second device (its own bandwidth and matrix rate). Rates: E[A] from a per-token
acceptance alpha (E[A] = alpha + ... + alpha^gamma) or given; fallback rate = 1 - containment or given;
or both read from our own runs (specbench CSV: the mirror/sd rows per task family; or a stats JSON).

A second table puts the planner (mirror_rt.planner_auto's search, mirror_rt.plan_model) on hardware
profiles: the paper's GPU + NPU, an H200 with the draft on a second stream, an H200 with a Q4 draft
on the host CPU, and a 2-core CPU. For each: the plan it picks within --window/--kappa, its
predicted speedup over AR, SD at its best window, and the fixed plan at the bounds.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from types import SimpleNamespace  # noqa: E402

from mirror_rt.plan_model import best_plan, candidate_plans, predict_plan  # noqa: E402
from mirror_rt.planner import Plan  # noqa: E402
from mirror_rt.sim import expected_accepted, mirror_step_time, sd_rate, sd_step_time, tokens_per_s  # noqa: E402


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    gated: bool = True  # SwiGLU (3 matrices) vs OPT's ReLU MLP (2)
    source: str = ""


# Public config.json numbers (Hugging Face model repositories named in `source`).
TARGETS = {
    "qwen3-14b": Shape("Qwen3-14B", 40, 5120, 17408, 40, 8, 128, 151936, source="Qwen/Qwen3-14B config.json"),
    "qwen3-32b": Shape("Qwen3-32B", 64, 5120, 25600, 64, 8, 128, 151936, source="Qwen/Qwen3-32B config.json"),
    "mistral-24b": Shape("Mistral-Small-24B", 40, 5120, 32768, 32, 8, 128, 131072,
                         source="mistralai/Mistral-Small-24B-Instruct-2501 config.json"),
    "opt-66b": Shape("OPT-66B", 64, 9216, 36864, 72, 72, 128, 50272, gated=False,
                     source="facebook/opt-66b config.json (ffn_dim 36864, MHA)"),
}
# The draft: a Qwen3-0.6B body (Qwen/Qwen3-0.6B config.json) with the target's vocabulary.
DRAFT_BODY = Shape("Qwen3-0.6B-body", 28, 1024, 3072, 16, 8, 128, 0, source="Qwen/Qwen3-0.6B config.json")


@dataclass(frozen=True)
class Device:
    bandwidth: float  # bytes/s
    flops: float      # dense bf16 FLOP/s
    efficiency: float = 0.7


H100 = Device(3.35e12, 989e12)  # H100 SXM: 3.35 TB/s HBM3, ~989 TFLOP/s dense bf16

# Paper Table 1 (arXiv 2510.13161): per-task-family speedups NOT found in the stored copies we can
# read (only the abstract); kept None rather than invented. The abstract's claim is printed instead.
PAPER_TABLE1 = None
PAPER_RANGE = "2.8-5.8*"  # the abstract's range over all tasks and 14B-66B targets: beside the "all" rows
PAPER_ABSTRACT = ("* Mirror-SD paper (arXiv 2510.13161, abstract): 2.8x-5.8x wall-time speedups across SpecBench "
                  "tasks with 14B-66B targets, ~30% average relative improvement over EAGLE3; reference data, not "
                  "our result. Per-family Table 1 numbers were not available to us: those rows say n/a.")


def paper_speedup(family: str) -> str:
    """What the paper reports for a task family, as printed beside our prediction."""
    if PAPER_TABLE1 and family in PAPER_TABLE1:
        return f"{PAPER_TABLE1[family]:.2f}"
    return PAPER_RANGE if family == "all" else "n/a"


def layer_params(s: Shape) -> int:
    attn = s.hidden * s.heads * s.head_dim + 2 * s.hidden * s.kv_heads * s.head_dim + s.heads * s.head_dim * s.hidden
    return attn + (3 if s.gated else 2) * s.hidden * s.intermediate


def forward_cost(s: Shape, tokens: int, context: int, layers: int | None = None, lm_head: bool = True,
                 dtype_bytes: int = 2) -> tuple[float, float]:
    """(bytes, FLOPs) of one pass of `tokens` new tokens over `layers` layers (default all) with a
    KV cache of `context` positions, plus the LM head if lm_head. Biases and norms are ignored."""
    n = s.layers if layers is None else layers
    weights = n * layer_params(s) + (s.vocab * s.hidden if lm_head else 0)
    kv_bytes = n * 2 * context * s.kv_heads * s.head_dim * dtype_bytes
    attn_flops = n * 4 * tokens * context * s.heads * s.head_dim  # QK^T and PV
    return weights * dtype_bytes + kv_bytes, 2 * tokens * weights + attn_flops


def roofline_s(cost: tuple[float, float], dev: Device) -> float:
    nbytes, flops = cost
    return max(nbytes / (dev.bandwidth * dev.efficiency), flops / (dev.flops * dev.efficiency))


def step_times(target: Shape, draft: Shape, dev_t: Device, dev_d: Device, *, gamma: int, kappa: int,
               exit_frac: float, context: int, mean_accepted: float, fallback_rate: float,
               rv_exit: float, rv_verify: float, eta: int = 1) -> dict:
    """Seconds per step for AR, SD and Mirror-SD, and the speedups (tokens/s over AR's)."""
    T, le = gamma + 1, max(1, min(target.layers - 1, round(target.layers * exit_frac)))
    t = lambda shape, dev, tokens, **kw: roofline_s(forward_cost(shape, tokens, context, **kw), dev)  # noqa: E731
    passes = math.ceil(gamma / eta)
    terms = {"prefix": t(target, dev_t, T, layers=le, lm_head=False),
             "rv_exit": t(target, dev_t, T, layers=0) + rv_exit,  # exit head = the LM head (logit lens)
             "suffix": t(target, dev_t, T, layers=target.layers - le),
             "draft_gen": passes * t(draft, dev_d, T * kappa),
             "rv_verify": rv_verify, "fallback_rate": fallback_rate,
             "fallback_time": passes * t(draft, dev_d, eta)}
    ar = t(target, dev_t, 1)
    sd = sd_step_time(gamma * t(draft, dev_d, 1), t(target, dev_t, T))
    mirror = mirror_step_time(**terms)
    per_step = 1.0 + mean_accepted
    return {"ar_s": ar, "sd_s": sd, "mirror_s": mirror, "terms": terms, "exit_layer": le,
            "sd_speedup": per_step / sd * ar, "mirror_speedup": per_step / mirror * ar}


def rates_from_csv(path: str) -> list[dict]:
    """[{family, mean_accepted, sd_mean_accepted, fallback_rate}] from a specbench CSV's rows."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for fam in dict.fromkeys(r["family"] for r in rows):
        by = {r["decoder"]: r for r in rows if r["family"] == fam}
        if "mirror" not in by:
            continue
        m = by["mirror"]
        sd_acc = float(by["sd"]["mean_accepted"]) if "sd" in by else float(m["mean_accepted"])
        out.append({"family": fam, "mean_accepted": float(m["mean_accepted"]), "sd_mean_accepted": sd_acc,
                    "fallback_rate": float(m["fallback_rate"])})
    if not out:
        raise ValueError(f"{path} has no mirror rows")
    return out


def rates_from_stats(path: str) -> list[dict]:
    """One 'measured' row from a GenerationOutput.stats JSON (a dict or a list of dicts)."""
    with open(path) as f:
        data = json.load(f)
    runs = data if isinstance(data, list) else [data]
    steps = sum(r["steps"] for r in runs)
    acc = sum(r["mean_accepted"] * r["steps"] for r in runs) / steps
    fb = sum(r.get("fallbacks", 0) for r in runs) / steps
    return [{"family": "measured", "mean_accepted": acc, "sd_mean_accepted": acc, "fallback_rate": fb}]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated of {list(TARGETS)}")
    p.add_argument("--window", type=int, default=7, help="gamma")
    p.add_argument("--kappa", type=int, default=8)
    p.add_argument("--exit-frac", type=float, default=0.5, help="early-exit layer as a fraction of N")
    p.add_argument("--context", type=int, default=1024, help="KV positions read per pass")
    p.add_argument("--eta", type=int, default=1, help="draft tokens per pass (speculative streaming > 1)")
    p.add_argument("--acceptance", type=float, default=0.8, help="per-token acceptance alpha -> E[A]")
    p.add_argument("--mean-accepted", type=float, default=None, help="E[A] directly (overrides --acceptance)")
    p.add_argument("--containment", type=float, default=0.9, help="P(correction in exit top-kappa)")
    p.add_argument("--fallback-rate", type=float, default=None, help="overrides 1 - containment")
    p.add_argument("--from-csv", help="specbench CSV: per-family E[A] and fallback rate from our runs")
    p.add_argument("--from-stats", help="GenerationOutput.stats JSON (dict or list) from our runs")
    p.add_argument("--bandwidth", type=float, default=H100.bandwidth, help="target HBM bytes/s")
    p.add_argument("--tflops", type=float, default=H100.flops / 1e12, help="target dense bf16 TFLOP/s")
    p.add_argument("--draft-bandwidth", type=float, default=H100.bandwidth, help="draft device bytes/s")
    p.add_argument("--draft-tflops", type=float, default=H100.flops / 1e12, help="draft device TFLOP/s")
    p.add_argument("--efficiency", type=float, default=0.7, help="achieved fraction of both rooflines")
    p.add_argument("--rv-exit-us", type=float, default=30.0, help="rendezvous: exit top-k to the draft")
    p.add_argument("--rv-verify-us", type=float, default=30.0, help="rendezvous: verdict to the draft")
    return p.parse_args(argv)


# --- the planner on hardware profiles ----------------------------------------------------------------

@dataclass(frozen=True)
class Profile:
    """Where target and draft run. slow_t / slow_d: how much longer the suffix / the rollouts take
    while the two overlap (1.0: the draft has a device of its own)."""
    name: str
    target: Shape
    draft: Shape
    dev_t: Device
    dev_d: Device
    slow_t: float = 1.0
    slow_d: float = 1.0
    target_bytes: float = 2.0   # bytes per weight (bf16 2, fp32 4, Q4_0 0.5625)
    draft_bytes: float = 2.0
    rendezvous_s: float = 30e-6  # each of exit -> draft and verdict -> draft
    note: str = ""


H200 = Device(4.8e12, 989e12)       # H200 SXM: 4.8 TB/s HBM3e, ~989 TFLOP/s dense bf16
NPU = Device(1.6e12, 320e12)        # assumed NPU-class draft device (Ascend 910B-like: ~1.6 TB/s, ~320 TFLOP/s)
HOST_CPU = Device(2.0e11, 4e12)     # assumed server host: ~200 GB/s DRAM, ~4 TFLOP/s on the cores it lends
SMOL = Shape("SmolLM2-135M", 30, 576, 1536, 9, 3, 64, 49152, source="HuggingFaceTB/SmolLM2-135M config.json")
SMOL_DRAFT = Shape("smollm2-draft", 4, 576, 1536, 9, 3, 64, 8192, source="our draft: 4 layers, 8k-token head")
TWO_CORES = Device(25e9, 0.15e12)   # 2-core CPU: both cores stream ~25 GB/s (bench/core_bandwidth.py)


def draft_for(target: Shape) -> Shape:
    return Shape(**{**DRAFT_BODY.__dict__, "vocab": target.vocab, "name": f"draft({target.vocab})"})


def profiles() -> list[Profile]:
    q14, q32 = TARGETS["qwen3-14b"], TARGETS["qwen3-32b"]
    return [
        Profile("GPU + NPU (paper)", q14, draft_for(q14), H100, NPU, note="draft on its own NPU (assumed rates)"),
        Profile("H200, draft 2nd stream", q14, draft_for(q14), H200, H200, slow_t=1.10, slow_d=1.25,
                note="one GPU; concurrent kernels share HBM and SMs (assumed slowdowns 1.10 / 1.25)"),
        Profile("H200 + host-CPU draft", q32, draft_for(q32), H200, HOST_CPU, draft_bytes=0.5625,
                rendezvous_s=50e-6, note="Q4_0 draft on the host's cores (assumed host rates)"),
        Profile("2-core CPU (this one)", SMOL, SMOL_DRAFT, TWO_CORES, TWO_CORES, slow_t=1.82, slow_d=1.82,
                target_bytes=4.0, draft_bytes=4.0, rendezvous_s=1e-3,
                note="fp32; overlap gives each side one core: 25 / 13.7 GB/s (RESULTS, core bandwidth)"),
    ]


class RooflineCosts:
    """mirror_rt.plan_model's ``costs`` from the roofline of one profile."""

    def __init__(self, prof: Profile, context: int, exit_frac: float):
        self.p, self.context = prof, context
        self.le = max(1, min(prof.target.layers - 1, round(prof.target.layers * exit_frac)))

    def _t(self, side: str, tokens: float, **kw) -> float:
        p = self.p
        shape, dev, nbytes = (p.target, p.dev_t, p.target_bytes) if side == "t" else (p.draft, p.dev_d, p.draft_bytes)
        return roofline_s(forward_cost(shape, max(tokens, 1), self.context, dtype_bytes=nbytes, **kw), dev)

    def prefix(self, T):
        return self._t("t", T, layers=self.le, lm_head=False)

    def exit(self, T):
        return self._t("t", T, layers=0) + self.p.rendezvous_s  # the exit head: the LM head (logit lens)

    def suffix(self, T, overlap):
        slow = self.p.slow_t if overlap == "overlapped" else 1.0
        return slow * self._t("t", T, layers=self.p.target.layers - self.le)

    def draft(self, branches, depth, overlap):
        slow = self.p.slow_d if overlap == "overlapped" else 1.0
        return slow * depth * self._t("d", branches) if branches > 0 else 0.0

    def verify(self, T):
        return self.p.rendezvous_s

    def fallback(self, window):
        return window * self._t("d", 1)

    def lane(self):
        return 0.0

    def off(self):
        return self._t("t", 1)

    def residual(self, overlap):
        return 0.0


def plan_profile(prof: Profile, alpha: float, containment: float, max_window: int, max_kappa: int,
                 context: int = 1024, exit_frac: float = 0.5) -> dict:
    """The planner's choice on one profile, its predicted speedup over AR, SD at its best window and
    Mirror-SD at the fixed (max_window, max_kappa) plan, all from the same law."""
    costs = RooflineCosts(prof, context, exit_frac)
    p_unit = 1.0 - (1.0 - containment) ** (1.0 / max_kappa)  # containment is given at max_kappa
    rates = SimpleNamespace(accept_rates=[alpha], hit_per_unit=p_unit, lookup_rate=0.0, fill=1.0)
    plan, pred = best_plan(candidate_plans(max_window, max_kappa), costs, rates, "per_position")
    ar = tokens_per_s(1.0, costs.off())
    sd = {w: sd_rate([alpha], w, costs.fallback(1), lambda T: costs._t("t", T)) for w in range(1, max_window + 1)}
    sd_w = max(sd, key=sd.get)
    fixed = predict_plan(Plan(max_window, max_kappa, None, 0.0, "recompute", "overlapped"), costs, rates,
                         "per_position")
    return {"profile": prof.name, "plan": plan, "pred": pred, "ar_ms": 1e3 / ar, "sd_window": sd_w,
            "sd_x": sd[sd_w] / ar, "mirror_x": pred.tok_s / ar, "fixed_x": fixed.tok_s / ar, "note": prof.note}


def print_profiles(alpha: float, containment: float, max_window: int, max_kappa: int, context: int):
    print(f"\nPLANNER on hardware profiles (PREDICTION; alpha {alpha}, containment {containment} at kappa "
          f"{max_kappa}; the planner's bounds: window {max_window}, kappa {max_kappa})")
    head = (f"{'profile':>24} {'AR ms':>6} {'planner chooses':>28} {'Mirror x':>8} {'SD x (w)':>9} "
            f"{'fixed w/k x':>11}")
    print(head + "\n" + "-" * len(head))
    rows = [plan_profile(p, alpha, containment, max_window, max_kappa, context) for p in profiles()]
    for r in rows:
        print(f"{r['profile']:>24} {r['ar_ms']:6.2f} {r['plan'].label():>28} {r['mirror_x']:8.2f} "
              f"{r['sd_x']:6.2f} ({r['sd_window']}) {r['fixed_x']:11.2f}")
    for p in profiles():
        print(f"  {p.name}: {p.note}")
    return rows


def main(argv=None):
    a = parse_args(argv)
    if a.from_csv:
        rates, origin = rates_from_csv(a.from_csv), f"measured by our run ({a.from_csv})"
    elif a.from_stats:
        rates, origin = rates_from_stats(a.from_stats), f"measured by our run ({a.from_stats})"
    else:
        acc = a.mean_accepted if a.mean_accepted is not None else expected_accepted(a.acceptance, a.window)
        fb = a.fallback_rate if a.fallback_rate is not None else 1.0 - a.containment
        rates = [{"family": "all", "mean_accepted": acc, "sd_mean_accepted": acc, "fallback_rate": fb}]
        origin = (f"given: E[A] {acc:.2f}" + (f" (alpha {a.acceptance})" if a.mean_accepted is None else "")
                  + f", fallback {fb:.0%}" + (f" (containment {a.containment})" if a.fallback_rate is None else ""))
    dev_t = Device(a.bandwidth, a.tflops * 1e12, a.efficiency)
    dev_d = Device(a.draft_bandwidth, a.draft_tflops * 1e12, a.efficiency)
    print("PREDICTION from a roofline model (not a measurement)")
    print(f"target device {a.bandwidth / 1e12:.2f} TB/s, {a.tflops:.0f} TFLOP/s; draft device "
          f"{a.draft_bandwidth / 1e12:.2f} TB/s, {a.draft_tflops:.0f} TFLOP/s; efficiency {a.efficiency}; "
          f"gamma {a.window}, kappa {a.kappa}, eta {a.eta}, exit at {a.exit_frac:.2f} N, context {a.context}, "
          f"rendezvous {a.rv_exit_us:.0f} + {a.rv_verify_us:.0f} us")
    print(f"rates: {origin}")
    head = (f"{'target':>18} {'family':>14} {'E[A]':>5} {'fallbk':>6} {'AR ms':>6} {'SD ms':>6} {'Mir ms':>6} "
            f"{'suffix':>6} {'draft':>6} {'SD x':>5} {'Mirror x':>8} {'paper x':>8}")
    print(head + "\n" + "-" * len(head))
    for key in a.targets.split(","):
        target = TARGETS[key.strip()]
        draft = Shape(**{**DRAFT_BODY.__dict__, "vocab": target.vocab, "name": f"draft({target.vocab})"})
        for r in rates:
            kw = dict(gamma=a.window, kappa=a.kappa, exit_frac=a.exit_frac, context=a.context, eta=a.eta,
                      fallback_rate=r["fallback_rate"], rv_exit=a.rv_exit_us * 1e-6, rv_verify=a.rv_verify_us * 1e-6)
            m = step_times(target, draft, dev_t, dev_d, mean_accepted=r["mean_accepted"], **kw)
            s = step_times(target, draft, dev_t, dev_d, mean_accepted=r["sd_mean_accepted"], **kw)
            ms = lambda x: f"{x * 1e3:6.2f}"  # noqa: E731
            print(f"{target.name:>18} {r['family']:>14} {r['mean_accepted']:5.2f} {r['fallback_rate']:6.0%} "
                  f"{ms(m['ar_s'])} {ms(s['sd_s'])} {ms(m['mirror_s'])} {ms(m['terms']['suffix'])} "
                  f"{ms(m['terms']['draft_gen'])} {s['sd_speedup']:5.2f} {m['mirror_speedup']:8.2f} "
                  f"{paper_speedup(r['family']):>8}")
    print("\nshapes: " + "; ".join(f"{t.name} {t.layers}L h{t.hidden} ffn{t.intermediate} {t.heads}/{t.kv_heads} "
                                    f"heads V{t.vocab} [{t.source}]" for t in TARGETS.values()))
    print(f"draft: {DRAFT_BODY.name} {DRAFT_BODY.layers}L h{DRAFT_BODY.hidden} ffn{DRAFT_BODY.intermediate} "
          f"{DRAFT_BODY.heads}/{DRAFT_BODY.kv_heads} heads, the target's vocabulary [{DRAFT_BODY.source}]")
    print(PAPER_ABSTRACT)
    alpha = a.acceptance
    print_profiles(alpha, a.containment, a.window, a.kappa, a.context)
    return 0


if __name__ == "__main__":
    sys.exit(main())
