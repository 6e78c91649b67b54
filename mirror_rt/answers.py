"""The target's own answers to prompts, and what training, the probe and benchmarks measure on them.

* ``generate_answers``: the target's greedy (or sampled) answers. It batches prompts through
  transformers' ``generate`` (left padding) when transformers is importable, with the target's
  weights copied from our runner (Llama-family, ``to_hf``), and falls back to our own
  autoregressive decoder one prompt at a time.
* ``pad_batch`` right-pads sequences for teacher-forced forwards (causal: pads never leak left);
  ``teacher_forward`` runs one and keeps chosen layers' hidden states.
* ``simulate_sd`` / ``sd_acceptance``: the exact greedy vanilla-SD walk of a draft against those
  answers (what a greedy ``SpeculativeDecoder`` with that draft would accept, without the target).
"""
from __future__ import annotations

from collections import Counter

import torch
from tqdm.auto import tqdm


def to_hf(target):
    """A transformers causal LM with the target's weights (same device and dtype)."""
    import transformers

    c = target.config
    classes = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
               "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}
    cfg_cls, model_cls = (getattr(transformers, n) for n in classes[c.arch])
    kw = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
              num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
              head_dim=c.head_dim, rms_norm_eps=c.rms_eps, rope_theta=c.rope_theta,
              max_position_embeddings=c.max_position, tie_word_embeddings=c.tie_embeddings,
              bos_token_id=c.bos_token_id, eos_token_id=(c.eos_token_ids or [None])[0])
    if c.rope_scaling:
        kw["rope_scaling"] = c.rope_scaling
    if c.arch == "llama":
        kw["attention_bias"] = c.qkv_bias
    cfg = cfg_cls(**kw)
    cfg._attn_implementation = "sdpa"
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(target.dtype)
    try:
        with torch.device(target.device):
            model = model_cls(cfg)
    finally:
        torch.set_default_dtype(dtype)
    state = {f"model.{k}": v for k, v in target.state_dict().items() if k != "inv_freq"}
    head = state.pop("model.lm_head.weight")
    if not c.tie_embeddings:
        state["lm_head.weight"] = head
    missing, _ = model.load_state_dict(state, strict=False)
    if [m for m in missing if m != "lm_head.weight"]:
        raise ValueError(f"to_hf: missing {missing[:4]}")
    return model.to(target.device).eval()


@torch.inference_mode()
def generate_answers(target, prompts: list[list[int]], max_new_tokens: int, eos_ids, batch_size: int = 64,
                     use_hf: bool | None = None, desc: str = "target answers",
                     time_limit: float | None = None, temperature: float = 0.0, top_p: float = 1.0,
                     seed: int = 0) -> list[list[int] | None]:
    """Greedy answers (generated ids only, EOS kept if produced) for each prompt's ids.
    Prompts go shortest first; after time_limit seconds no new batch starts and the prompts
    left unanswered get None. temperature > 0 samples instead (nucleus top_p), seeded by `seed`;
    the two paths then draw different (equally distributed) samples."""
    import time
    t0 = time.perf_counter()
    eos_ids = [int(e) for e in (eos_ids if isinstance(eos_ids, (list, tuple)) else [eos_ids])]
    hf = None
    if use_hf is not False:
        try:
            hf = to_hf(target)
        except Exception as e:  # noqa: BLE001 - fall back to our runner
            if use_hf:
                raise
            print(f"[generate] transformers path unavailable ({type(e).__name__}: {e}); using our runner")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    if hf is not None and prompts:  # the copy must compute what our runner computes
        ids = torch.tensor([prompts[order[0]]], device=target.device)
        ref = target(ids, target.new_cache(ids.shape[1]))[0, -1].float()
        got = hf(input_ids=ids).logits[0, -1].float()
        err = float((ref - got).abs().max())
        if err > 2e-2 * max(1.0, float(ref.abs().max())):
            print(f"[generate] transformers copy disagrees with our runner (max |dlogit| {err:.3g}); using our runner")
            hf = None
    out: list[list[int] | None] = [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=None)
    if hf is None:
        from mirror_rt.decoders import AutoregressiveDecoder
        dec = AutoregressiveDecoder(target)
        for i in order:
            if time_limit and time.perf_counter() - t0 > time_limit:
                break
            ids = torch.tensor([prompts[i]], device=target.device)
            out[i] = dec.generate(ids, max_new_tokens, eos_token_id=eos_ids, temperature=temperature, top_p=top_p,
                                  seed=seed + i).tokens[0].tolist()
            bar.update(1)
        bar.close()
        return out
    pad = eos_ids[0]
    sampling = dict(do_sample=False)
    if temperature > 0:  # greedy leaves the caller's RNG alone
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        torch.manual_seed(seed)
    for s in range(0, len(order), batch_size):
        if time_limit and time.perf_counter() - t0 > time_limit:
            print(f"[generate] time limit {time_limit:.0f}s: {len(order) - s} prompts left unanswered")
            break
        idx = order[s:s + batch_size]
        L = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), L), pad, dtype=torch.long)
        att = torch.zeros((len(idx), L), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, L - len(prompts[i]):] = torch.tensor(prompts[i])
            att[r, L - len(prompts[i]):] = 1
        gen = hf.generate(input_ids=ids.to(target.device), attention_mask=att.to(target.device),
                          max_new_tokens=max_new_tokens, eos_token_id=eos_ids, pad_token_id=pad, num_beams=1,
                          **sampling)
        new = gen[:, L:].tolist()
        for r, i in enumerate(idx):
            seq = new[r]
            for j, t in enumerate(seq):
                if t in eos_ids:
                    seq = seq[: j + 1]
                    break
            out[i] = seq
        bar.update(len(idx))
    bar.close()
    return out


def pad_batch(seqs: list[list[int]], pad: int, max_len: int | None = None):
    """Right-pad: (ids [B, T] int64, valid [B, T] bool). Sequences longer than max_len are cut."""
    T = max(len(s) for s in seqs)
    if max_len:
        T = min(T, max_len)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    valid = torch.zeros((len(seqs), T), dtype=torch.bool)
    for r, s in enumerate(seqs):
        s = s[:T]
        ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
        valid[r, : len(s)] = True
    return ids, valid


@torch.inference_mode()
def teacher_forward(target, ids: torch.Tensor, layers=()):
    """Teacher-forced forward of ids [B, T] (right-padded): (hiddens {layer: [B, T, H]} after that
    many layers, final logits [B, T, V] float32)."""
    B, T = ids.shape
    cache = target.new_cache(T, batch=B)
    h = target.embed(ids.to(target.device))
    keep, done = {}, 0
    for layer in sorted(set(layers)):
        h = target.run_layers(h, done, layer, cache)
        keep[layer], done = h, layer
    h = target.run_layers(h, done, target.num_layers, cache)
    return keep, target.head(h)


@torch.inference_mode()
def simulate_sd(draft, prompt: list[int], answer: list[int], window: int = 7, use_streams: bool = True):
    """Exact greedy vanilla-SD simulation of one sequence against the target's precomputed greedy
    answer: each step the draft proposes `window` tokens from the committed context, accepted =
    the longest prefix equal to the answer, then the target's own token follows.
    Returns (steps [(answer index p, accepted a)], draft passes)."""
    ctx, steps, passes, p = list(prompt), [], 0, 0
    if hasattr(draft, "set_context_tokens"):
        draft.set_context_tokens(prompt)
    cache = draft.new_cache(min(len(prompt) + len(answer) + 2 * window + 8, draft.config.max_position))
    while p < len(answer):
        if cache.length < len(ctx) - 1:
            tail = ctx[cache.length:-1]
            draft.run_layers(draft.embed(torch.tensor([tail], device=draft.device)), 0, draft.num_layers, cache)
            cache.commit(len(tail))
        n = window
        if use_streams and getattr(draft, "n_streams", 0):
            toks, _, info = draft.propose_streams(cache, ctx[-1], n)
            passes += info["passes"]
        else:
            toks, feed = [], ctx[-1]
            for i in range(n):
                feed = int(draft(torch.tensor([[feed]], device=draft.device), cache, tree_offset=i)[0, -1].argmax())
                toks.append(feed)
            passes += n
        ref = answer[p:p + n]
        a = 0
        while a < len(ref) and toks[a] == ref[a]:
            a += 1
        a = min(a, len(answer) - 1 - p)
        steps.append((p, a))
        cache.commit(min(a + 1, n))
        ctx += answer[p:p + a + 1]
        p += a + 1
    if hasattr(draft, "set_context_tokens"):
        draft.set_context_tokens(None)
    return steps, passes


def sd_acceptance(draft, prompts: list[list[int]], answers: list[list[int]], window: int = 7,
                  use_streams: bool = True) -> dict:
    """Mean accepted length, histogram and draft passes per window of ``simulate_sd`` over
    sequences (what a greedy SpeculativeDecoder run with this draft would report)."""
    hist, passes = Counter(), 0
    for prompt, answer in zip(prompts, answers):
        if len(answer) < 2:
            continue
        steps, n = simulate_sd(draft, prompt, answer, window, use_streams)
        passes += n
        hist.update(a for _, a in steps)
    steps = sum(hist.values())
    return {"mean_accepted": sum(k * v for k, v in hist.items()) / max(steps, 1), "steps": steps,
            "hist": dict(sorted(hist.items())), "passes_per_window": passes / max(steps, 1), "window": window}
