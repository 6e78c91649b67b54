"""AR, SD and Mirror-SD end to end, eager against compiled (CUDA graphs on a GPU), with Hugging
Face ``generate`` (static cache + torch.compile) on the same shape in the same run as the peer.

    python bench/compiled_e2e.py                       # Llama-3.1-8B shape, random bf16 weights, CUDA
    python bench/compiled_e2e.py --tiny --device cpu --backend aot_eager --new-tokens 8   # smoke run

Weights are random, so acceptance is CONTROLLED as in bench/systems.py (an oracle draft and exit
head: the same classes). Rows print as they are measured (a run cut short keeps them); rows that
would start after --budget-s are skipped and named. Columns: tok/s, speedup against eager AR of
the same run, warm_s (the warm-up generations: compiling happens there), equals eager AR.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import systems  # noqa: E402
from harness import device_name, git_commit  # noqa: E402
from mirror_rt.compiled import prepare  # noqa: E402
from mirror_rt.decoders import AutoregressiveDecoder  # noqa: E402


def _timed(fn, device):
    systems._sync(device)
    t0 = time.perf_counter()
    out = fn()
    systems._sync(device)
    return out, time.perf_counter() - t0


def hf_peer(shape: str, device, dtype, prompt, new_tokens: int, backend=None):
    """(tok/s, warm_s) of transformers' generate with a static cache and a compiled forward
    (mode reduce-overhead) on the same shape, random weights; None if transformers is missing."""
    try:
        import transformers
    except ImportError:
        return None
    fields = systems.SHAPES[shape]
    cfg = transformers.LlamaConfig(
        vocab_size=fields["vocab_size"], hidden_size=fields["hidden_size"],
        intermediate_size=fields["intermediate_size"], num_hidden_layers=fields["num_layers"],
        num_attention_heads=fields["num_heads"], num_key_value_heads=fields["num_kv_heads"],
        head_dim=fields.get("head_dim"), rope_theta=fields.get("rope_theta", 10000.0),
        tie_word_embeddings=fields.get("tie_embeddings", False), max_position_embeddings=8192)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.cache_implementation = "static"
    backend = backend or "inductor"
    mode = "reduce-overhead" if device.type == "cuda" and backend == "inductor" else None
    model.forward = torch.compile(model.forward, mode=mode, fullgraph=True, backend=backend)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    _, warm = _timed(lambda: model.generate(prompt, **kw), device)
    model.generate(prompt, **kw)
    _, wall = _timed(lambda: model.generate(prompt, **kw), device)
    del model
    return new_tokens / wall, warm


def run(args):
    device = torch.device(args.device)
    dtype = systems._dtype_for(args.device)
    shape, draft_shape = ("tiny", "tiny-draft") if args.tiny else (args.shape, args.draft)
    deadline = time.perf_counter() + args.budget_s if args.budget_s else None
    target = systems.build(shape, None, device, dtype, seed=1)
    draft = systems.build(draft_shape, target.config.vocab_size, device, dtype, seed=2)
    vocab = target.config.vocab_size
    prompt = torch.randint(0, vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(3)).to(device)
    rows, ref, ar_s = [], None, None
    opts = SimpleNamespace(window=args.window, kappa=args.kappa, max_branches=None, branch_policy="ranked",
                           lane=args.lane, fallback="recompute", min_branch_prob=0.05)

    def add(row):
        rows.append(row)
        print(_fmt(row), flush=True)
        if args.csv:
            with open(args.csv, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
                w.writeheader()
                w.writerows(rows)

    # AR first (the reference tokens and the baseline), then the peer, then SD and Mirror-SD.
    jobs = [(dec, mode) for dec in args.decoders[:1] for mode in args.modes] + [("hf-static", "compiled")] * args.hf \
        + [(dec, mode) for dec in args.decoders[1:] for mode in args.modes]
    for decoder, mode in jobs:
        if deadline is not None and time.perf_counter() > deadline:
            print(f"# skipped (time budget): {decoder} {mode}", flush=True)
            continue
        if decoder == "hf-static":
            try:
                peer = hf_peer(shape, device, dtype, prompt, args.new_tokens, args.backend)
            except Exception as e:  # noqa: BLE001 - one failing row must not hide the others
                print(f"{shape} hf-generate FAILED: {type(e).__name__}: {e}", flush=True)
                peer = None
            if peer:
                add({"target": shape, "device": device_name(args.device), "decoder": "hf-static", "mode": "compiled",
                     "acceptance": None, "tokens": args.new_tokens, "tok_s": round(peer[0], 1),
                     "speedup_vs_ar": round(peer[0] * ar_s / args.new_tokens, 3) if ar_s else None,
                     "warm_s": round(peer[1], 1), "equals_ar": None, "compiled": True, "commit": git_commit()})
            continue
        on = mode == "compiled"
        # The models are prepared here and then wrapped by the oracle classes; the decoders'
        # own "auto" is held off in eager rows (MIRROR_RT_COMPILE=0), and finds nothing more
        # to compile in compiled rows.
        os.environ["MIRROR_RT_COMPILE"] = "1" if on else "0"
        dec = None
        try:
            t = prepare(target, on, backend=args.backend)
            d = prepare(draft, on, backend=args.backend)
            if decoder == "ar":
                dec = AutoregressiveDecoder(t)
            else:
                path = prompt[0].tolist() + ref.tokens[0].tolist()
                oracle = systems.Oracle(path, vocab, args.acceptance, args.containment, seed=4)
                dec = systems._decoder(decoder, t, d, oracle, opts)
            # Warm-up: two generations, so that buckets met late (tree sizes) compile before timing.
            _, warm = _timed(lambda: [dec.generate(prompt, args.new_tokens) for _ in range(1 + on)], device)
            out, wall = _timed(lambda: dec.generate(prompt, args.new_tokens), device)
        except Exception as e:  # noqa: BLE001 - one failing row must not hide the others
            print(f"{shape} {decoder} {mode} FAILED: {type(e).__name__}: {e}", flush=True)
            continue
        finally:
            if hasattr(dec, "close"):
                dec.close()
            os.environ.pop("MIRROR_RT_COMPILE", None)
        if decoder == "ar" and (mode == "eager" or ref is None):
            ref, ar_s = out, wall
        n = out.tokens.shape[1]
        add({"target": shape, "device": device_name(args.device), "decoder": decoder, "mode": mode,
             "acceptance": None if decoder == "ar" else args.acceptance, "tokens": n,
             "tok_s": round(n / wall, 1), "speedup_vs_ar": round(ar_s / wall, 3) if ar_s else None,
             "warm_s": round(warm, 1), "equals_ar": None if ref is None else out.tokens.tolist() == ref.tokens.tolist(),
             "compiled": bool(getattr(t, "enabled", False) and getattr(t, "buckets", ())),
             "commit": git_commit()})
    return rows


def _fmt(r):
    return (f"{r['target']:>10} {r['decoder']:>9} {r['mode']:>8} acc={r['acceptance']} {r['tok_s']:>8} tok/s  "
            f"x{r['speedup_vs_ar']} vs eager AR  warm {r['warm_s']} s  ==AR {r['equals_ar']}  compiled {r['compiled']}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--draft", default="draft-0.5b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--decoders", nargs="+", default=["ar", "sd", "mirror"], choices=["ar", "sd", "mirror"])
    p.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    p.add_argument("--acceptance", type=float, default=0.8)
    p.add_argument("--containment", type=float, default=0.9)
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--kappa", type=int, default=2)
    p.add_argument("--lane", default="auto")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--backend", default=None, help="torch.compile backend (default: mirror_rt.compiled.BACKEND)")
    p.add_argument("--hf", action=argparse.BooleanOptionalAction, default=True, help="the transformers peer row")
    p.add_argument("--tiny", action="store_true", help="tiny shapes: a smoke run of the same code")
    p.add_argument("--budget-s", type=float, default=None)
    p.add_argument("--csv", default=None)
    args = p.parse_args(argv)
    if args.decoders[0] != "ar":
        p.error("--decoders must start with ar (the reference tokens and the speedup's baseline)")
    return run(args)


if __name__ == "__main__":
    main()
