"""C++ tree_attention vs torch SDPA with an explicit mask vs the eager reference, on this CPU.

    python bench/bench_cpu_ops.py [--threads 2] [--dtype float32|bfloat16] [--csv bench/results/cpu_ops.csv]

Shapes: B=1, prefix S in {128, 512, 2048}, tree T in {8, 16, 64} (all T nodes query: Tq = T, the
mask is a random tree's ancestor-or-self mask), heads Hq/Hkv = 9/3 with D = 64 (the embedded
draft) and 32/8 with D = 128.

Providers (every one gets the contract's inputs and returns [B, T, Hq, D]):
  cpp          mirror_rt.ops.cpu.tree_attention_cpu, bool mask (packing included)
  cpp_packed   the same with the mask already packed (what the draft passes: BranchTree.mask_bits)
  sdpa         torch SDPA with the explicit mask, including what SDPA needs first: the prefix and
               tree K/V concatenated, the [B, 1, T, S+T] mask built, heads moved to dim 1
  sdpa_core    the SDPA call alone on pre-built inputs (a lower bound no caller of the contract gets)
  ref          mirror_rt.ops.reference.tree_attention_ref (eager)
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Bench  # noqa: E402

from mirror_rt.ops import reference  # noqa: E402
from mirror_rt.ops.cpu import pack_tree_mask, tree_attention_cpu  # noqa: E402


def random_tree_mask(T, gen):
    """Ancestor-or-self mask [T, T] of a random tree in topological order."""
    mask = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        if i:
            mask[i] = mask[int(torch.randint(0, i, (1,), generator=gen))]
        mask[i, i] = True
    return mask


def sdpa_inputs(q, k_cache, v_cache, cache_seqlens, k_tree, v_tree, tree_mask):
    B, Tq = q.shape[:2]
    S = k_cache.shape[1]
    keys = torch.cat([k_cache, k_tree], 1).transpose(1, 2)
    vals = torch.cat([v_cache, v_tree], 1).transpose(1, 2)
    prefix = torch.arange(S).view(1, 1, S) < cache_seqlens.view(B, 1, 1)
    allowed = torch.cat([prefix.expand(B, Tq, S), tree_mask], 2).unsqueeze(1)
    return q.transpose(1, 2), keys, vals, allowed


def sdpa_tree_attention(*args):
    qh, keys, vals, allowed = sdpa_inputs(*args)
    return F.scaled_dot_product_attention(qh, keys, vals, attn_mask=allowed, enable_gqa=True).transpose(1, 2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--csv", default=None)
    ap.add_argument("--no-ref", action="store_true", help="skip the slow eager reference")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    bench = Bench("tree_attention", "cpu", argv=sys.argv)
    for Hq, Hkv, D in ((9, 3, 64), (32, 8, 128)):
        for S in (128, 512, 2048):
            for T in (8, 16, 64):
                shape = dict(B=1, S=S, T=T, Hq=Hq, Hkv=Hkv, D=D, dtype=args.dtype)
                rnd = lambda *s: torch.randn(*s, generator=gen).to(dtype)  # noqa: E731
                ins = (rnd(1, T, Hq, D), rnd(1, S, Hkv, D), rnd(1, S, Hkv, D),
                       torch.tensor([S], dtype=torch.int32), rnd(1, T, Hkv, D), rnd(1, T, Hkv, D),
                       random_tree_mask(T, gen).unsqueeze(0))
                bits = pack_tree_mask(ins[-1])
                pre = sdpa_inputs(*ins)
                bench.row("sdpa", shape, lambda: sdpa_tree_attention(*ins))
                sdpa_core = bench.row("sdpa_core", shape, lambda: F.scaled_dot_product_attention(
                    pre[0], pre[1], pre[2], attn_mask=pre[3], enable_gqa=True))
                for name, mask in (("cpp", ins[-1]), ("cpp_packed", bits)):
                    rec = bench.row(name, shape, lambda: tree_attention_cpu(*ins[:-1], mask), baseline="sdpa")
                    rec["speedup_vs_sdpa_core"] = round(sdpa_core["us"] / rec["us"], 3)
                if not args.no_ref:
                    bench.row("ref", shape, lambda: reference.tree_attention_ref(*ins), baseline="sdpa")
    bench.finish(args.csv)


if __name__ == "__main__":
    main()
