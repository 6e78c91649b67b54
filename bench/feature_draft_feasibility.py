"""Is a feature-conditioned (EAGLE-style) draft worth building? Trains one on this machine and scores
it against the shipped SS draft on the same held-out answers.

    python bench/feature_draft_feasibility.py --work-dir /tmp/fd --gen-time 1500 --train-time 1200
    # on a lent GPU after mirror_rt/train/gpu_train.sh (which assembles the target GGUF under
    # /tmp/mirror_rt_bundle and leaves its answers in its work dir): no tokenizer needed there
    PYTHONPATH=/tmp/mirror_rt_site python bench/feature_draft_feasibility.py --work-dir /tmp/mirror_rt_work --device cuda \
        --target /tmp/mirror_rt_bundle/MODEL.gguf --prompts-json .gpu_bundle/b/prompts.json --gen-batch 512 --batch 64 \
        --gen-time 0 --train-time 200

The draft (Li et al., EAGLE, 2024) is one decoder layer over fc([embedding of token t+1, the target's
final feature at t]); it predicts the target's feature at t+1 (smooth-L1) and, through the target's
frozen LM head on the SS draft's reduced vocabulary, its next-token distribution (KD). Its rollouts
feed their own predicted features back; the committed context uses the target's true features, as a
vanilla-SD decoder would after each verification.

Data: the target's greedy answers to training-split prompts (``mirror_rt.train.pipeline``; cached in
``--work-dir``/answers.json, so a second run reuses them). Metric: the exact greedy vanilla-SD walk at
window 7 (``simulate_sd``'s protocol: accept the longest matching prefix, then the target's token) on
the first ``--eval-prompts`` held-out Spec-Bench prompts; the shipped SS draft is scored on the same
answers in the same run. Not part of the package: results and conclusions are in bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter

import torch
import torch.nn as nn
import torch.nn.functional as F

from mirror_rt.answers import pad_batch, sd_acceptance
from mirror_rt.default import default_target_path, load_default_draft
from mirror_rt.models.llama import DecoderLayer, _causal_attention
from mirror_rt.models.rope import rope_cos_sin
from mirror_rt.tokenizer import load_tokenizer
from mirror_rt.train.pipeline import PipelineConfig, get_answers, load_target, prepare_prompts, sequences


class FeatureDraft(nn.Module):
    """One decoder layer (initialised from the target's last) over fc([embed(token), feature]):
    [B, T] ids and [B, T, H] features -> [B, T, H] predicted next features."""

    def __init__(self, target, fc_init: str):
        super().__init__()
        self.target = [target]  # a list: the frozen target is not a submodule (not trained, not saved)
        H = target.config.hidden_size
        self.fc = nn.Linear(2 * H, H, bias=fc_init == "random")
        if fc_init == "identity":  # start from embed(token) + feature
            with torch.no_grad():
                eye = torch.eye(H)
                self.fc.weight.copy_(torch.cat([eye, eye], 1) + 0.01 * torch.randn(H, 2 * H))
        self.layer = DecoderLayer(target.config)
        self.layer.load_state_dict(target.layers[-1].state_dict())

    def inputs(self, next_ids, feats):
        return self.fc(torch.cat([self.target[0].embed(next_ids), feats], -1))

    def block(self, x, positions, k_prev=None, v_prev=None, prev_mask=None):
        """x [B, T, H] at positions [B, T]; attends causally to itself and to (k_prev, v_prev)
        [B, S, Hkv, D] where prev_mask [B, T, S] allows. Returns (out [B, T, H], k, v)."""
        layer, attn = self.layer, self.layer.self_attn
        B, T, _ = x.shape
        cos, sin = rope_cos_sin(positions, self.target[0].inv_freq, x.dtype)
        q, k, v = attn.project(layer.input_layernorm(x), cos, sin)
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril().expand(B, T, T)
        kk, vv = k, v
        if k_prev is not None:
            kk, vv, mask = torch.cat([k_prev, k], 1), torch.cat([v_prev, v], 1), torch.cat([prev_mask, mask], -1)
        o = _causal_attention(q, kk, vv, mask[:, None])  # the target's SDPA call (GQA), a mask per row
        x = x + attn.o_proj(o.reshape(B, T, -1))
        return x + layer.mlp(layer.post_attention_layernorm(x)), k, v


def feature_head(target, ids, unit: bool) -> torch.Tensor:
    """LM-head rows [len(ids), H] that map a feature to logits over target ids ``ids`` (with
    ``unit`` features the norm's gain moves into the head)."""
    return target.lm_head.weight[ids] * (target.norm.weight if unit else 1.0)


@torch.inference_mode()
def target_features(target, seqs, unit: bool, batch_size: int = 8):
    """The target's final post-norm hidden state per sequence: [L, H] each (``unit``: divided by
    the norm's gain, so every dimension is on the scale of 1)."""
    out = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        ids, _ = pad_batch([seqs[i] for i in idx], pad=0)  # right padding: causal, never seen by real tokens
        ids = ids.to(target.device)
        T = ids.shape[1]
        h = target.run_layers(target.embed(ids), 0, target.num_layers, target.new_cache(T, batch=len(idx)))
        h = target.norm(h)
        if unit:
            h = h / target.norm.weight
        for r, i in enumerate(idx):
            out[i] = h[r, :len(seqs[i])].clone()
    return out


def train(draft, seqs, weights, feats, head, args, log=print):
    """Teacher-forced training: input position i = (token i+1, feature i) -> feature i+1.
    With --unroll 2 a second pass feeds the first pass's predictions as the input features."""
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    groups = [order[s:s + args.batch] for s in range(0, len(order), args.batch)]
    H, dev = head.shape[1], head.device
    step, epoch, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < args.train_time:
        for g in torch.randperm(len(groups)).tolist():
            if time.perf_counter() - t0 > args.train_time:
                break
            idx = groups[g]
            T, B = max(len(seqs[i]) for i in idx) - 1, len(idx)
            ids, f_in, f_out, w = (torch.zeros(B, T, dtype=torch.long, device=dev), torch.zeros(B, T, H, device=dev),
                                   torch.zeros(B, T, H, device=dev), torch.zeros(B, T, device=dev))
            for r, i in enumerate(idx):
                n = len(seqs[i]) - 1
                ids[r, :n], f_in[r, :n], f_out[r, :n] = torch.tensor(seqs[i][1:]), feats[i][:-1], feats[i][1:]
                w[r, :n] = torch.tensor(weights[i][-n:])
            positions = torch.arange(T, device=dev).expand(B, T)
            teacher = F.softmax(f_out @ head.T, -1)
            loss, x_feat = 0.0, f_in
            for _ in range(args.unroll):
                pred = draft.block(draft.inputs(ids, x_feat), positions)[0]
                reg = (F.smooth_l1_loss(pred, f_out, reduction="none").mean(-1) * w).sum() / w.sum()
                kd = (-(teacher * F.log_softmax(pred @ head.T, -1)).sum(-1) * w).sum() / w.sum()
                loss = loss + reg + args.cls_weight * kd
                x_feat = torch.cat([f_in[:, :1], pred[:, :-1]], 1)  # position i+1 now reads its prediction
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step % 100 == 0:
                log(f"  step {step} (epoch {epoch}): loss {loss.item():.3f} (last pass: reg {reg.item():.3f}, "
                    f"kd {kd.item():.3f}) {time.perf_counter() - t0:.0f}s")
        epoch += 1
    return step


@torch.no_grad()
def rollouts(draft, target, active, seq, starts, unit: bool, window: int = 7) -> torch.Tensor:
    """Greedy proposals [N, window] (target ids) of one rollout per start, all at once: rollout c
    reads the true input at position c (token c+1, the target's feature at c), then feeds its own
    predicted features and tokens back; step k attends to the true keys <= c and its own steps.
    ``active``: int64 [Va] target ids the draft may propose."""
    dev = target.device
    active, starts = active.to(dev), starts.to(dev)
    feats = target_features(target, [seq], unit)[0]
    head = feature_head(target, active, unit)
    L, N = len(seq) - 1, len(starts)
    out, K, V = draft.block(draft.inputs(torch.tensor([seq[1:]], device=dev), feats[None, :-1]),
                            torch.arange(L, device=dev)[None])
    f_hat = out[0, starts]
    proposals = [active[(f_hat @ head.T).argmax(-1)]]
    k_prev, v_prev = K[0].expand(N, -1, -1, -1), V[0].expand(N, -1, -1, -1)
    prev_mask = (torch.arange(L, device=dev)[None, :] <= starts[:, None])[:, None, :]
    for k in range(2, window + 1):
        x = draft.inputs(proposals[-1][:, None], f_hat[:, None])
        o, k_new, v_new = draft.block(x, (starts + k - 1)[:, None], k_prev, v_prev, prev_mask)
        k_prev, v_prev = torch.cat([k_prev, k_new], 1), torch.cat([v_prev, v_new], 1)
        prev_mask = torch.cat([prev_mask, torch.ones(N, 1, 1, dtype=torch.bool, device=dev)], -1)
        f_hat = o[:, 0]
        proposals.append(active[(f_hat @ head.T).argmax(-1)])
    return torch.stack(proposals, 1).cpu()


def walk(draft, target, vocab, prompt, answer, unit: bool, window: int = 7) -> list[int]:
    """Accepted lengths of the exact greedy vanilla-SD walk over one (prompt, answer): from answer
    index p the draft's rollout starts at input position len(prompt) + p - 2 (its first proposal is
    compared with answer[p]); accept the longest matching prefix, then the target's token."""
    s, P, A = prompt + answer, len(prompt), len(answer)
    active = torch.tensor(sorted(set(vocab.tolist()) | set(prompt)))  # as set_context_tokens does
    starts = torch.arange(P - 2, P + A - 2)
    proposals = rollouts(draft, target, active, s, starts, unit, window).tolist()
    steps, p = [], 0
    while p < A:
        ref, a = answer[p:p + window], 0
        while a < len(ref) and proposals[p][a] == ref[a]:
            a += 1
        a = min(a, A - 1 - p)
        steps.append(a)
        p += a + 1
    return steps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work-dir", required=True, help="answers.json cache (reused by later runs)")
    ap.add_argument("--gen-time", type=float, default=1500, help="seconds for new training answers (0: only the cached ones)")
    ap.add_argument("--n-templates", type=int, default=2000)
    ap.add_argument("--eval-prompts", type=int, default=16)
    ap.add_argument("--train-time", type=float, default=1200)
    # defaults: EAGLE's recipe, the best of the settings tried here (bench/RESULTS.md, "A feature-conditioned draft")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--cls-weight", type=float, default=0.1)
    ap.add_argument("--unroll", type=int, default=1, choices=(1, 2))
    ap.add_argument("--fc-init", default="random", choices=("identity", "random"))
    ap.add_argument("--unit-features", action="store_true")
    ap.add_argument("--max-len", type=int, default=384)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--target", default=None, help="the target's GGUF or HF dir (default: the embedded default)")
    ap.add_argument("--gen-batch", type=int, default=48, help="prompts answered at once")
    ap.add_argument("--prompts-json", default=None,
                    help="tokenized prompts (a training bundle's b/prompts.json) instead of tokenizing here")
    ap.add_argument("--limit-train", type=int, default=None, help="train on the first N answered prompts only")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    os.makedirs(args.work_dir, exist_ok=True)

    path = args.target or default_target_path()
    target = load_target(path, args.device, "float32")
    cfg = PipelineConfig(n_templates=args.n_templates, n_eval=40, max_new_tokens=256, gen_batch=args.gen_batch,
                         gen_time=max(args.gen_time, 1e-9))  # generate_answers reads 0 as "no limit"
    if args.prompts_json:
        with open(args.prompts_json) as f:
            prompts = json.load(f)
    else:
        prompts = prepare_prompts(load_tokenizer(path), cfg)
    prompts["eval"] = prompts["eval"][:args.eval_prompts]
    answers = get_answers(target, prompts, cfg, args.work_dir)
    ss_draft, _ = load_default_draft(target)

    pairs = [(p, a) for p, a in zip(prompts["train"], answers["train"]) if a][:args.limit_train]
    seqs, weights = sequences([p for p, _ in pairs], [a for _, a in pairs], 0.2, args.max_len)
    weights = [w[:-1] for w in weights]  # one per input position: the last token predicts nothing
    t0 = time.perf_counter()
    feats = target_features(target, seqs, args.unit_features)
    print(f"{len(seqs)} training sequences, {sum(map(len, seqs))} tokens ({sum(len(a) for _, a in pairs)} answer "
          f"tokens); target features in {time.perf_counter() - t0:.0f}s", flush=True)
    head = feature_head(target, ss_draft.vocab_ids, args.unit_features)
    draft = FeatureDraft(target, args.fc_init).to(target.device)
    steps = train(draft, seqs, weights, feats, head, args)
    print(f"trained {steps} steps in {args.train_time:.0f}s", flush=True)

    draft.eval()
    held_out = [(p, a) for p, a in zip(prompts["eval"], answers["eval"]) if len(a) >= 2]
    feature_steps = [a for p, ans in held_out for a in walk(draft, target, ss_draft.vocab_ids, p, ans,
                                                              args.unit_features)]
    ss = sd_acceptance(ss_draft, [p for p, _ in held_out], [a for _, a in held_out], 7, use_streams=True)
    seen_pairs = [(p, a) for p, a in pairs if len(p) + len(a) <= args.max_len][:16]
    seen = [a for p, ans in seen_pairs for a in walk(draft, target, ss_draft.vocab_ids, p, ans, args.unit_features)]
    mean_feature = sum(feature_steps) / max(len(feature_steps), 1)
    print(f"held-out greedy SD at window 7 on {len(held_out)} prompts (mean accepted per window):")
    print(f"  feature draft  {mean_feature:.3f}  over {len(feature_steps)} windows, "
          f"{dict(sorted(Counter(feature_steps).items()))}")
    print(f"  SS draft       {ss['mean_accepted']:.3f}  over {ss['steps']} windows, {ss['hist']}")
    print(f"  ratio feature / SS: {mean_feature / max(ss['mean_accepted'], 1e-9):.2f}x")
    print(f"  feature draft on {len(seen_pairs)} of its own training answers: {sum(seen) / max(len(seen), 1):.3f} "
          f"(the gap to held-out is what it memorised)")


if __name__ == "__main__":
    main()
