"""``mirror-rt bench`` (and ``python bench/specbench.py``): Spec-Bench over AR, SD, Mirror-SD.

    mirror-rt bench QUESTION_JSONL [--limit N] [--categories mt_bench,qa] [--decoders ar,sd,mirror]
                    [--max-new-tokens 64] [--temperature 0] [--window 3 --kappa 2 --exit-layer L --lane auto]
                    [--target PATH --draft SPEC] [--out DIR]

--limit N keeps the first N prompts of each task family (not N in total). The AR baseline always
runs first, in the same process, so every speedup is measured against it in the same run.
A decoder named ``module:factory`` is built by ``factory(target, draft, args)``.
Writes <out>/<model_id>-<decoder>.jsonl (Spec-Bench model_answer format), <out>/specbench.csv and
<out>/specbench.png, and prints the table with the latency law's prediction beside the measurement.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shlex
import subprocess
import sys

from mirror_rt import defaults


def add_bench_args(p):
    from mirror_rt.cli import _add_model_args

    p.add_argument("question_file", help="Spec-Bench question.jsonl (fields question_id, category, turns)")
    p.add_argument("--decoders", default="ar,sd,mirror",
                   help="comma-separated: ar, sd, mirror, auto, a grid point sd-wW or mirror-wW-kK (window W, "
                        "kappa K, plan fixed), or module:factory (AR is always added as the baseline)")
    p.add_argument("--limit", type=int, default=None, help="at most N prompts per task family (default: all)")
    p.add_argument("--categories", default=None,
                   help="comma-separated task families (mt_bench, translation, summarization, qa, math_reasoning, "
                        "rag) or raw MT-bench categories (writing, coding, ...)")
    p.add_argument("--split", default="eval", choices=["eval", "train", "all"],
                   help="which questions: 'eval' (default) never overlaps the prompts our draft and exit head "
                        "were trained on")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up generations per decoder")
    p.add_argument("--out", default=os.path.join("bench", "results", "specbench"), help="output folder")
    p.add_argument("--model-id", default=None, help="model_id prefix in the answer files (default: target name)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_model_args(p)


def register(subparsers):
    p = subparsers.add_parser("bench", help="Spec-Bench: tokens/s and speedup per task family, AR vs SD vs Mirror-SD")
    add_bench_args(p)
    p.set_defaults(func=cmd_bench)


def build_decoders(names, target, draft, args) -> dict:
    """{label: decoder}; 'ar' first. A 'module:factory' name calls factory(target, draft, args)."""
    from importlib import import_module

    from mirror_rt.cli import make_decoder

    names = [n.strip() for n in names if n.strip()]
    names = ["ar"] + [n for n in names if n != "ar"]
    decoders = {}
    for name in names:
        if ":" in name:
            module, attr = name.split(":", 1)
            decoders[attr] = getattr(import_module(module), attr)(target, draft, args)
        elif grid_point(name):
            kind, settings = grid_point(name)
            decoders[name] = make_decoder(kind, target, draft, argparse.Namespace(**{**vars(args), **settings}))
        else:
            decoders[name] = make_decoder(name, target, draft, args)
    return decoders


def grid_point(name: str):
    """'sd-w3' -> ("sd", {window: 3}); 'mirror-w3-k2' -> ("mirror", {window: 3, kappa: 2, plan: "fixed"});
    None for any other name."""
    m = re.fullmatch(r"(sd)-w(\d+)|(mirror)-w(\d+)-k(\d+)", name)
    if m is None:
        return None
    if m.group(1):
        return "sd", {"window": int(m.group(2))}
    return "mirror", {"window": int(m.group(4)), "kappa": int(m.group(5)), "plan": "fixed"}


def run_stamp() -> dict:
    """device, commit, date and command: every result row says where it came from."""
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    return {"device": f"{platform.machine()} x{torch.get_num_threads()} threads", "commit": commit,
            "date": datetime.date.today().isoformat(),
            "command": " ".join(shlex.quote(a) for a in [os.path.basename(sys.argv[0])] + sys.argv[1:])}


def cmd_bench(args):
    from mirror_rt.cli import load_pair
    from mirror_rt.sim import format_prediction, predict_from_stats
    from mirror_rt.specbench import load_questions, run_specbench, summarize
    from mirror_rt.specbench_report import format_table, plot_speedups, write_answers, write_csv
    from mirror_rt.tokenizer import encode_chat

    cats = args.categories.split(",") if args.categories else None
    questions = load_questions(args.question_file, cats, args.limit, args.split)
    target, draft, tok, label = load_pair(args)
    decoders = build_decoders(args.decoders.split(","), target, draft, args)
    context = min(target.config.max_position, draft.config.max_position)
    try:
        result = run_specbench(questions, lambda text: encode_chat(tok, text, target.device), decoders,
                               context=context, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                               seed=args.seed, eos_token_id=tok.eos_token_id, warmup=args.warmup,
                               progress=not args.no_progress)
    finally:
        for dec in decoders.values():
            if hasattr(dec, "close"):
                dec.close()
    rows = summarize(result, greedy=args.temperature == 0)
    model_id = args.model_id or getattr(target, "name", None) or target.config.arch
    stamp = run_stamp()
    paths = write_answers(result, args.out, model_id, lambda ids: tok.decode(ids, skip_special_tokens=True))
    csv_path = write_csv(rows, os.path.join(args.out, "specbench.csv"), stamp)
    png_path = plot_speedups(rows, os.path.join(args.out, "specbench.png"),
                             f"{model_id}, {stamp['device']}, {stamp['date']}")
    mirror = decoders.get("mirror")
    print(f"\nSpec-Bench ({args.question_file}): target {model_id} ({target.config.num_layers} layers), draft: {label}")
    print(f"{len(result['prompts'])} prompts ({len(result['skipped'])} skipped), "
          f"{'greedy' if args.temperature == 0 else f'temperature {args.temperature}'}, max {args.max_new_tokens} "
          f"new tokens, window {args.window or defaults.WINDOW}, kappa {args.kappa or defaults.KAPPA}"
          + (f", exit layer {mirror.config.exit_layer}, lane {args.lane}" if mirror is not None else ""))
    print(f"device {stamp['device']}, commit {stamp['commit']}, {stamp['date']}")
    print(format_table(rows))
    print("\nlatency law (mirror_rt.sim) over all prompts, decode phase only:")
    from mirror_rt.planner import plan_report

    for name, recs in result["runs"].items():
        print("  " + format_prediction(predict_from_stats([r["stats"] for r in recs])))
        for line in plan_report([r["stats"] for r in recs]):
            print("  " + line)
    print(f"\nwrote {csv_path}, {png_path}")
    for name, path in paths.items():
        print(f"wrote {path}")
    return rows
