"""Chain verification on the device: the accepted length and the next token as tensors, no host read.

For a chain [pending, w_1..w_n] this computes exactly what ``ops.verify_accept`` (its reference,
``reference.verify_accept_ref``) computes for that chain with the same uniforms, but as a few
vectorised tensor ops, so the step reads its outcome together with its checks in one transfer
(``base.read_back``). The chain's structure is built here, so the tree checks of
``ops.verify_accept`` reduce to one: every drafted id lies in the vocabulary (a device flag).

    greedy     w_i accepted while it equals argmax p_{i-1}; next = argmax p_A
    match      the same against a sample s_j ~ p_j drawn with uniforms[j]
    rejection  w_i accepted with probability min(1, p_{i-1}(w_i) / q_{i-1}(w_i)) (uniforms[i]); after
               the first rejection at row A, next ~ norm(max(0, p_A - q_A)); when all are accepted,
               next ~ p_n (uniforms[0] draws it)
"""
from __future__ import annotations

import torch


def sample_rows(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF samples of each row of probs [R, V] (not necessarily normalised) with u [R]:
    ``reference.sample_from`` row by row, in float64, never a zero-probability token."""
    cdf = probs.double().cumsum(-1)
    target = u.double()[:, None] * cdf[:, -1:]
    idx = torch.searchsorted(cdf, target, right=True).clamp(max=probs.shape[-1] - 1)
    positive = torch.where(probs > 0, torch.arange(probs.shape[-1], device=probs.device), -1)
    last_positive = positive.cummax(-1).values  # the last index <= j with probability > 0
    return last_positive.gather(-1, idx).clamp(min=0)[:, 0]


def leading_true(ok: torch.Tensor) -> torch.Tensor:
    """0-d int64: how many entries of the bool vector ok are True before the first False."""
    return ok.to(torch.int64).cumprod(0).sum()


def verify_chain_device(node_ids: torch.Tensor, logits: torch.Tensor, q, mode: str, sampler, uniforms=None):
    """Verify [pending, w_1..w_n] (node_ids [1, n+1] int64) against the target's logits [1, n+1, V].

    q: [>= n, V] rows the window was drawn from (rejection only; row j drew w_{j+1}), or None.
    uniforms: [n+1] (default: drawn from the sampler's generator; unused when greedy).
    Returns 0-d device tensors (accepted A int64, next token int64, ids_ok bool)."""
    ids, rows = node_ids[0], logits[0]
    n, V = ids.shape[0] - 1, rows.shape[-1]
    window = ids[1:]
    ids_ok = ((window >= 0) & (window < V)).all()
    window = window.clamp(0, V - 1)
    if mode == "greedy":
        target_tok = rows.float().argmax(-1)
        accepted = leading_true(window == target_tok[:n])
        return accepted, target_tok[accepted], ids_ok
    if uniforms is None:
        uniforms = sampler.uniforms(n + 1).to(rows.device)
    probs = sampler.probs(rows)
    if mode == "match":
        target_tok = sample_rows(probs, uniforms)
        accepted = leading_true(window == target_tok[:n])
        return accepted, target_tok[accepted], ids_ok
    return _rejection(window, probs.double(), q, uniforms) + (ids_ok,)


def _rejection(window, p, q, uniforms):
    n, V = window.shape[0], p.shape[-1]
    q_rows = torch.zeros_like(p)
    if q is not None and n:
        q_rows[:n] = q[:n].to(device=p.device, dtype=torch.float64)
    at = torch.arange(n, device=p.device)
    px, qx = p[at, window], q_rows[at, window]
    ratio = torch.where(qx > 0, px / qx.clamp(min=1e-300), torch.where(px > 0, 1.0, 0.0))
    accepted = leading_true(uniforms[1:n + 1].double() < ratio.clamp(max=1.0))
    p_a, q_a = p[accepted], q_rows[accepted]  # q row n is zero: all accepted leaves p_n itself
    residual = (p_a - q_a).clamp(min=0.0)
    total = residual.sum()
    residual = torch.where(total > 0, residual / total.clamp(min=1e-300), p_a)
    next_token = sample_rows(residual[None], uniforms[:1])[0]
    return accepted, next_token


def verify_step(node_ids, logits, q, mode: str, sampler, step: int) -> tuple[int, int]:
    """A step's verification and its one host read: (accepted A, next token) as ints, after the
    finiteness of the target's logits and the drafted ids' range, read in the same transfer."""
    from mirror_rt.decoders.base import all_finite, raise_unless_finite, read_back

    accepted, next_token, ids_ok = verify_chain_device(node_ids, logits, q, mode, sampler)
    accepted, next_token, finite, ids_ok = read_back(accepted, next_token, all_finite(logits), ids_ok)
    raise_unless_finite(finite, "target", step)
    if not ids_ok:
        raise ValueError(f"a drafted token id at step {step} lies outside the vocabulary [0, {logits.shape[-1]})")
    return accepted, next_token
