"""Train exit-head adapters (``mirror_rt.exit_head``) by KL to the target's final distribution.

Hidden states after ``exit_layer`` layers and the final logits come from teacher-forced forwards
of the target over token sequences (its own greedy answers to prompts, pydoc text). Several exit
layers train at once from one pass of the target. Containment (is the final argmax in the exit
top-kappa?) is the metric that Mirror-SD's reuse depends on.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mirror_rt.exit_head import new_exit_head
from mirror_rt.train.common import load_checkpoint, save_checkpoint, save_curve, seed_everything
from mirror_rt.answers import pad_batch


@torch.inference_mode()
def collect(target, seqs: list[list[int]], weights: list[list[float]], layers, batch_size: int = 8,
            max_len: int = 512, pad: int = 0, store_dtype=None, desc="collect"):
    """Teacher-forced pass over seqs: {layer: hidden [N, H]}, final hidden-normalised logits are
    not stored; instead ``final`` holds the pre-norm last hidden [N, H] (head applied on the fly).
    Only tokens with weight > 0 are kept. Returns (hiddens dict, final [N, H])."""
    store_dtype = store_dtype or target.dtype
    keep = {l: [] for l in layers}
    final = []
    for s in tqdm(range(0, len(seqs), batch_size), desc=desc, unit="batch", disable=None):
        ids, valid = pad_batch(seqs[s:s + batch_size], pad, max_len)
        w = torch.zeros(valid.shape)
        for r, ws in enumerate(weights[s:s + batch_size]):
            ws = ws[: valid.shape[1]]
            w[r, : len(ws)] = torch.tensor(ws, dtype=torch.float)
        sel = (w > 0).to(target.device)
        B, T = ids.shape
        cache = target.new_cache(T, batch=B)
        h = target.embed(ids.to(target.device))
        done = 0
        for layer in sorted(layers):
            h = target.run_layers(h, done, layer, cache)
            keep[layer].append(h[sel].to(store_dtype))
            done = layer
        h = target.run_layers(h, done, target.num_layers, cache)
        final.append(h[sel].to(store_dtype))
    return {l: torch.cat(v) for l, v in keep.items()}, torch.cat(final)


def kl_to_target(exit_logits, target_logits):
    """Mean KL(p_target || p_exit) over rows."""
    t = F.log_softmax(target_logits.float(), -1)
    q = F.log_softmax(exit_logits.float(), -1)
    return (t.exp() * (t - q)).sum(-1).mean()


def train_exit_heads(target, hiddens: dict, final: torch.Tensor, *, rank: int = 256, act: str = "silu",
                     steps: int = 1000, batch_tokens: int = 1024, lr: float = 2e-3, seed: int = 0,
                     checkpoint: str | None = None, checkpoint_every: int = 200, curve_png: str | None = None,
                     time_limit: float | None = None, amp: bool | None = None, log=print):
    """One adapter per layer in ``hiddens``, trained on random token minibatches. Resumable.
    Returns ({layer: ExitHead}, history {f"l{layer}": [losses]})."""
    seed_everything(seed)
    dev = target.device
    heads = {l: new_exit_head(target, l, rank, act) for l in hiddens}
    for h in heads.values():
        h.adapter.float().train()
    params = [p for h in heads.values() for p in h.adapter.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * max(0.05, 1 - s / max(steps, 1)))
    history, step = {}, 0
    state = load_checkpoint(checkpoint)
    if state is not None:
        for l, h in heads.items():
            h.adapter.load_state_dict(state["heads"][l])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        history, step = state["history"], state["step"]
        log(f"[train-exit] resumed from {checkpoint} at step {step}")
    g = torch.Generator().manual_seed(seed + step)
    N = final.shape[0]
    amp = (dev.type == "cuda") if amp is None else amp
    t0 = time.perf_counter()
    bar = tqdm(total=steps, initial=step, desc="train-exit", unit="step", disable=None)

    def save():
        if checkpoint:
            save_checkpoint(checkpoint, {"heads": {l: h.adapter.state_dict() for l, h in heads.items()},
                                         "opt": opt.state_dict(), "sched": sched.state_dict(),
                                         "history": history, "step": step})
        if curve_png:
            save_curve(curve_png, history, "exit head KL")

    while step < steps:
        idx = torch.randint(0, N, (min(batch_tokens, N),), generator=g).to(final.device)
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            t_logits = target.head(final[idx].to(target.dtype)[None])[0]
        loss = 0.0
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            for l, head in heads.items():
                kl = kl_to_target(head(hiddens[l][idx].float()[None])[0], t_logits)
                history.setdefault(f"l{l}", []).append(kl.item())
                loss = loss + kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        bar.set_postfix(kl=f"{loss.item() / len(heads):.3f}")
        if checkpoint and step % checkpoint_every == 0:
            save()
        if time_limit and time.perf_counter() - t0 > time_limit:
            log(f"[train-exit] time limit {time_limit:.0f}s reached at step {step}")
            break
    bar.close()
    save()
    for h in heads.values():
        h.adapter.eval()
        for p in h.adapter.parameters():
            p.requires_grad_(False)
    return heads, history


@torch.inference_mode()
def containment(exit_logits: torch.Tensor, final_logits: torch.Tensor, kappas=(1, 2, 4, 8, 16)) -> dict:
    """Over rows: fraction whose final argmax is in the exit top-kappa, and the mean final
    probability mass inside the exit top-kappa (Omega_kappa). {kappa: (contain, omega)}.
    A kappa above the vocabulary size counts the whole vocabulary (containment 1)."""
    f = final_logits.float().argmax(-1)
    p = F.softmax(final_logits.float(), -1)
    top = torch.topk(exit_logits.float(), min(max(kappas), exit_logits.shape[-1]), -1).indices
    out = {}
    for k in kappas:
        tk = top[..., :k]
        out[k] = (float((tk == f[..., None]).any(-1).float().mean()), float(p.gather(-1, tk).sum(-1).mean()))
    return out


@torch.inference_mode()
def evaluate_heads(target, hiddens: dict, final: torch.Tensor, heads: dict | None = None, kappas=(1, 2, 4, 8, 16),
                   chunk: int = 1024) -> dict:
    """{f"lens@{l}" / f"adapter@{l}": {kappa: (contain, omega)}} over the given tokens."""
    rows = {}
    for l, h in hiddens.items():
        for name, fn in [(f"lens@{l}", lambda x: target.head(x.to(target.dtype)[None])[0])] + \
                        ([(f"adapter@{l}", lambda x, hd=heads[l]: hd(x.float()[None])[0])] if heads and l in heads else []):
            acc = {k: [0.0, 0.0] for k in kappas}
            for s in range(0, h.shape[0], chunk):
                fl = target.head(final[s:s + chunk].to(target.dtype)[None])[0]
                c = containment(fn(h[s:s + chunk]), fl, kappas)
                n = min(chunk, h.shape[0] - s)
                for k in kappas:
                    acc[k][0] += c[k][0] * n
                    acc[k][1] += c[k][1] * n
            rows[name] = {k: (a / h.shape[0], b / h.shape[0]) for k, (a, b) in acc.items()}
    return rows
