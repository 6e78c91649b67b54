"""Spec-Bench runner core: every decoder over the same prompts, summarized per task family.

Model-free on purpose: it takes already-built decoders and an ``encode(text) -> [1, L] ids``
callable, so tests drive it with tiny random models and a fake tokenizer. The command line
(``mirror-rt bench``, ``bench/specbench.py``) lives in ``mirror_rt.bench_cli``; the writers of the
jsonl / CSV / PNG in ``mirror_rt.specbench_report``.

Task families follow Spec-Bench's own ``evaluation/speed.py``: the eight MT-bench categories count
as one family, ``mt_bench``; the others (translation, summarization, qa, math_reasoning, rag) are
families of their own. Only the first turn of each question is generated (single-turn).
"""
from __future__ import annotations

import json
import sys
import time

from mirror_rt.sim import predict_from_stats

MT_BENCH = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
FAMILIES = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")


def task_family(category: str) -> str:
    return "mt_bench" if category in MT_BENCH else category


def load_questions(path, categories=None, limit: int | None = None, split: str = "all") -> list[dict]:
    """Questions from a Spec-Bench question.jsonl (fields question_id, category, turns).
    categories: names of families (mt_bench, qa, ...) or raw categories (writing, ...) to keep.
    limit: at most this many prompts per task family, in file order (None: all).
    split: "eval" keeps only the questions our training never saw (mirror_rt.prompts' split),
    "train" the others, "all" every question."""
    from mirror_rt.prompts import is_eval_question

    if split not in ("eval", "train", "all"):
        raise ValueError(f"split must be 'eval', 'train' or 'all', got {split!r}")
    wanted = set(categories) if categories else None
    kept, per_family = [], {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            q = json.loads(line)
            if not {"question_id", "category", "turns"} <= q.keys() or not q["turns"]:
                raise ValueError(f"{path}:{n}: a Spec-Bench question needs question_id, category and turns")
            if split != "all" and is_eval_question(q["question_id"]) != (split == "eval"):
                continue
            fam = task_family(q["category"])
            if wanted and fam not in wanted and q["category"] not in wanted:
                continue
            if limit is not None and per_family.get(fam, 0) >= limit:
                continue
            per_family[fam] = per_family.get(fam, 0) + 1
            kept.append(q)
    if not kept:
        raise ValueError(f"no questions left in {path} (categories={categories}, limit={limit})")
    return kept


def window_slack(decoder) -> int:
    """KV slack a decoder needs past prompt + max_new_tokens (window + 1; 1 for AR)."""
    window = getattr(decoder, "window", None) or getattr(getattr(decoder, "config", None), "window", 0)
    return int(window or 0) + 1


def run_specbench(questions, encode, decoders: dict, *, context: int, max_new_tokens: int, temperature=0.0,
                  seed=0, eos_token_id=None, warmup: int = 1, progress: bool = True) -> dict:
    """Run every decoder over every question's first turn.

    questions: dicts with question_id, category, turns. encode: text -> LongTensor [1, L].
    decoders: {name: decoder with .generate(...)}; each prompt runs on all of them, in this order,
    before the next prompt (warm-ups first, untimed). context: the
    models' context length; prompts with L + max_new_tokens + window slack beyond it are skipped
    with a warning. warmup: untimed generations per decoder (first prompt, up to 8 tokens; a decoder
    with ``warm_up``, the auto decoder, measures its decoders there instead).
    Returns {"prompts": [(question, ids)], "skipped": [question_id], "runs": {name: [record]}}
    where record = {"tokens": list[int], "stats": dict, "wall_time": float seconds}."""
    from tqdm.auto import tqdm

    slack = max((window_slack(d) for d in decoders.values()), default=1)
    prompts, skipped = [], []
    for q in questions:
        ids = encode(q["turns"][0])
        if ids.shape[-1] + max_new_tokens + slack > context:
            print(f"warning: skipping question {q['question_id']} ({q['category']}): {ids.shape[-1]} prompt tokens "
                  f"+ {max_new_tokens} new + {slack} slack exceed the context of {context}", file=sys.stderr)
            skipped.append(q["question_id"])
            continue
        prompts.append((q, ids))
    if not prompts:
        raise ValueError("every prompt was skipped: none fits the context with max_new_tokens")
    gen = dict(eos_token_id=eos_token_id, temperature=temperature, seed=seed)
    for dec in decoders.values():
        for _ in range(warmup):  # first calls pay for allocation, lane start-up, kernel caches
            if hasattr(dec, "warm_up"):  # the auto decoder measures its three decoders
                dec.warm_up(prompts[0][1], temperature=temperature, seed=seed)
            else:
                dec.generate(prompts[0][1], min(8, max_new_tokens), **gen)
    # Interleaved: each prompt runs on every decoder before the next prompt, so a load change on a
    # shared machine hits all decoders alike instead of skewing whichever decoder ran during it.
    runs = {name: [] for name in decoders}
    bars = {name: tqdm(total=len(prompts), desc=f"{name:>8}", unit="prompt", file=sys.stderr, position=k,
                       disable=not progress) for k, name in enumerate(decoders)}
    for q, ids in prompts:
        for name, dec in decoders.items():
            t0 = time.perf_counter()
            out = dec.generate(ids, max_new_tokens, **gen)
            wall = time.perf_counter() - t0
            runs[name].append({"tokens": out.tokens[0].tolist(), "stats": out.stats, "wall_time": wall})
            bars[name].update(1)
    for bar in bars.values():
        bar.close()
    return {"prompts": prompts, "skipped": skipped, "runs": runs}


def _row(family, name, recs, base, greedy):
    """One summary row for a decoder's records in a family (base: the AR records, same prompts)."""
    stats = [r["stats"] for r in recs]
    tokens = sum(len(r["tokens"]) for r in recs)
    wall = sum(r["wall_time"] for r in recs)
    steps = sum(s["steps"] for s in stats)
    tok_s = tokens / wall if wall > 0 else 0.0
    row = {"family": family, "decoder": name, "prompts": len(recs), "tokens": tokens, "wall_s": round(wall, 4),
           "tok_s": round(tok_s, 3), "speedup": "", "mean_accepted": "", "tokens_per_step": "",
           "reuse_rate": "", "fallback_rate": "", "lookup_rate": "", "overlap": "", "equal_ar": "n/a",
           "pred_tok_s": "", "explained": ""}
    if steps:
        row["mean_accepted"] = round(sum(s.get("mean_accepted", 0.0) * s["steps"] for s in stats) / steps, 3)
        row["tokens_per_step"] = round(sum(s["new_tokens"] for s in stats) / steps, 3)
    # The auto decoder's stats are those of the decoder it chose, which can change between prompts.
    if any("lookup_windows" in s for s in stats) and steps:  # windows copied from the context
        row["lookup_rate"] = round(sum(s.get("lookup_windows", 0) for s in stats) / steps, 3)
    if any("reuse_hits" in s for s in stats) and steps:
        row["reuse_rate"] = round(sum(s.get("reuse_hits", 0) for s in stats) / steps, 3)
        row["fallback_rate"] = round(sum(s.get("fallbacks", 0) for s in stats) / steps, 3)
        row["overlap"] = round(sum(s.get("overlap_fraction", 0.0) for s in stats) / len(stats), 3)
    if base is not None:
        b_tok, b_wall = sum(len(r["tokens"]) for r in base), sum(r["wall_time"] for r in base)
        if b_wall > 0 and b_tok:
            row["speedup"] = round(tok_s / (b_tok / b_wall), 3)
        if greedy:
            row["equal_ar"] = all(r["tokens"] == b["tokens"] for r, b in zip(recs, base))
    try:
        pred = predict_from_stats(stats)
        row["pred_tok_s"], row["explained"] = round(pred["pred_tok_s"], 3), round(pred["explained"], 3)
    except (ValueError, KeyError):
        pass  # a decoder without steps or phase times: nothing to predict
    return row


def summarize(result: dict, greedy: bool, baseline: str = "ar") -> list[dict]:
    """Rows per (task family, decoder), families in Spec-Bench order, then "overall".
    tok_s = tokens / wall time summed over the family's prompts; speedup = tok_s / the baseline's
    tok_s on the same prompts in the same run; equal_ar (greedy only): every output equals the
    baseline's token for token; pred_tok_s: mirror_rt.sim's law from the measured phase times."""
    fam_of = [task_family(q["category"]) for q, _ in result["prompts"]]
    present = [f for f in FAMILIES if f in fam_of] + sorted({f for f in fam_of if f not in FAMILIES})
    rows = []
    for family in present + ["overall"]:
        idx = [i for i, f in enumerate(fam_of) if family in ("overall", f)]
        base_all = result["runs"].get(baseline)
        base = [base_all[i] for i in idx] if base_all is not None else None
        for name, recs in result["runs"].items():
            rows.append(_row(family, name, [recs[i] for i in idx], base, greedy))
    return rows
