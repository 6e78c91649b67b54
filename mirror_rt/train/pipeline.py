"""End to end: prompts -> the target's greedy answers -> exit heads + SS draft -> files + metrics.

Used by ``mirror-rt train-exit`` / ``train-draft`` (one part each), by the one-shot GPU run
(``python -m mirror_rt.train.gpu_train``) and by the CPU fallback (``--preset cpu``). Every
phase is seeded, resumable through files in ``work_dir`` and capped in time.

Data never includes an evaluation prompt: training prompts are ``data.training_prompts``
(train-allowed Spec-Bench + templates) and prompts the target writes itself (``self_prompts``,
evaluation prompts excluded); evaluation uses ``data.eval_questions``.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field

import torch

from mirror_rt import prompts as Q
from mirror_rt.train import data as D
from mirror_rt.train.common import seed_everything, write_json


@dataclass(slots=True)
class PipelineConfig:
    n_templates: int = 1000          # distinct template prompts on top of the train-allowed Spec-Bench ones
    n_self_prompts: int = 4000       # user prompts the target writes itself (self_prompts.py): the varied part
    self_prompt_tokens: int = 96     # longest user turn sampled
    self_prompt_time: float | None = 40.0  # seconds for sampling them at most
    n_eval: int = 40                 # held-out Spec-Bench prompts used for the metrics
    max_new_tokens: int = 256        # target answer length (training and eval)
    gen_batch: int = 512             # H200: 4.3k answer tokens/s at 512 vs 3.0k at 192 (bench/RESULTS.md)
    gen_time: float | None = 200.0   # seconds for the training answers at most (shortest prompts first);
    # more of the budget goes to data than to steps: the first draft overfit its 199k tokens
    # (top-1 agreement 47% on training prompts, 23% on held-out ones, bench/RESULTS.md) and the
    # second its 537k (6.65 tokens accepted on training prompts, 0.38 on held-out ones, ~24 epochs)
    max_len: int = 512               # training sequence cap (prompt + answer)
    exit_layers: list = field(default_factory=lambda: [15, 10, 20])  # first one is shipped
    exit_rank: int = 256
    exit_act: str = "silu"
    exit_steps: int = 3000
    exit_batch_tokens: int = 4096
    exit_lr: float = 2e-3
    exit_time: float = 40.0
    draft_layers: int = 4
    draft_intermediate: int | None = None
    n_streams: int = 3
    stream_layers: int = 1
    draft_vocab: int = 8192
    draft_init: str = "first"
    draft_steps: int = 4000
    draft_batch: int = 32
    draft_lr: float = 1e-3
    draft_kd: float = 1.0
    draft_time: float = 60.0
    draft_epochs: float | None = 6.0  # at most this many passes over the training answers
    draft_val: int = 64              # training prompts held out to pick the draft's best step (never eval prompts)
    draft_val_every: int = 50        # steps between the held-out agreement checks
    draft_export_quant: str | None = None  # "q8_0" / "q4_0": draft.safetensors holds its linears as GGUF blocks
    eval_window: int = 7
    eval_sd_prompts: int = 16
    seed: int = 0
    device: str | None = None
    dtype: str = "float32"           # target dtype for generation / teacher (float32 matches CPU greedy)

    @classmethod
    def preset(cls, name: str, **overrides):
        presets = {
            "gpu": {},
            "cpu": dict(n_templates=40, n_self_prompts=24, self_prompt_time=300, n_eval=12, max_new_tokens=96,
                        gen_batch=16, gen_time=900, max_len=256,
                        exit_layers=[15], exit_steps=300, exit_batch_tokens=256, exit_time=240,
                        draft_layers=2, draft_vocab=4096, draft_steps=400, draft_batch=4, draft_kd=0.0,
                        draft_time=480, draft_val=4, eval_sd_prompts=6),
            "tiny": dict(n_templates=8, n_self_prompts=4, self_prompt_tokens=8, n_eval=4, max_new_tokens=16, gen_batch=4,
                         gen_time=None, max_len=96, exit_layers=[2],
                         exit_rank=8, exit_steps=20, exit_batch_tokens=64, draft_layers=1, draft_vocab=0,
                         draft_steps=10, draft_batch=4, draft_kd=0.5, draft_val=2, draft_val_every=5,
                         eval_sd_prompts=2, eval_window=3),
        }
        if name not in presets:
            raise ValueError(f"preset must be one of {sorted(presets)}, got {name!r}")
        kw = presets[name]
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)


def encode_prompts(tokenizer, texts: list[str]) -> list[list[int]]:
    from mirror_rt.tokenizer import encode_chat
    return [encode_chat(tokenizer, t)[0].tolist() for t in texts]


def prepare_prompts(tokenizer, cfg: PipelineConfig, spec_bench: str | None = None) -> dict:
    """Token ids of the training prompts and the held-out evaluation prompts (chat template),
    plus the EOS ids and the chat frame for self-written prompts: everything the GPU run needs, so
    it needs no tokenizer."""
    from mirror_rt.train.self_prompts import chat_frame

    train_texts = D.training_prompts(cfg.n_templates, cfg.seed, spec_bench)
    evals = Q.eval_questions(spec_bench)
    evals = Q.spread(evals, cfg.n_eval)
    eos = tokenizer.eos_token_id
    return {"train": encode_prompts(tokenizer, train_texts),
            "eval": encode_prompts(tokenizer, Q.first_turns(evals)),
            "eval_ids": [q["question_id"] for q in evals],
            "eos": [int(eos)] if eos is not None else [],
            "frame": chat_frame(tokenizer),
            "split": "eval = Spec-Bench question_id with (id // 2) % 2 == 0; "
                     "train = the rest + templates + the target's own prompts"}


def self_prompts_file(work_dir: str) -> str:
    return os.path.join(work_dir, "self_prompts.json")


def add_self_prompts(target, prompts: dict, cfg: PipelineConfig, work_dir: str, log=print) -> int:
    """Append cfg.n_self_prompts prompts written by the target (self_prompts.py) to prompts["train"],
    sampled once and cached in work_dir/self_prompts.json. Returns how many were added (0 without
    a chat frame: a target with no chat template)."""
    from mirror_rt.train.self_prompts import sample_self_prompts

    frame = prompts.get("frame")
    if not cfg.n_self_prompts or not frame:
        return 0
    path = self_prompts_file(work_dir)
    key = {"n": cfg.n_self_prompts, "seed": cfg.seed, "max_tokens": cfg.self_prompt_tokens, "frame": frame}
    cached = json.load(open(path)) if os.path.isfile(path) else {}
    if cached.get("key") == key:
        extra = cached["prompts"]
        log(f"[data] reusing {len(extra)} self-written prompts from {path}")
    else:
        t0 = time.perf_counter()
        extra = sample_self_prompts(target, frame, cfg.n_self_prompts, cfg.self_prompt_tokens,
                                    batch_size=4 * cfg.gen_batch, seed=cfg.seed, time_limit=cfg.self_prompt_time,
                                    exclude=prompts["eval"])
        write_json(path, {"key": key, "prompts": extra})
        log(f"[data] the target wrote {len(extra)} distinct prompts in {time.perf_counter() - t0:.0f}s")
    prompts["train"] = prompts["train"] + extra
    return len(extra)


def answers_file(work_dir: str) -> str:
    return os.path.join(work_dir, "answers.json")


def _cached_answers(path: str, prompts: dict, max_new_tokens: int) -> tuple[dict, dict, dict]:
    """What an earlier answers.json holds, keyed by prompt: (train {prompt: answer}, eval {prompt:
    answer}, the file's counters). Files list the prompts they answer ("train_prompts"); one from
    before that is read only when it matches this prompt list one to one."""
    if not os.path.isfile(path):
        return {}, {}, {}
    with open(path) as f:
        cached = json.load(f)
    if cached.get("max_new_tokens") != max_new_tokens:
        return {}, {}, {}
    counters = {k: cached.get(k, 0) for k in ("gen_s", "gen_tokens")}
    tp, ep = cached.get("train_prompts"), cached.get("eval_prompts")
    if tp is None:
        if len(cached["train"]) != len(prompts["train"]):
            return {}, {}, {}
        tp, ep = prompts["train"], prompts["eval"]
    train = {tuple(p): a for p, a in zip(tp, cached["train"]) if a is not None}
    evals = {tuple(p): a for p, a in zip(ep or [], cached.get("eval", [])) if a is not None}
    return train, evals, counters


def get_answers(target, prompts: dict, cfg: PipelineConfig, work_dir: str, log=print) -> dict:
    """The target's greedy answers for prompts["train"] and prompts["eval"], kept in
    work_dir/answers.json together with the prompts they answer, so that data accumulates:

    - prompts answered before (this call or an earlier run's file placed there, e.g. from
      ``pack --answers``) are not answered again;
    - the rest are answered within cfg.gen_time (shortest first; None: all of them);
    - answered prompts of the file that are not in prompts["train"] join it (in this dict), except
      any equal to an evaluation prompt.
    Returns {"train": [...], "eval": [...], ...} aligned with prompts["train"] / prompts["eval"]."""
    from mirror_rt.answers import generate_answers

    path = answers_file(work_dir)
    known, known_eval, counters = _cached_answers(path, prompts, cfg.max_new_tokens)
    evals = {tuple(p) for p in prompts["eval"]}
    listed = {tuple(p) for p in prompts["train"]}
    extra = [list(p) for p in known if p not in listed and p not in evals]
    if extra:
        prompts["train"] = prompts["train"] + extra
        log(f"[data] {len(extra)} answered prompts from {path} join the training prompts")
    reused = sum(tuple(p) in known for p in prompts["train"])
    t0 = time.perf_counter()
    out = {"max_new_tokens": cfg.max_new_tokens}
    new_tokens = 0
    for part, have, limit in (("eval", known_eval, None), ("train", known, cfg.gen_time)):
        answers = [have.get(tuple(p)) for p in prompts[part]]
        missing = [i for i, a in enumerate(answers) if a is None]
        if missing:
            more = generate_answers(target, [prompts[part][i] for i in missing], cfg.max_new_tokens, prompts["eos"],
                                    cfg.gen_batch, desc=f"target answers ({part})", time_limit=limit)
            for i, a in zip(missing, more):
                answers[i] = a
            new_tokens += sum(len(a) for a in more if a)
        out[part], out[f"{part}_prompts"] = answers, prompts[part]
    out["gen_s"] = counters.get("gen_s", 0) + time.perf_counter() - t0
    out["gen_tokens"] = counters.get("gen_tokens", 0) + new_tokens
    out["train_answered"] = sum(a is not None for a in out["train"])
    write_json(path, out)
    log(f"[data] {new_tokens} new answer tokens in {time.perf_counter() - t0:.0f}s; {out['train_answered']} of "
        f"{len(prompts['train'])} training prompts answered ({reused} from {path})")
    return out


def sequences(prompts: list[list[int]], answers: list[list[int]], prompt_weight: float, max_len: int):
    """(seqs, weights): prompt + answer; weight[t] is for predicting token t+1 (answer: 1)."""
    seqs, weights = [], []
    for p, a in zip(prompts, answers):
        if a is None:  # not generated (time limit)
            continue
        s = p + a
        w = [prompt_weight] * (len(p) - 1) + [1.0] * len(a) + [0.0]  # the last token predicts nothing
        seqs.append(s[-max_len:])  # long prompts lose their start, never the answer
        weights.append(w[-max_len:])
    return seqs, weights


def split_validation(prompts: list[list[int]], answers: list, n: int, seed: int = 0):
    """(train_pairs, val_pairs) of (prompt, answer) for the answered prompts: the first n answered
    ones in a seeded shuffle of *all* distinct prompts are held out for validation, so answering more
    prompts later (a resumed run) never moves a prompt the draft trained on into validation. Every
    pair whose prompt equals a validation prompt leaves training, so a duplicate cannot leak it.
    Keeps at least one distinct prompt for training."""
    pairs = [(p, a) for p, a in zip(prompts, answers) if a is not None]
    answered = {tuple(p) for p, _ in pairs}
    n = min(max(n, 0), len(answered) - 1)
    if n <= 0:
        return pairs, []
    distinct = sorted({tuple(p) for p in prompts})
    g = torch.Generator().manual_seed(seed)
    order = [distinct[i] for i in torch.randperm(len(distinct), generator=g).tolist()]
    held = set([p for p in order if p in answered][:n])
    val = [(p, a) for p, a in pairs if tuple(p) in held]
    return [(p, a) for p, a in pairs if tuple(p) not in held], val


def load_target(path: str, device, dtype: str):
    from mirror_rt.models import load_model
    # float weights: training takes gradients through the target's shared head and embedding
    t = load_model(path, device=device, dtype=getattr(torch, dtype), quant="dequantize")
    for p in t.parameters():
        p.requires_grad_(False)
    return t


def run_exit(target, prompts, answers, cfg: PipelineConfig, out_dir: str, work_dir: str, log=print) -> dict:
    """Train exit heads at cfg.exit_layers; save the first as out_dir/exit_head.safetensors
    (the others as exit_head_l{L}.safetensors). Returns metrics (lens vs adapter containment)."""
    from mirror_rt.exit_head import save_exit_head
    from mirror_rt.train.train_exit import collect, evaluate_heads, train_exit_heads

    t0 = time.perf_counter()
    pad = prompts["eos"][0] if prompts["eos"] else 0
    seqs, weights = sequences(prompts["train"], answers["train"], 1.0, cfg.max_len)
    bs = max(1, cfg.gen_batch // 4)
    hs, fin = collect(target, seqs, weights, cfg.exit_layers, bs, cfg.max_len, pad, desc="exit: collect train")
    ev_seqs, ev_w = sequences(prompts["eval"], answers["eval"], 0.0, cfg.max_len)
    ev_hs, ev_fin = collect(target, ev_seqs, ev_w, cfg.exit_layers, bs, cfg.max_len, pad, desc="exit: collect eval")
    log(f"[exit] {fin.shape[0]} train tokens, {ev_fin.shape[0]} held-out answer tokens ({time.perf_counter() - t0:.0f}s)")
    heads, hist = train_exit_heads(target, hs, fin, rank=cfg.exit_rank, act=cfg.exit_act, steps=cfg.exit_steps,
                                   batch_tokens=cfg.exit_batch_tokens, lr=cfg.exit_lr, seed=cfg.seed,
                                   checkpoint=os.path.join(work_dir, "exit_ckpt.pt"),
                                   curve_png=os.path.join(out_dir, "exit_loss.png"), time_limit=cfg.exit_time, log=log)
    rows = evaluate_heads(target, ev_hs, ev_fin, heads)
    metrics = {"train_tokens": int(fin.shape[0]), "eval_tokens": int(ev_fin.shape[0]), "steps": len(next(iter(hist.values()))),
               "containment": {name: {str(k): {"contain": c, "omega": o} for k, (c, o) in r.items()}
                               for name, r in rows.items()}}
    for i, layer in enumerate(cfg.exit_layers):
        name = "exit_head.safetensors" if i == 0 else f"exit_head_l{layer}.safetensors"
        if i == 0 or os.environ.get("MIRROR_RT_SAVE_ALL_EXITS"):
            save_exit_head(heads[layer], os.path.join(out_dir, name),
                           {"train_tokens": int(fin.shape[0]), "top8_heldout": rows[f"adapter@{layer}"][8][0]})
    for name, r in rows.items():
        log(f"[exit] {name:>12}: top-1 {r[1][0]:.1%}  top-4 {r[4][0]:.1%}  top-8 {r[8][0]:.1%}  "
            f"top-16 {r[16][0]:.1%}  (Omega_8 {r[8][1]:.1%})")
    metrics["seconds"] = time.perf_counter() - t0
    return metrics


def run_draft(target, prompts, answers, cfg: PipelineConfig, out_dir: str, work_dir: str, log=print) -> dict:
    """Train the SS draft; save out_dir/draft.safetensors (+ shards). Returns metrics."""
    from mirror_rt.models.streaming import StreamingDraft, save_streaming_draft
    from mirror_rt.answers import sd_acceptance
    from mirror_rt.train.train_draft import VAL_KEYS, select_vocab, train_draft

    t0 = time.perf_counter()
    pad = prompts["eos"][0] if prompts["eos"] else 0
    train_pairs, val_pairs = split_validation(prompts["train"], answers["train"], cfg.draft_val, cfg.seed)
    seqs, weights = sequences([p for p, _ in train_pairs], [a for _, a in train_pairs], 0.1, cfg.max_len)
    val = sequences([p for p, _ in val_pairs], [a for _, a in val_pairs], 0.1, cfg.max_len) if val_pairs else None
    log(f"[draft] {len(seqs)} training sequences, {len(val_pairs)} held out to pick the best step")
    vocab_ids = None
    if cfg.draft_vocab and cfg.draft_vocab < target.config.vocab_size:
        vocab_ids = select_vocab([a for a in answers["train"] if a] + seqs, cfg.draft_vocab, target.config.vocab_size,
                                 always=prompts["eos"])
    seed_everything(cfg.seed)
    draft = StreamingDraft.from_target(target, cfg.draft_layers, cfg.n_streams, cfg.stream_layers,
                                       cfg.draft_intermediate, vocab_ids, cfg.draft_init, cfg.seed)
    draft.float()
    draft.attach(target, vocab_ids)
    covered = None
    if vocab_ids is not None:
        vs = set(vocab_ids.tolist())
        ev = [t for a in answers["eval"] for t in a]
        covered = sum(t in vs for t in ev) / max(len(ev), 1)
        with_ctx = sum(t in vs or t in set(p) for p, a in zip(prompts["eval"], answers["eval"]) for t in a)
        covered = {"vocab": covered, "vocab_plus_prompt": with_ctx / max(len(ev), 1)}
        log(f"[draft] vocabulary {len(vs)} ids covers {covered['vocab']:.1%} of held-out answer tokens, "
            f"{covered['vocab_plus_prompt']:.1%} with each prompt's own tokens (set_context_tokens)")
    hist = train_draft(draft, seqs, weights, steps=cfg.draft_steps, batch_size=cfg.draft_batch, max_len=cfg.max_len,
                       lr=cfg.draft_lr, pad=pad, target=target if cfg.draft_kd > 0 else None, kd=cfg.draft_kd,
                       seed=cfg.seed, checkpoint=os.path.join(work_dir, "draft_ckpt.pt"),
                       curve_png=os.path.join(out_dir, "draft_loss.png"), time_limit=cfg.draft_time,
                       max_epochs=cfg.draft_epochs, val=val, val_every=cfg.draft_val_every, log=log)
    files = save_streaming_draft(draft, os.path.join(out_dir, "draft.safetensors"), quant=cfg.draft_export_quant,
                                 metadata={"name": f"SS draft ({cfg.draft_layers} layers, {cfg.n_streams} streams, "
                                                   f"vocab {draft.draft_vocab_size})"})
    t1 = time.perf_counter()
    n = cfg.eval_sd_prompts
    acc = sd_acceptance(draft, prompts["eval"][:n], answers["eval"][:n], cfg.eval_window, use_streams=True)
    log(f"[draft] held-out greedy SD (window {cfg.eval_window}): mean accepted {acc['mean_accepted']:.2f}, "
        f"draft passes/window {acc['passes_per_window']:.2f} ({time.perf_counter() - t1:.0f}s)")
    # The same on training prompts (train-split Spec-Bench first): far above held-out = memorised answers.
    seen = [(p, a) for p, a in train_pairs if a][:n]
    acc_train = sd_acceptance(draft, [p for p, _ in seen], [a for _, a in seen], cfg.eval_window, use_streams=True)
    log(f"[draft] the same on {len(seen)} training prompts: mean accepted {acc_train['mean_accepted']:.2f} "
        f"(held-out {acc['mean_accepted']:.2f}; the gap is what the draft memorised)")
    return {"files": [os.path.basename(f) for f in files], "vocab_coverage": covered,
            "final_loss": {k: sum(v[-20:]) / len(v[-20:]) for k, v in hist.items() if v and k not in VAL_KEYS},
            "val": {"prompts": len(val_pairs), "step": hist.get("val_step", []),
                    "agreement": hist.get("val_agreement", [])},
            "steps": len(hist.get("loss", [])), "sd_eval": acc, "sd_train": acc_train, "seconds": time.perf_counter() - t0,
            "config": {"layers": cfg.draft_layers, "n_streams": cfg.n_streams, "stream_layers": cfg.stream_layers,
                       "vocab": draft.draft_vocab_size}}


def run_pipeline(target_path: str, prompts: dict, cfg: PipelineConfig, out_dir: str, work_dir: str,
                 parts=("exit", "draft"), log=print) -> dict:
    from mirror_rt.train.common import pick_device

    os.makedirs(out_dir, exist_ok=True)
    os.makedirs(work_dir, exist_ok=True)
    prompts = dict(prompts)  # self-written prompts join "train" in this copy
    dev = pick_device(cfg.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # greedy answers as close to fp32 CPU as possible
    seed_everything(cfg.seed)
    t0 = time.perf_counter()
    target = load_target(target_path, dev, cfg.dtype)
    log(f"[pipeline] target {target_path} on {dev} ({time.perf_counter() - t0:.0f}s)")
    n_self = add_self_prompts(target, prompts, cfg, work_dir, log)
    answers = get_answers(target, prompts, cfg, work_dir, log)
    old = os.path.join(out_dir, "metrics.json")
    metrics = json.load(open(old)) if os.path.isfile(old) else {}
    metrics.update({"config": asdict(cfg), "device": str(dev), "gen_s": answers.get("gen_s"),
               "gen_tokens": answers.get("gen_tokens"), "n_train_prompts": len(prompts["train"]),
               "n_self_prompts": n_self, "n_eval_prompts": len(prompts["eval"]), "eval_question_ids": prompts.get("eval_ids"),
               "split": prompts.get("split")})
    if cfg.draft_kd > 0 or "exit" in parts:
        target.float()  # training forwards in fp32 (autocast handles speed on GPU)
    if "exit" in parts:
        metrics["exit"] = run_exit(target, prompts, answers, cfg, out_dir, work_dir, log)
        write_json(os.path.join(out_dir, "metrics.json"), metrics)
    if "draft" in parts:
        metrics["draft"] = run_draft(target, prompts, answers, cfg, out_dir, work_dir, log)
    metrics["total_s"] = time.perf_counter() - t0
    write_json(os.path.join(out_dir, "metrics.json"), metrics)
    return metrics
