"""Systems benchmark, CONTROLLED-ACCEPTANCE: server-scale shapes, random weights, an oracle.

Targets are built from real configs (Llama-3-8B and Qwen3-14B shapes) and the draft from a
0.5B shape, all with random weights (nothing can be downloaded), in bf16 on the GPU. Random
weights make real acceptance meaningless, so an *acceptance oracle* controls the token
statistics while every kernel, stream, event and copy runs at its real cost:

- the draft's LM head output is overridden so that, at a row whose token is on the target's own
  greedy path, it proposes the next greedy token with probability `acceptance` (else a random
  wrong token); the draft's forward itself still runs in full;
- the exit head's real logits are computed, then the target's true next token is forced into
  (with probability `containment`) or out of the top-kappa.

Verification is real (the target's logits decide), so outputs stay lossless; the measured
acceptance is reported beside the requested one. Every table says CONTROLLED-ACCEPTANCE.

    python bench/systems.py                  # GPU: 8B and 14B shapes, acceptance {0.6, 0.8} x containment {0.5, 0.9}
    python bench/systems.py --tiny --device cpu   # a seconds-long smoke run of the same code
    python bench/systems.py --device cpu --targets smollm2-135m --draft smollm2-draft --lane thread \
        --window 3 --kappa 2 --acceptance 0.8 --containment 0.9   # the embedded default's shapes on a CPU

Each row ends with where a step's time went (the decoder's phase timers, ms per step).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import device_name, git_commit  # noqa: E402

from mirror_rt.decoders import (AutoregressiveDecoder, MirrorConfig, MirrorDecoder, Placement,  # noqa: E402
                                SpeculativeDecoder)
from mirror_rt.decoders.mirror import FALLBACKS  # noqa: E402
from mirror_rt.decoders.mirror_exit import POLICIES  # noqa: E402
from mirror_rt.models.config import ModelConfig  # noqa: E402
from mirror_rt.models.derive import ModelWrapper  # noqa: E402
from mirror_rt.models.llama import LlamaModel  # noqa: E402

SHAPES = {  # public configs (config.json of each model family)
    "llama3-8b": dict(arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                      num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0),
    "qwen3-14b": dict(arch="qwen3", vocab_size=151936, hidden_size=5120, intermediate_size=17408, num_layers=40,
                      num_heads=40, num_kv_heads=8, head_dim=128, rope_theta=1000000.0),
    "draft-0.5b": dict(arch="qwen2", hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                       num_kv_heads=2, head_dim=64, rope_theta=1000000.0),
    # the embedded default target's shape, and a draft of its width (ours has 4 layers, as here, but
    # scores 8,192 tokens where this one's head scores the full vocabulary)
    "smollm2-135m": dict(arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                         num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0, tie_embeddings=True),
    "smollm2-draft": dict(arch="llama", hidden_size=576, intermediate_size=1536, num_layers=4, num_heads=9,
                          num_kv_heads=3, head_dim=64, rope_theta=100000.0, tie_embeddings=True),
    "tiny": dict(arch="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
                 num_kv_heads=2, head_dim=16),
    "tiny-draft": dict(arch="llama", hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                       num_kv_heads=1, head_dim=16),
}


def build(shape: str, vocab: int | None, device, dtype, seed: int, layers: int | None = None) -> LlamaModel:
    fields = dict(SHAPES[shape], max_position=8192)
    if vocab:
        fields["vocab_size"] = vocab
    if layers:
        fields["num_layers"] = layers
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build directly in bf16 on the device: no fp32 copy of 14B params
    try:
        with torch.device(device):
            model = LlamaModel(ModelConfig(**fields))
    finally:
        torch.set_default_dtype(previous)
    model.inv_freq = model.inv_freq.float()
    model.name = shape
    return model.eval()


class Oracle:
    """The target's greedy path (prompt + continuation) and the controlled coin flips."""

    def __init__(self, path: list[int], vocab: int, acceptance: float, containment: float, seed: int):
        self.path, self.vocab = path, vocab
        self.acceptance, self.containment = acceptance, containment
        self.rng = torch.Generator().manual_seed(seed)

    def coin(self, p: float) -> bool:
        return bool(torch.rand((), generator=self.rng) < p)

    def on_path(self, token: int, position: int) -> bool:
        return position + 1 < len(self.path) and self.path[position] == token

    def wrong(self, right: int) -> int:
        t = int(torch.randint(self.vocab - 1, (), generator=self.rng))
        return t + 1 if t >= right else t


class RecordingModel(ModelWrapper):
    """Wraps a model, remembering the ids and absolute positions of its last forward."""

    def __init__(self, inner):
        super().__init__(inner)
        self.ids = self.positions = None

    def embed(self, ids):
        self.ids = ids[0].tolist()
        return self.inner.embed(ids)

    def run_layers(self, hidden, start, end, cache, positions=None, tree_mask=None, tree_offset=0):
        if start == 0:
            T = hidden.shape[1]
            base = cache.length + tree_offset
            self.positions = positions[0].tolist() if positions is not None else list(range(base, base + T))
        return self.inner.run_layers(hidden, start, end, cache, positions, tree_mask, tree_offset)


class OracleDraft(RecordingModel):
    def __init__(self, inner, oracle: Oracle):
        super().__init__(inner)
        self.oracle = oracle

    def head(self, hidden):
        logits = self.inner.head(hidden)  # the real cost
        forced = torch.empty(logits.shape[1], dtype=torch.int64)
        for r, (tok, pos) in enumerate(zip(self.ids, self.positions)):
            right = self.oracle.path[pos + 1] if self.oracle.on_path(tok, pos) else 0
            ok = self.oracle.on_path(tok, pos) and self.oracle.coin(self.oracle.acceptance)
            forced[r] = right if ok else self.oracle.wrong(right)
        logits[0, torch.arange(len(forced)), forced.to(logits.device)] = 1e4
        return logits


class OracleExit:
    """Exit head: the real logit lens, then the true token forced in/out of the top-kappa."""

    def __init__(self, target: RecordingModel, oracle: Oracle):
        self.target, self.oracle = target, oracle

    def __call__(self, hidden):
        logits = self.target.head(hidden).clone()
        for r, (tok, pos) in enumerate(zip(self.target.ids, self.target.positions)):
            if self.oracle.on_path(tok, pos):
                nxt = self.oracle.path[pos + 1]
                logits[0, r, nxt] = 1e4 if self.oracle.coin(self.oracle.containment) else -1e4
        return logits


def run(args):
    """Rows (dicts) for every target: AR, then SD per acceptance and Mirror-SD per (acceptance,
    containment). Each row is printed and appended to args.csv as soon as it is measured, so a
    run cut short by a time limit keeps what it measured; rows that would start after
    args.budget_s seconds are skipped and named."""
    device, dtype = torch.device(args.device), _dtype_for(args.device)
    draft_device = torch.device(args.draft_device or args.device)
    deadline = time.perf_counter() + args.budget_s if args.budget_s else None
    out = RowSink(args.csv)
    for shape in args.targets:
        if _over(deadline, f"{shape}: all rows"):
            continue
        target = build(shape, None, device, dtype, seed=1)
        draft = build(args.draft, target.config.vocab_size, draft_device, _dtype_for(draft_device.type), seed=2,
                      layers=args.draft_layers)
        prompt = torch.randint(0, target.config.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(3))
        prompt = prompt.to(device)
        ar = AutoregressiveDecoder(target)
        ar.generate(prompt, 8)  # warm-up (kernels, allocator)
        _sync(device)
        t0 = time.perf_counter()
        ref = ar.generate(prompt, args.new_tokens)
        _sync(device)
        ar_s = time.perf_counter() - t0
        path = prompt[0].tolist() + ref.tokens[0].tolist()
        out.add(_row(shape, "ar", None, None, ref, ar_s, ar_s, None, draft_device))
        if args.profile:
            _profile(lambda: ar.generate(prompt, 16))
        for acc in args.acceptance:
            # SD never reads the exit head: one row per acceptance, not per containment.
            for name, cont in [("sd", None)] + [("mirror", c) for c in args.containment]:
                if _over(deadline, f"{shape} {name} acc={acc} cont={cont}"):
                    continue
                dec = _decoder(name, target, draft, Oracle(path, target.config.vocab_size, acc, cont or 0.0, seed=4),
                               args)
                try:
                    dec.generate(prompt, 8)  # warm-up
                    _sync(device)
                    t0 = time.perf_counter()
                    res = dec.generate(prompt, args.new_tokens)
                    _sync(device)
                except Exception as e:  # noqa: BLE001 - one failing row must not hide the others
                    print(f"{shape} {name} acc={acc} cont={cont} FAILED: {type(e).__name__}: {e}", flush=True)
                    continue
                finally:
                    if hasattr(dec, "close"):
                        dec.close()
                wall = time.perf_counter() - t0
                same = res.tokens.tolist() == ref.tokens.tolist()
                out.add(_row(shape, name, acc, cont, res, wall, ar_s, same, draft_device))
        del target, draft
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out.rows


def _decoder(name, target, draft, oracle, args):
    odraft = OracleDraft(draft, oracle)
    if name == "sd":
        return SpeculativeDecoder(target, odraft, args.window)
    rec_target = RecordingModel(target)
    # per_position (the default here): the oracle controls membership of the true token in every
    # position's top-kappa, which is what "containment" means. "ranked" re-weighs it: the oracle's
    # exit is certain of the true token, so ranked rolls out (about) the one branch that is the
    # correction when it is contained: Mirror's best case, with the fewest rollouts.
    return MirrorDecoder(rec_target, odraft, MirrorConfig(
        exit_layer=target.num_layers // 2, kappa=args.kappa, window=args.window, max_branches=args.max_branches,
        exit_head=OracleExit(rec_target, oracle), branch_policy=args.branch_policy,
        fallback=args.fallback, min_branch_prob=args.min_branch_prob, plan="fixed"), Placement(lane=args.lane))


def _over(deadline, what: str) -> bool:
    if deadline is not None and time.perf_counter() > deadline:
        print(f"# skipped (time budget): {what}", flush=True)
        return True
    return False


class RowSink:
    """Prints each row and appends it to a CSV file (header first), flushing as it goes."""

    def __init__(self, path):
        self.path, self.rows = path, []
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            open(path, "w").close()

    def add(self, row: dict):
        self.rows.append(row)
        print(_fmt(row), flush=True)
        if self.path:
            with open(self.path, "a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(row))
                if len(self.rows) == 1:
                    w.writeheader()
                w.writerow(row)


def _profile(fn):
    """Where an AR step's time goes (top ops by self CPU and device time)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        fn()
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    print(prof.key_averages().table(sort_by=key, row_limit=8))


def _dtype_for(device: str) -> torch.dtype:
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _row(shape, decoder, acc, cont, out, wall, ar_wall, same, draft_device):
    s = out.stats
    return {"regime": "CONTROLLED-ACCEPTANCE", "target": shape, "decoder": decoder, "acceptance": acc,
            "containment": cont, "tokens": s["new_tokens"], "steps": s["steps"],
            "step_ms": round(wall / max(s["steps"], 1) * 1e3, 2), "tok_s": round(s["new_tokens"] / wall, 1),
            "speedup_vs_ar": round(ar_wall / wall, 3), "mean_accepted": round(s["mean_accepted"], 2),
            "reuse_rate": round(s.get("reuse_rate", 0.0), 3), "fallback_rate": round(s.get("fallback_rate", 0.0), 3),
            "overlap_fraction": round(s.get("overlap_fraction", 0.0), 3),
            "branches_per_step": round(s.get("branches", 0) / max(s["steps"], 1), 2), "equals_ar": same,
            "phase_ms_per_step": _phases(s), "draft_device": draft_device.type}


def _phases(stats) -> str:
    """Where a step's time went: 'name=ms ...' per step, from the decoder's phase timers (the
    prompt's prefill excluded, since it is not a step)."""
    steps = max(stats["steps"], 1)
    return " ".join(f"{k}={v / steps * 1e3:.1f}" for k, v in stats.get("phase_s", {}).items()
                    if k not in ("prefill", "first_window"))


def _fmt(r):
    return (f"{r['target']:>10} {r['decoder']:>7} acc={r['acceptance']} cont={r['containment']} "
            f"step {r['step_ms']:>8} ms  {r['tok_s']:>7} tok/s  x{r['speedup_vs_ar']:<6} accepted {r['mean_accepted']:<5} "
            f"reuse {r['reuse_rate']:<5} fallback {r['fallback_rate']:<5} overlap {r['overlap_fraction']:<5} "
            f"branches {r['branches_per_step']:<5} "
            f"==AR {r['equals_ar']}  [{r['phase_ms_per_step']}]")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--targets", nargs="+", default=["llama3-8b", "qwen3-14b"])
    p.add_argument("--draft", default="draft-0.5b")
    p.add_argument("--draft-device", default=None,
                   help="the draft's device (default: --device); e.g. cpu beside a CUDA target: a device of its own")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--acceptance", type=float, nargs="+", default=[0.6, 0.8])
    p.add_argument("--containment", type=float, nargs="+", default=[0.5, 0.9])
    p.add_argument("--draft-layers", type=int, default=None, help="override the draft shape's layer count")
    p.add_argument("--window", type=int, default=7)
    p.add_argument("--kappa", type=int, default=8)
    p.add_argument("--max-branches", type=int, default=None)
    p.add_argument("--lane", default="auto")
    p.add_argument("--fallback", default="recompute", choices=FALLBACKS, help="Mirror after a miss")
    p.add_argument("--branch-policy", default="per_position", choices=POLICIES, help="Mirror's branches")
    p.add_argument("--min-branch-prob", type=float, default=0.0, help="ranked: drop branches below this")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--tiny", action="store_true", help="tiny shapes: a smoke run of the same code")
    p.add_argument("--csv", default=None)
    p.add_argument("--profile", action="store_true", help="print a profile of 16 AR tokens per target")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no new row after this many seconds (rows so far are kept)")
    args = p.parse_args(argv)
    if args.tiny:
        args.targets, args.draft, args.new_tokens, args.prompt_len = ["tiny"], "tiny-draft", 40, 16
    print(f"# systems benchmark, CONTROLLED-ACCEPTANCE (random weights, oracle draft/exit) on "
          f"{device_name(args.device)}, commit {git_commit()}, {time.strftime('%Y-%m-%d')}")
    print(f"# reproduce: python {' '.join(sys.argv)}")
    rows = run(args)
    if args.csv:
        print(f"# wrote {args.csv} ({len(rows)} rows)")
    return rows


if __name__ == "__main__":
    main()
