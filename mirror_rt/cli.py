"""``mirror-rt``: generate, demo (and the tools other modules register: bench, probe, ...).

Bad arguments end with one line on stderr and exit code 2; no tracebacks for user errors.
"""
from __future__ import annotations

import argparse
import sys
import time

from mirror_rt import defaults
from mirror_rt.cli_checks import check_args

USER_ERRORS = (ValueError, TypeError, FileNotFoundError, ImportError)
# What the tools switch on that the library leaves off (context lookup, draft confidence cut, a
# process lane on a CPU): one table, mirror_rt/defaults.py, says why.
DEFAULT_LOOKUP = defaults.CLI_LOOKUP
DEFAULT_LOOKUP_WINDOW = defaults.CLI_LOOKUP_WINDOW
DEFAULT_MIN_DRAFT_PROB = defaults.CLI_MIN_DRAFT_PROB


def _add_model_args(p):
    p.add_argument("--target", help="target: HF checkpoint dir or .gguf (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--draft", help="draft: HF checkpoint dir, .gguf, an SS-draft .safetensors, or 'truncated:N' "
                                   "(first N target layers); default: our trained SS draft for the default target")
    p.add_argument("--exit-head", help="Mirror exit head .safetensors, or 'none' for the logit lens "
                                       "(default: our trained head for the default target)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window", type=int, default=None, help=f"draft window gamma (default {defaults.WINDOW})")
    p.add_argument("--kappa", type=int, default=None, help=f"Mirror kappa: exit candidates per position (default {defaults.KAPPA})")
    p.add_argument("--exit-layer", type=int, default=None, help="Mirror early-exit layer (default N/2)")
    p.add_argument("--max-branches", type=int, default=None, help="cap on Mirror branches per step")
    p.add_argument("--branch-policy", default=defaults.BRANCH_POLICY, choices=["ranked", "per_position"],
                   help="Mirror branches: ranked by estimated P(A=i, c=v), or top-kappa at every position")
    p.add_argument("--min-branch-prob", type=float, default=None,
                   help="ranked Mirror branches: skip those the exit head puts below this probability "
                        f"(default {defaults.MIN_BRANCH_PROB})")
    p.add_argument("--fallback", default=None, choices=["recompute", "exit"],
                   help="Mirror after a miss: recompute a window (the paper), or run the next step with an empty "
                        f"window whose exit branches give the draft its next one (default {defaults.FALLBACK})")
    p.add_argument("--exit-vocab", default="draft", choices=["draft", "full"],
                   help="Mirror exit scores the draft's reduced vocabulary (default) or the full one")
    p.add_argument("--mode", default=defaults.MODE, choices=["match", "rejection"],
                   help="Mirror sampling rule (default %(default)s; see MirrorConfig)")
    p.add_argument("--lookup", type=int, default=DEFAULT_LOOKUP,
                   help="SD and Mirror first copy a window from the context when its last N tokens occurred "
                        "before (greedy only; 0 = the draft alone; default %(default)s)")
    p.add_argument("--lookup-window", type=int, default=DEFAULT_LOOKUP_WINDOW,
                   help="tokens a copied window may hold (needs no draft pass; values below --window "
                        "count as --window; default 0: --window). On this CPU 7 at window 3 raised the "
                        "accepted length 12-14%% but the step cost 8-12%%: no net gain (bench/RESULTS.md)")
    p.add_argument("--min-draft-prob", type=float, default=DEFAULT_MIN_DRAFT_PROB,
                   help="a draft window ends before the first token the draft gives less than this "
                        "probability (0: full windows; default %(default)s); an empty window is a plain "
                        "target step")
    p.add_argument("--lane", default="auto", help="where the Mirror draft runs: auto|inline|thread|process|cuda|npu "
                                                  "(auto: a second process on a CPU, a stream on a GPU)")
    p.add_argument("--plan", default=None, choices=["auto", "fixed"],
                   help="Mirror-SD's plan: 'auto' fits window, kappa, branches and overlap to the measured step "
                        "(--window/--kappa bound it); 'fixed' runs --window/--kappa every step "
                        "(default: mirror_rt.defaults.PLAN)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for the target (default: all cores)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="run the models' forward compiled (torch.compile; CUDA graphs on a GPU). Default: auto, "
                        "on for CUDA and off on a CPU, where compiling takes minutes (mirror_rt.compiled)")


def load_pair(args):
    """(target, draft, tokenizer, draft_label) from --target/--draft (defaults: the embedded pair);
    sets args.exit_head_fn from --exit-head (default: our trained head for the default target)."""
    import torch

    from mirror_rt import default
    from mirror_rt.models import load_model
    from mirror_rt.models.file_pages import trim_heap
    from mirror_rt.probe import load_draft
    from mirror_rt.tokenizer import load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.target or default.default_target_path()
    print(f"loading target {path} ...", file=sys.stderr)
    t0 = time.perf_counter()
    target = load_model(path, device=args.device)
    t1 = time.perf_counter()
    if not args.target:
        target.name = default.DEFAULT_TARGET_NAME
    tokenizer = load_tokenizer(target.source or path)
    print(f"loaded target in {t1 - t0:.2f} s, tokenizer in {time.perf_counter() - t1:.2f} s", file=sys.stderr)
    args.exit_head_fn = None
    if getattr(args, "decoder", None) == "ar":  # no draft, no exit head: nothing to load
        trim_heap()
        return target, None, tokenizer, None
    if args.draft:
        draft, label = load_draft(args.draft, target), args.draft
    elif args.target:
        draft = load_draft(f"truncated:{default.DEFAULT_DRAFT_LAYERS}", target)
        label = f"truncated copy of the target ({default.DEFAULT_DRAFT_LAYERS} of {target.num_layers} layers + LM head)"
    else:
        draft, label = default.load_default_draft(target)
    if args.exit_head and args.exit_head != "none":
        from mirror_rt.exit_head import load_exit_head
        args.exit_head_fn = load_exit_head(args.exit_head, target)
    elif args.exit_head is None and not args.target:
        args.exit_head_fn = default.load_default_exit_head(target)
    trim_heap()  # the loaders' freed temporaries: not resident under what generation adds (peak memory)
    return target, draft, tokenizer, label


def cli_lane(args, target) -> str:
    """--lane, with "auto" on a CPU resolved to the tools' process lane (defaults.CLI_CPU_LANE)."""
    lane = getattr(args, "lane", None) or defaults.LANE
    return defaults.CLI_CPU_LANE if lane == "auto" and target.device.type == "cpu" else lane


def make_decoder(name, target, draft, args):
    """'ar', 'sd', 'mirror' or 'auto' (AutoDecoder: the fastest of the three, measured on the request)."""
    from mirror_rt.decoders import (AutoregressiveDecoder, DraftOptions, MirrorConfig, MirrorDecoder, Placement,
                                    SpeculativeDecoder)
    from mirror_rt.decoders.auto import AutoDecoder

    window = args.window or defaults.WINDOW
    lookup = getattr(args, "lookup", 0)  # namespaces built without our parser: off
    lookup_window = getattr(args, "lookup_window", 0)
    lookup_window = max(window, lookup_window) if lookup_window else None
    min_draft_prob = getattr(args, "min_draft_prob", 0.0)
    compile = getattr(args, "compile", None)
    compile = "auto" if compile is None else compile
    if name == "ar":
        return AutoregressiveDecoder(target, compile=compile)
    if name == "sd":
        return SpeculativeDecoder(target, draft, window, lookup=lookup, lookup_window=lookup_window,
                                  min_draft_prob=min_draft_prob, compile=compile)
    if name in ("mirror", "auto"):
        head = getattr(args, "exit_head_fn", None)
        exit_layer = args.exit_layer or (head.exit_layer if head is not None else None)
        floor = getattr(args, "min_branch_prob", None)
        config = MirrorConfig(
            exit_layer=exit_layer, exit_head=head, kappa=args.kappa or defaults.KAPPA, window=window,
            branch_policy=getattr(args, "branch_policy", None) or defaults.BRANCH_POLICY,
            fallback=getattr(args, "fallback", None) or defaults.FALLBACK,
            mode=getattr(args, "mode", None) or defaults.MODE, plan=getattr(args, "plan", None) or defaults.PLAN,
            draft=DraftOptions(lookup=lookup, lookup_window=lookup_window, min_prob=min_draft_prob,
                               min_branch_prob=defaults.MIN_BRANCH_PROB if floor is None else floor,
                               max_branches=getattr(args, "max_branches", None),
                               exit_vocab=getattr(args, "exit_vocab", None) or defaults.EXIT_VOCAB))
        decoder = MirrorDecoder if name == "mirror" else AutoDecoder
        lane_start = getattr(args, "lane_start", "wait")
        return decoder(target, draft, config, Placement(lane=cli_lane(args, target), compile=compile,
                                                        lane_start=lane_start))
    raise ValueError(f"--decoder must be ar, sd, mirror or auto, got {name!r}")


def cmd_generate(args):
    from mirror_rt.generation import TextStreamer, resolve_eos
    from mirror_rt.tokenizer import encode_chat

    t0 = time.perf_counter()
    target, draft, tok, label = load_pair(args)
    load_s = time.perf_counter() - t0
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    ids = encode_chat(tok, prompt, target.device)
    args.lane_start = "background"  # one request: the target starts while a draft process comes up
    dec = make_decoder(args.decoder, target, draft, args)
    stream = TextStreamer(tok)  # prints text as later tokens can no longer change it
    eos = resolve_eos(target) + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
    first = []  # when the first token came: time to first token counts from the start of generate

    def on_tokens(new):
        if not first:
            first.append(time.perf_counter())
        stream(new)

    t_gen = time.perf_counter()
    stop = {"stop": args.stop, "tokenizer": tok} if getattr(args, "stop", None) else {}
    out = dec.generate(ids, args.max_new_tokens, eos_token_id=eos, temperature=args.temperature,
                       seed=args.seed, stream=on_tokens, **stop)
    stream.end()
    print()
    s = out.stats
    extra = f", reuse {s['reuse_rate']:.0%}, fallback {s['fallback_rate']:.0%}" if "reuse_rate" in s else ""
    print(f"[{args.decoder}] {s['new_tokens']} tokens, {s['tokens_per_s']:.1f} tok/s, mean accepted "
          f"{s.get('mean_accepted', 0.0):.2f}{extra}{f'; draft: {label}' if label else ''}", file=sys.stderr)
    from mirror_rt.planner import plan_report

    for line in plan_report(s):
        print(line, file=sys.stderr)
    ttft = f"{first[0] - t_gen:.3f} s" if first else "-"  # 3 decimals: a tiny model answers within 5 ms
    print(f"  load {load_s:.3f} s, first token {ttft} after generate started", file=sys.stderr)
    if hasattr(dec, "close"):
        dec.close()


def cmd_demo(args):
    from mirror_rt.demo import run_demo

    return run_demo(args, load_pair, make_decoder)


def build_parser():
    parser = argparse.ArgumentParser(prog="mirror-rt", description="Mirror Speculative Decoding runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text from a prompt (streamed)")
    g.add_argument("prompt", nargs="?", help="the user message (default: read stdin)")
    g.add_argument("--decoder", default="mirror", choices=["ar", "sd", "mirror", "auto"])
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop string (repeatable): the output ends right after the token that completes it")
    _add_model_args(g)
    g.set_defaults(func=cmd_generate)
    d = sub.add_parser("demo", help="AR, vanilla SD and Mirror-SD side by side on the embedded default")
    _add_model_args(d)
    d.add_argument("--prompts", type=int, default=None, help="use only the first N prompts")
    d.add_argument("--prompt-file", help="Spec-Bench question.jsonl (default: $MIRROR_RT_SPEC_BENCH or the shared "
                                         "dev half); its evaluation split, 1 prompt per task family")
    d.add_argument("--builtin-prompts", action="store_true", help="use the 4 built-in prompts instead")
    d.set_defaults(func=cmd_demo)
    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands():
    """Subcommands that live with their own code (bench, probe, training), when present."""
    found = []
    for module in ("mirror_rt.bench_cli", "mirror_rt.probe", "mirror_rt.train.cli"):
        try:
            found.append(__import__(module, fromlist=["register"]).register)
        except ImportError:
            continue
    return found


def main(argv=None):
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        check_args(args)  # bad values fail here, before any model loads
        args.func(args)
    except USER_ERRORS as e:
        print(f"mirror-rt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(f"[done in {time.perf_counter() - t0:.1f} s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
