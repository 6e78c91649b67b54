"""Writers for a Spec-Bench run: Spec-Bench model_answer jsonl, CSV, PNG bar chart, text table.

The jsonl follows hemingkx/Spec-Bench ``evaluation/eval.py`` (one line per question):
    {"question_id", "category", "answer_id", "model_id",
     "choices": [{"index", "turns", "decoding_steps", "new_tokens", "wall_time", "accept_lengths"}],
     "tstamp"}
so its ``evaluation/speed.py --file-path <decoder>.jsonl --base-path <ar>.jsonl`` reads them.
accept_lengths holds tokens committed per step (accepted + 1), as Spec-Bench's drafters report;
our stats keep a histogram, not the step order, so the list is the histogram expanded in order of
length (its mean, the only thing speed.py uses, is exact).
"""
from __future__ import annotations

import csv
import json
import os
import time
import uuid

CSV_FIELDS = ("family", "decoder", "prompts", "tokens", "wall_s", "tok_s", "speedup", "mean_accepted",
              "tokens_per_step", "reuse_rate", "fallback_rate", "lookup_rate", "overlap", "equal_ar", "pred_tok_s",
              "explained")


def accept_lengths(stats: dict) -> list[int]:
    """Tokens committed per step (accepted + 1) from the accepted-length histogram."""
    return [int(a) + 1 for a, n in sorted(stats.get("accepted_hist", {}).items(), key=lambda kv: int(kv[0]))
            for _ in range(n)]


def write_answers(result: dict, out_dir: str, model_id: str, decode) -> dict:
    """One Spec-Bench answer file per decoder: <out_dir>/<model_id>-<decoder>.jsonl.
    decode: list[int] -> text. Returns {decoder: path}."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for name, records in result["runs"].items():
        path = os.path.join(out_dir, f"{model_id}-{name}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for (q, _), rec in zip(result["prompts"], records):
                s = rec["stats"]
                choice = {"index": 0, "turns": [decode(rec["tokens"])], "decoding_steps": [int(s["steps"])],
                          "new_tokens": [len(rec["tokens"])], "wall_time": [rec["wall_time"]],
                          "accept_lengths": accept_lengths(s)}
                f.write(json.dumps({"question_id": q["question_id"], "category": q["category"],
                                    "answer_id": uuid.uuid4().hex[:22], "model_id": f"{model_id}-{name}",
                                    "choices": [choice], "tstamp": time.time()}) + "\n")
        paths[name] = path
    return paths


def write_csv(rows: list[dict], path: str, stamp: dict | None = None) -> str:
    """rows from mirror_rt.specbench.summarize; stamp: extra columns on every row (device, commit, ...)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    stamp = stamp or {}
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(CSV_FIELDS) + list(stamp))
        w.writeheader()
        for r in rows:
            w.writerow({**r, **stamp})
    return path


def plot_speedups(rows: list[dict], path: str, title: str = "", baseline: str = "ar") -> str:
    """Grouped bars: speedup over the baseline per task family, one bar per non-baseline decoder."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on benchmark machines
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(r["family"] for r in rows))
    decoders = [d for d in dict.fromkeys(r["decoder"] for r in rows) if d != baseline]
    value = {(r["family"], r["decoder"]): (r["speedup"] or 0.0) for r in rows}
    width = 0.8 / max(len(decoders), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(families)), 4.0))
    for k, dec in enumerate(decoders):
        xs = [i + (k - (len(decoders) - 1) / 2) * width for i in range(len(families))]
        ys = [value.get((f, dec), 0.0) for f in families]
        bars = ax.bar(xs, ys, width, label=dec)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(families)), families, rotation=20)
    ax.set_ylabel("speedup over autoregressive (same run)")
    ax.set_title(title or "Spec-Bench speedup per task family")
    if decoders:
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_table(rows: list[dict]) -> str:
    """The summary as a fixed-width text table (blank cells: not applicable)."""
    cols = [("family", "family", 14), ("decoder", "decoder", 8), ("prompts", "n", 3), ("tokens", "tokens", 6),
            ("tok_s", "tok/s", 8), ("speedup", "speedup", 7), ("mean_accepted", "acc", 5),
            ("reuse_rate", "reuse", 5), ("fallback_rate", "fallbk", 6), ("lookup_rate", "lookup", 6),
            ("overlap", "ovlap", 5),
            ("equal_ar", "==AR", 5), ("pred_tok_s", "law tok/s", 9), ("explained", "expl", 5)]

    def cell(v):
        if isinstance(v, bool):
            return "yes" if v else "NO"
        if isinstance(v, float):
            return f"{v:.2f}"
        return str(v)

    lines = ["  ".join(h.rjust(w) for _, h, w in cols)]
    lines.append("-" * len(lines[0]))
    for r in rows:
        lines.append("  ".join(cell(r.get(k, "")).rjust(w) for k, _, w in cols))
    return "\n".join(lines)
