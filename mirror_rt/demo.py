"""``mirror-rt demo``: AR, vanilla SD and Mirror-SD side by side on the same prompts.

Every decoder runs every prompt greedily; AR is the baseline measured in the same run. One short
warm-up generation per decoder is excluded from timing. The table reports tokens/s, speedup vs
AR, mean accepted length, Mirror's reuse/fallback rates and overlap, the share of windows the
context lookup copied, and whether each decoder's output equals the AR output token for token.
Prompts run interleaved across decoders. The header says which backend took the few-row linears and,
for the C++ kernel, its measured speed against torch's on this CPU.
"""
from __future__ import annotations

import sys
import time

import torch
from tqdm.auto import tqdm

from mirror_rt import defaults
from mirror_rt.sim import format_prediction, predict_from_stats

DECODERS = ("ar", "sd", "mirror")
# The demo runs every decoder with the defaults of mirror_rt/defaults.py (override with --window,
# --kappa, --fallback, --min-branch-prob, --lane); that table says why they are what they are.


def threads_note(mirror) -> str:
    """How the decoders use torch's threads: every one for AR, SD and the target's prefill and
    prefixes; on a CPU worker-thread or process lane Mirror's draft keeps its share and the target's
    suffix runs beside it on the rest (on 2 cores, 1 + 1: oversubscribed OpenMP teams spin and slow
    both sides)."""
    total = torch.get_num_threads()
    steps = mirror.step_threads(total)
    if steps is None:
        return f"threads {total}"
    return (f"threads {total} (Mirror: prefill and prefixes {total}, suffix {steps} beside the draft's "
            f"{mirror.draft_threads})")


def core_sharing_note(mirror) -> str:
    """A line for runs where Mirror's draft took a share of the target's CPU cores, '' otherwise.
    There the target's suffix runs on fewer threads than SD's target does. On 2 cores no draft
    repays that: with an oracle draft on the default's shapes Mirror still trailed SD
    (bench/RESULTS.md, "Mirror-SD against SD with an oracle draft"). Call it while the decoder's lane is open."""
    total = torch.get_num_threads()
    suffix = mirror.step_threads(total)
    if suffix is None:
        return ""
    return (f"note: Mirror-SD's suffix ran on {suffix} of the {total} threads SD's target uses, its draft on "
            f"{mirror.draft_threads}; it gains only where the suffix loses less to that split than the draft "
            f"saves, which 2 cores never allow (README: Limits; python bench/core_bandwidth.py measures the split)")


def linear_note(model, rows=(1, 4), reps=3) -> str:
    """Which backend takes the decoders' few-row linears here and, for the C++ small-row kernel,
    its speed against torch's F.linear on this CPU: one pass over every linear of ``model`` (its
    own weights, so they stream from memory as in decoding) at each row count, best of ``reps``,
    the two interleaved. The kernel's lead depends on the CPU (on one Intel Xeon it ran at half of
    torch's speed until its prefetch hint changed; bench/RESULTS.md), and every speedup in the
    table leans on it."""
    import torch.nn.functional as F

    from mirror_rt import ops
    from mirror_rt.models.llama import Linear

    from mirror_rt.models.quant import is_quantized, quant_note

    if is_quantized(model):
        return quant_note(model)
    weights = list({m.weight.data_ptr(): m.weight for m in model.modules() if isinstance(m, Linear)}.values())
    if not weights or weights[0].device.type != "cpu" or weights[0].dtype != torch.float32:
        return "linears: torch"
    forced = ops.forced_backend()
    if forced not in ("", "cpp"):
        return f"linears: torch's F.linear (MIRROR_RT_BACKEND={forced})"
    if not ops._small_linear_rows():
        return "linears: torch's F.linear (the C++ extension is not built)"
    ratios = []
    with torch.inference_mode():
        for r in rows:
            inputs = {w.shape[1]: torch.randn(r, w.shape[1]) for w in weights}
            best = {ops.linear: float("inf"), F.linear: float("inf")}
            for _ in range(reps):
                for fn in best:
                    t0 = time.perf_counter()
                    for w in weights:
                        fn(inputs[w.shape[1]], w)
                    best[fn] = min(best[fn], time.perf_counter() - t0)
            ratios.append(f"{best[F.linear] / best[ops.linear]:.2f}x at {r} row{'s' if r > 1 else ''}")
    hint = getattr(ops._cpp(), "small_linear_prefetch_hint", "?")
    return f"linears: C++ small-row kernel (prefetch {hint}), {' and '.join(ratios)} against F.linear on this CPU"


def demo_prompts(args) -> tuple[list[str], str]:
    """(prompts, where they come from). Held-out Spec-Bench prompts (the evaluation split, one per
    task family) when a question file is found: --prompt-file, $MIRROR_RT_SPEC_BENCH, or the
    shared dev half. Otherwise, or with --builtin-prompts, the built-in prompts."""
    import os

    from mirror_rt.default import DEMO_PROMPTS
    from mirror_rt.specbench import load_questions
    from mirror_rt.prompts import SPEC_BENCH_DEFAULT, SPEC_BENCH_ENV

    path = args.prompt_file or os.environ.get(SPEC_BENCH_ENV) or SPEC_BENCH_DEFAULT
    if args.prompt_file and not os.path.isfile(args.prompt_file):
        raise FileNotFoundError(f"--prompt-file {args.prompt_file!r} not found")
    if args.builtin_prompts or not os.path.isfile(path):
        prompts, source = list(DEMO_PROMPTS), "built-in prompts"
    else:
        questions = load_questions(path, limit=1, split="eval")
        prompts = [q["turns"][0] for q in questions]
        source = f"held-out Spec-Bench prompts (evaluation split, 1 per task family, {path})"
    return (prompts[: args.prompts] if args.prompts else prompts), source


def run_demo(args, load_pair, make_decoder):
    """The demo from parsed ``mirror-rt demo`` arguments. ``load_pair(args)`` -> (target, draft,
    tokenizer, draft label) and ``make_decoder(name, target, draft, args)`` -> a decoder come from
    the CLI, which owns the arguments they read (so this module never imports the CLI).
    Returns {decoder name: [GenerationOutput per prompt]}."""
    from mirror_rt.tokenizer import encode_chat

    args.window = args.window or defaults.WINDOW
    args.kappa = args.kappa or defaults.KAPPA
    args.fallback = args.fallback or defaults.FALLBACK
    args.min_branch_prob = defaults.MIN_BRANCH_PROB if args.min_branch_prob is None else args.min_branch_prob
    if args.lane == "auto" and args.device == "cpu":
        args.lane = defaults.CLI_CPU_LANE
    t0 = time.perf_counter()
    target, draft, tok, label = load_pair(args)
    load_s = time.perf_counter() - t0
    texts, source = demo_prompts(args)
    prompts = [encode_chat(tok, p, target.device) for p in texts]
    linears = linear_note(target)
    if "MB in memory" not in linears:
        from mirror_rt.models.quant import weight_bytes

        linears += f"; weights {weight_bytes(target) / 1e6:.1f} MB in memory"
    decoders = {name: make_decoder(name, target, draft, args) for name in DECODERS}
    results = {name: [] for name in DECODERS}
    first, t_gen = [], time.perf_counter()  # AR's warm-up (the first) gives the time to first token
    for name, dec in decoders.items():
        dec.generate(prompts[0], 4, eos_token_id=tok.eos_token_id,  # warm-up, not timed
                     stream=lambda new: first or first.append(time.perf_counter()))
    # Interleaved (each prompt on every decoder in turn) so that a change in machine load hits
    # all decoders alike instead of whichever happened to run then.
    for ids in tqdm(prompts, desc="prompts x decoders", unit="prompt", file=sys.stderr):
        for name, dec in decoders.items():
            results[name].append(dec.generate(ids, args.max_new_tokens, eos_token_id=tok.eos_token_id))
    threads, sharing = threads_note(decoders["mirror"]), core_sharing_note(decoders["mirror"])
    for dec in decoders.values():
        if hasattr(dec, "close"):
            dec.close()
    print(f"\nmirror-rt demo: target {getattr(target, 'name', target.config.arch)} "
          f"({target.config.num_layers} layers), draft: {label}")
    print(f"{len(prompts)} {source}, greedy, max {args.max_new_tokens} new tokens, window {args.window}, "
          f"kappa {args.kappa}, Mirror branches {args.branch_policy} (floor {args.min_branch_prob}), fallback "
          f"{args.fallback}, exit layer {decoders['mirror'].config.exit_layer} "
          f"({'trained exit head' if decoders['mirror'].config.trained_exit else 'logit lens'}), "
          f"lane {args.lane}, {threads}, context lookup "
          f"{f'up to {args.lookup}-grams' if args.lookup else 'off'}")
    print(linears)
    print(f"start: loaded in {load_s:.2f} s; first token {first[0] - t_gen:.2f} s after generate started "
          f"({DECODERS[0]}'s warm-up)")
    print(format_table(results))
    print("\nlatency law (DESIGN.md §1, with the fallback term) fed by the measured phases, per step:")
    from mirror_rt.planner import plan_report

    for outs in results.values():
        print(" " + format_prediction(predict_from_stats([o.stats for o in outs])))
        for line in plan_report([o.stats for o in outs]):  # the planner's decisions (plan="auto")
            print(" " + line)
    if sharing:
        print(sharing)
    return results


def summarize(outputs) -> dict:
    tokens = sum(o.stats["new_tokens"] for o in outputs)
    wall = sum(o.stats["wall_s"] for o in outputs)
    steps = sum(o.stats["steps"] for o in outputs)
    accepted = sum(o.stats["mean_accepted"] * o.stats["steps"] for o in outputs)
    windows = steps - sum(o.stats.get("empty_steps", 0) for o in outputs)  # steps that verified a window
    row = {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall if wall else 0.0,
           "mean_accepted": accepted / windows if windows else 0.0}
    if "lookup_windows" in outputs[0].stats:  # windows copied from the context (decoders/lookup.py)
        row["lookup"] = sum(o.stats["lookup_windows"] for o in outputs) / steps
    if "reuse_hits" in outputs[0].stats:
        row["reuse"] = sum(o.stats["reuse_hits"] for o in outputs) / steps
        row["fallback"] = sum(o.stats["fallbacks"] for o in outputs) / steps
        spans = [o.stats["overlap_fraction"] for o in outputs]
        row["overlap"] = sum(spans) / len(spans)
    return row


def format_table(results: dict) -> str:
    base = summarize(results["ar"])
    ref = [o.tokens.tolist() for o in results["ar"]]
    head = f"{'decoder':>8} {'tokens':>7} {'tok/s':>8} {'speedup':>8} {'accepted':>9} {'reuse':>6} " \
           f"{'fallback':>9} {'lookup':>7} {'overlap':>8} {'==AR':>5}"
    lines = [head, "-" * len(head)]
    for name, outs in results.items():
        r = summarize(outs)
        same = all(o.tokens.tolist() == t for o, t in zip(outs, ref))
        pct = (lambda k: f"{r[k]:.0%}" if k in r else "-")
        lines.append(f"{name:>8} {r['tokens']:>7} {r['tok_s']:>8.2f} {r['tok_s'] / base['tok_s']:>7.2f}x "
                     f"{r['mean_accepted']:>9.2f} {pct('reuse'):>6} {pct('fallback'):>9} {pct('lookup'):>7} "
                     f"{pct('overlap'):>8} "
                     f"{'yes' if same else 'NO':>5}")
    return "\n".join(lines)
