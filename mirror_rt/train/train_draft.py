"""Distil a Speculative Streaming draft from a target (DESIGN.md §2).

Loss per batch of token sequences (right-padded, ``valid`` marks real tokens, ``weight`` which
positions' *next* token counts):

    L = CE(main) + 0.1 * sum_j CE(stream j)               (stream j at t predicts token t+j+1)
      + kd * [KL(target_t || main_t) + 0.1 * sum_j KL(target_{t+j} || stream_j,t)]

CE labels are the sequence's tokens (the target's own greedy answers, so CE already distils);
the optional KL term uses the target's distribution restricted to the draft vocabulary (the
target at t+j predicts the same token that stream j at t does). Tokens outside the draft
vocabulary are ignored by CE.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mirror_rt.train.common import load_checkpoint, save_checkpoint, save_curve, seed_everything

STREAM_WEIGHT = 0.1
VAL_KEYS = ("val_step", "val_agreement")


def select_vocab(seqs: list[list[int]], size: int, vocab_size: int, always=()) -> torch.Tensor:
    """The `size` most frequent ids in seqs (plus `always`), sorted: the draft vocabulary."""
    counts = Counter(t for s in seqs for t in s)
    keep = [int(a) for a in always]
    for t, _ in counts.most_common():
        if len(keep) >= size:
            break
        if t not in keep:
            keep.append(t)
    t = 0
    while len(keep) < min(size, vocab_size):  # pad with low ids if the data is small
        if t not in keep:
            keep.append(t)
        t += 1
    return torch.tensor(sorted(keep), dtype=torch.long)


def _to_draft_ids(draft, dev) -> torch.Tensor:
    """[V] int64: each target id's index in the draft vocabulary, -100 where it has none."""
    V = draft.config.vocab_size
    if draft.vocab_ids is None:
        return torch.arange(V, device=dev)
    to_draft = torch.full((V,), -100, dtype=torch.long, device=dev)
    to_draft[draft.vocab_ids.to(dev)] = torch.arange(draft.vocab_ids.numel(), device=dev)
    return to_draft


def ss_loss(draft, ids, weight, teacher_logits=None, kd: float = 0.0, stream_weight: float = STREAM_WEIGHT):
    """The SS loss (see module doc). ids [B, T]; weight [B, T] float (position t's next token
    counts with weight[t]); teacher_logits [B, T, V] or None. Returns (loss, parts dict)."""
    B, T = ids.shape
    if hasattr(draft, "set_context_tokens"):
        draft.set_context_tokens(None)  # train over the fixed draft vocabulary
    main, streams = draft.ss_forward(ids)
    dev = ids.device
    to_draft = _to_draft_ids(draft, dev)
    teacher_sub = None
    if teacher_logits is not None and kd > 0:
        tl = teacher_logits if draft.vocab_ids is None else teacher_logits[..., draft.vocab_ids.to(dev)]
        teacher_sub = F.log_softmax(tl.float(), -1)

    def term(logits, shift):
        # logits at positions t < T - shift predict ids[t + shift]
        n = T - shift
        if n <= 0:
            return logits.sum() * 0, logits.sum() * 0
        lg = logits[:, :n].float()
        w = weight[:, :n]
        labels = to_draft[ids[:, shift:]]
        ce = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none")
        ok = (labels.reshape(-1) >= 0).float() * w.reshape(-1)
        ce = (ce * ok).sum() / ok.sum().clamp_min(1)
        kl = lg.sum() * 0
        if teacher_sub is not None:
            t_lp = teacher_sub[:, shift - 1: shift - 1 + n]
            lp = F.log_softmax(lg, -1)
            kl_tok = (t_lp.exp() * (t_lp - lp)).sum(-1)
            kl = (kl_tok * w).sum() / w.sum().clamp_min(1)
        return ce, kl

    ce_main, kl_main = term(main, 1)
    loss = ce_main + kd * kl_main
    parts = {"main": ce_main.item()}
    for j in range(draft.n_streams):
        ce_j, kl_j = term(streams[:, :, j], j + 2)
        loss = loss + stream_weight * (ce_j + kd * kl_j)
        parts[f"stream{j + 1}"] = ce_j.item()
    parts["loss"] = loss.item()
    return loss, parts


@torch.no_grad()
def agreement(draft, seqs, weights, batch_size: int = 8, max_len: int = 256, pad: int = 0) -> float:
    """Share of answer positions (weight >= 1) where the draft's main head ranks the sequence's next
    token first: its greedy agreement with the target on held-out text (a token outside the draft
    vocabulary counts as a miss). Cheap enough to run during training, and what acceptance follows."""
    was_training = draft.training
    draft.eval()
    if hasattr(draft, "set_context_tokens"):
        draft.set_context_tokens(None)
    hits = total = 0.0
    for s in range(0, len(seqs), batch_size):
        ids, w, valid = padded(seqs[s:s + batch_size], weights[s:s + batch_size], max_len, pad)
        counted = (w[:, :-1] >= 1.0) & valid[:, 1:]  # answer positions whose next token is real
        ids, counted = ids.to(draft.device), counted.to(draft.device)
        main, _ = draft.ss_forward(ids)
        labels = _to_draft_ids(draft, ids.device)[ids[:, 1:]]
        hit = (main[:, :-1].argmax(-1) == labels) & counted
        hits += float(hit.sum())
        total += float(counted.sum())
    draft.train(was_training)
    return hits / max(total, 1.0)


def padded(seqs, weights, max_len: int, pad: int):
    """Right-padded (ids [B, T] int64, weight [B, T] float32, valid [B, T] bool) of sequences cut to
    max_len; pads weigh 0."""
    T = min(max_len, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    w = torch.zeros((len(seqs), T))
    valid = torch.zeros((len(seqs), T), dtype=torch.bool)
    for r, (s, ws) in enumerate(zip(seqs, weights)):
        s, ws = s[:T], ws[:T]
        ids[r, : len(s)] = torch.tensor(s)
        w[r, : len(s)] = torch.tensor(ws, dtype=torch.float)
        valid[r, : len(s)] = True
    return ids, w, valid


def batches(seqs, weights, batch_size: int, max_len: int, pad: int, rng: torch.Generator):
    """Endless shuffled batches: (ids [B, T], weight [B, T]) right-padded (pads weigh 0)."""
    n = len(seqs)
    while True:
        for start in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            if start == 0:
                perm = torch.randperm(n, generator=rng).tolist()
            idx = perm[start:start + batch_size]
            ids, w, _ = padded([seqs[i] for i in idx], [weights[i] for i in idx], max_len, pad)
            yield ids, w


def train_draft(draft, seqs, weights, *, steps: int, batch_size: int = 8, max_len: int = 256, lr: float = 1e-3,
                pad: int = 0, target=None, kd: float = 0.0, seed: int = 0, checkpoint: str | None = None,
                checkpoint_every: int = 200, curve_png: str | None = None, time_limit: float | None = None,
                amp: bool | None = None, stream_weight: float = STREAM_WEIGHT, max_epochs: float | None = None,
                val=None, val_every: int = 100, log=print):
    """Train the draft's own parameters (layers, stream embeddings) with the SS loss.
    seqs: token lists; weights: per-token loss weights for each seq's next-token targets.
    max_epochs caps the steps at that many passes over seqs: a draft trained for many epochs on the
    target's greedy answers memorises them (bench/RESULTS.md: 6.65 tokens accepted on training
    prompts, 0.38 on held-out ones).
    val: (seqs, weights) held out from training; every val_every steps and at the end the draft's
    ``agreement`` on them is measured, and the draft ends with the parameters that scored best.
    Resumes from `checkpoint` if it exists; saves there every checkpoint_every steps and at the end.
    Returns the history {name: [per-step values]}, plus "val_step"/"val_agreement" with val."""
    seed_everything(seed)
    if max_epochs is not None:
        if max_epochs <= 0:
            raise ValueError(f"max_epochs must be > 0, got {max_epochs}")
        per_epoch = max(1, len(seqs) // batch_size)  # `batches` yields only full batches
        steps = min(steps, max(1, math.ceil(max_epochs * per_epoch)))
    if val_every < 1:
        raise ValueError(f"val_every must be >= 1, got {val_every}")
    dev = draft.device
    params = [p for n, p in draft.named_parameters() if p.requires_grad and (n.startswith("layers.") or n == "stream_embed")]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, steps // 20)) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    history, step, best = {}, 0, None  # best: (agreement, step, parameters) on val
    val_key = None if val is None else hashlib.sha256(json.dumps([list(val[0]), list(val[1])]).encode()).hexdigest()
    state = load_checkpoint(checkpoint)
    if state is not None:
        draft.load_state_dict(state["draft"], strict=False)
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        history, step, best = state["history"], state["step"], state.get("best")
        log(f"[train-draft] resumed from {checkpoint} at step {step}")
        if state.get("val_key") != val_key and (best is not None or history.get("val_step")):
            log("[train-draft] the held-out set changed since the checkpoint: its scores start over")
            best = None
            for k in VAL_KEYS:
                history.pop(k, None)
    rng = torch.Generator().manual_seed(seed + step)
    amp = (dev.type == "cuda") if amp is None else amp
    data = batches(seqs, weights, batch_size, max_len, pad, rng)
    draft.train()
    t0 = time.perf_counter()
    bar = tqdm(total=steps, initial=step, desc="train-draft", unit="step", disable=None)

    def save():
        if checkpoint:
            save_checkpoint(checkpoint, {"draft": draft.added_state_dict(), "opt": opt.state_dict(),
                                         "sched": sched.state_dict(), "history": history, "step": step,
                                         "best": best, "val_key": val_key})
        if curve_png:
            save_curve(curve_png, {k: v for k, v in history.items() if k not in ("loss", *VAL_KEYS)}, "SS draft loss")

    def validate():
        nonlocal best
        if val is None or (history.get("val_step") or [None])[-1] == step:
            return
        score = agreement(draft, val[0], val[1], batch_size, max_len, pad)
        history.setdefault("val_step", []).append(step)
        history.setdefault("val_agreement", []).append(score)
        if best is None or score > best[0]:
            best = (score, step, {k: v.detach().cpu().clone() for k, v in draft.added_state_dict().items()})

    while step < steps:
        ids, w = next(data)
        ids, w = ids.to(dev), w.to(dev)
        teacher = None
        if target is not None and kd > 0:
            with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                from mirror_rt.answers import teacher_forward
                _, teacher = teacher_forward(target, ids)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            loss, parts = ss_loss(draft, ids, w, teacher, kd, stream_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        for k, v in parts.items():
            history.setdefault(k, []).append(v)
        bar.update(1)
        bar.set_postfix(loss=f"{parts['loss']:.3f}", main=f"{parts['main']:.3f}")
        if step % val_every == 0:
            validate()
        if checkpoint and step % checkpoint_every == 0:
            save()
        if time_limit and time.perf_counter() - t0 > time_limit:
            log(f"[train-draft] time limit {time_limit:.0f}s reached at step {step}")
            break
    bar.close()
    validate()
    if best is not None:
        last = history["val_agreement"][-1]
        if best[0] > last:
            draft.load_state_dict({k: v.to(dev) for k, v in best[2].items()}, strict=False)
        log(f"[train-draft] held-out agreement: best {best[0]:.1%} at step {best[1]} (last {last:.1%} at step {step}); "
            f"keeping step {best[1] if best[0] > last else step}")
    draft.eval()
    save()
    return history
