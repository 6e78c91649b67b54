"""``mirror-rt probe``: how well the target's early exits predict its final tokens.

For prompts (Spec-Bench ``question.jsonl``: ``turns[0]``), the target answers greedily; then,
teacher-forced over prompt + answer, at every position that predicts an answer token:

* containment(layer, kappa): the final argmax lies in the exit top-kappa at that layer;
* Omega_kappa(layer): the final distribution's mass inside the exit top-kappa;
* the same for trained exit heads (``--exit-head``, rows ``adapter@L``) next to the logit lens;
* with ``--draft``: the same again **only at positions where the draft was rejected** in a greedy
  vanilla-SD simulation (window ``--window``): the corrections that Mirror-SD's reuse must catch.

Prints a table, writes CSV and a PNG heat map (layer x kappa). Used to choose exit_layer, top_k.
``run_probe`` is the library entry point; ``ProbeResult.rows`` holds the numbers.
"""
from __future__ import annotations

import csv
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

KAPPAS = (1, 2, 4, 8, 16)


@dataclass
class ProbeResult:
    kappas: tuple
    # rows[name][subset] = {"contain": {k: frac}, "omega": {k: mean}, "n": count}; subset "all"|"rejected"
    rows: dict = field(default_factory=dict)
    layers: list = field(default_factory=list)  # names that are plain logit-lens layers, in order
    sd: dict | None = None                      # draft SD simulation summary

    def add(self, name, subset, hit: torch.Tensor, omega: torch.Tensor):
        """hit [P, K] bool, omega [P, K] float for P positions."""
        r = self.rows.setdefault(name, {}).setdefault(subset, {"hit": torch.zeros(len(self.kappas)),
                                                               "omega": torch.zeros(len(self.kappas)), "n": 0})
        r["hit"] += hit.float().sum(0).cpu()
        r["omega"] += omega.float().sum(0).cpu()
        r["n"] += hit.shape[0]

    def value(self, name, subset, kappa, what="contain") -> float:
        r = self.rows[name][subset]
        i = self.kappas.index(kappa)
        return float(r["hit" if what == "contain" else "omega"][i]) / max(r["n"], 1)


def load_draft(spec: str, target):
    """A draft from 'truncated:N', a StreamingDraft .safetensors file, or a model path."""
    if spec.startswith("truncated:"):
        from mirror_rt.models.derive import truncated_copy
        return truncated_copy(target, int(spec.split(":", 1)[1]))
    if spec.endswith(".safetensors"):
        from mirror_rt.models.streaming import load_streaming_draft
        return load_streaming_draft(spec, target)
    from mirror_rt.models import load_model
    return load_model(spec, device=target.device, dtype=target.dtype)


def _measure(logits: torch.Tensor, final: torch.Tensor, kappas):
    """logits, final [P, V] -> hit [P, K] bool, omega [P, K]."""
    f = final.argmax(-1)
    p = F.softmax(final.float(), -1)
    top = torch.topk(logits.float(), max(kappas), -1).indices
    hits, omegas = [], []
    for k in kappas:
        tk = top[:, :k]
        hits.append((tk == f[:, None]).any(-1))
        omegas.append(p.gather(-1, tk).sum(-1))
    return torch.stack(hits, -1), torch.stack(omegas, -1)


@torch.inference_mode()
def run_probe(target, prompts: list[list[int]], answers: list[list[int]], layers=None, kappas=KAPPAS,
              exit_heads=(), draft=None, window: int = 7) -> ProbeResult:
    """The probe over given prompts and the target's greedy answers to them (see module doc).
    layers: exit layers to report (default 1..N-1); exit_heads: ExitHead objects (``.exit_layer``)."""
    from mirror_rt.answers import simulate_sd, teacher_forward

    N = target.num_layers
    layers = list(layers) if layers else list(range(1, N))
    kappas = tuple(sorted(kappas))
    res = ProbeResult(kappas, layers=[f"layer {l}" for l in layers])
    need = sorted(set(layers) | {h.exit_layer for h in exit_heads})
    hist, passes = {}, 0
    for prompt, answer in zip(prompts, answers):
        if not answer:
            continue
        ids = torch.tensor([prompt + answer], device=target.device)
        hiddens, final = teacher_forward(target, ids, need)
        sel = slice(len(prompt) - 1, len(prompt) - 1 + len(answer))  # positions predicting answer tokens
        final = final[0, sel]
        rejected = None
        if draft is not None:
            steps, n = simulate_sd(draft, prompt, answer, window)
            passes += n
            for _, a in steps:
                hist[a] = hist.get(a, 0) + 1
            rejected = torch.tensor([p + a for p, a in steps if a < window and p + a < len(answer)],
                                    dtype=torch.long, device=final.device)
        rows = [(f"layer {l}", target.head(hiddens[l][:, sel])[0]) for l in layers]
        rows += [(f"adapter@{h.exit_layer}", h(hiddens[h.exit_layer][:, sel])[0]) for h in exit_heads]
        for name, logits in rows:
            hit, omega = _measure(logits, final, kappas)
            res.add(name, "all", hit, omega)
            if rejected is not None:
                res.add(name, "rejected", hit[rejected], omega[rejected])
    if draft is not None:
        steps = sum(hist.values())
        res.sd = {"window": window, "steps": steps, "mean_accepted": sum(k * v for k, v in hist.items()) / max(steps, 1),
                  "passes_per_window": passes / max(steps, 1)}
    return res


def format_table(res: ProbeResult, names=None) -> str:
    names = names or list(res.rows)
    subsets = ["all"] + (["rejected"] if any("rejected" in res.rows[n] for n in names) else [])
    head = f"{'exit':>12} {'positions':>9} " + " ".join(f"{'top-' + str(k):>7}" for k in res.kappas) + \
        "  " + " ".join(f"{'Om-' + str(k):>6}" for k in res.kappas)
    out = []
    for subset in subsets:
        label = "all answer positions" if subset == "all" else \
            f"only where the draft was rejected (greedy SD, window {res.sd['window']})"
        out += [f"containment of the final greedy token in the exit top-kappa, and Omega_kappa: {label}", head,
                "-" * len(head)]
        for n in names:
            if subset not in res.rows[n]:
                continue
            r = res.rows[n][subset]
            out.append(f"{n:>12} {r['n']:>9} " + " ".join(f"{res.value(n, subset, k):>7.1%}" for k in res.kappas) +
                       "  " + " ".join(f"{res.value(n, subset, k, 'omega'):>6.1%}" for k in res.kappas))
        out.append("")
    if res.sd:
        out.append(f"draft greedy SD simulation: window {res.sd['window']}, {res.sd['steps']} steps, "
                   f"mean accepted {res.sd['mean_accepted']:.2f}, draft passes per window {res.sd['passes_per_window']:.2f}")
    return "\n".join(out)


def write_csv(res: ProbeResult, path: str):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["exit", "subset", "kappa", "containment", "omega", "positions"])
        for name, subs in res.rows.items():
            for subset, r in subs.items():
                for k in res.kappas:
                    w.writerow([name, subset, k, f"{res.value(name, subset, k):.6f}",
                                f"{res.value(name, subset, k, 'omega'):.6f}", r["n"]])


def write_png(res: ProbeResult, path: str, title: str = ""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res.rows)
    subsets = ["all"] + (["rejected"] if any("rejected" in res.rows[n] for n in names) else [])
    fig, axes = plt.subplots(1, len(subsets), figsize=(4.5 * len(subsets), 0.25 * len(names) + 1.8), squeeze=False)
    for ax, subset in zip(axes[0], subsets):
        rows = [n for n in names if subset in res.rows[n]]
        grid = torch.tensor([[res.value(n, subset, k) for k in res.kappas] for n in rows])
        im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(len(res.kappas)), [str(k) for k in res.kappas])
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        ax.set_xlabel("kappa")
        ax.set_title(("containment, " + ("all positions" if subset == "all" else "draft rejected")), fontsize=9)
        for i in range(len(rows)):
            for j in range(len(res.kappas)):
                ax.text(j, i, f"{grid[i, j]:.0%}", ha="center", va="center", fontsize=6,
                        color="white" if grid[i, j] < 0.6 else "black")
        fig.colorbar(im, ax=ax, fraction=0.05)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ints(text):
    return [int(x) for x in text.split(",") if x.strip()]


def cmd_probe(args):
    import json

    from mirror_rt import prompts as D
    from mirror_rt.answers import generate_answers
    from mirror_rt.exit_head import load_exit_head
    from mirror_rt.models import load_model
    from mirror_rt.tokenizer import encode_chat, load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.target:
        path = args.target
    else:
        from mirror_rt.default import default_target_path
        path = default_target_path()
    print(f"loading target {path} ...", file=sys.stderr)
    target = load_model(path, device=args.device)
    if not args.target:
        from mirror_rt.default import DEFAULT_TARGET_NAME
        target.name = DEFAULT_TARGET_NAME
    tok = load_tokenizer(path)
    if args.prompt_file and args.split == "all":
        with open(args.prompt_file) as f:
            texts = [json.loads(line)["turns"][0] for line in f if line.strip()]
    else:
        qs = D.eval_questions(args.prompt_file) if args.split == "eval" else \
            D.train_questions(args.prompt_file) if args.split == "train" else D.load_questions(args.prompt_file)
        texts = D.first_turns(qs)
    texts = D.spread(texts, args.prompts)
    if not texts:
        raise ValueError("no prompts to probe")
    prompts = [encode_chat(tok, t)[0].tolist() for t in texts]
    eos = tok.eos_token_id
    answers = generate_answers(target, prompts, args.max_new_tokens, [eos] if eos is not None else [], use_hf=False)
    heads = [load_exit_head(p, target) for p in (args.exit_head or [])]
    draft = load_draft(args.draft, target) if args.draft else None
    layers = list(range(1, target.num_layers)) if args.layers == "all" else _ints(args.layers)
    res = run_probe(target, prompts, answers, layers, tuple(_ints(args.kappas)), heads, draft, args.window)
    title = f"{getattr(target, 'name', path)}: {len(prompts)} {args.split} prompts, {sum(map(len, answers))} tokens"
    print(title)
    print(format_table(res))
    if args.csv:
        write_csv(res, args.csv)
        print(f"wrote {args.csv}", file=sys.stderr)
    if args.png:
        write_png(res, args.png, title)
        print(f"wrote {args.png}", file=sys.stderr)
    return res


def register(sub):
    p = sub.add_parser("probe", help="early-exit containment per layer and kappa (choose exit_layer, top_k)")
    p.add_argument("--target", help="target checkpoint dir or .gguf (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--draft", help="also report at draft-rejection positions: truncated:N, a draft .safetensors, "
                                   "or a model path")
    p.add_argument("--exit-head", action="append", help="trained exit head file (repeatable)")
    p.add_argument("--prompt-file", help="Spec-Bench question.jsonl (default: the shared dev half)")
    p.add_argument("--split", default="eval", choices=["eval", "train", "all"],
                   help="which prompts (mirror_rt.prompts split; default: the held-out eval half)")
    p.add_argument("--prompts", type=int, default=8, help="how many, taken evenly across the file's families")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--layers", default="all", help="'all' or a comma list")
    p.add_argument("--kappas", default=",".join(map(str, KAPPAS)))
    p.add_argument("--window", type=int, default=7)
    p.add_argument("--csv", default="probe.csv")
    p.add_argument("--png", default="probe.png")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_probe)
