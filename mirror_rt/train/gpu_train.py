"""One-shot GPU training of the embedded default's exit head and SS draft (about 5 minutes).

    python -m mirror_rt.train.gpu_train --bundle .gpu_bundle --out $OUT [--budget 300]

Reassembles the target GGUF from the bundle (``mirror_rt.train.pack``; the parts before the last
may already sit in /tmp/mirror_rt_bundle from earlier calls on the same machine), then runs the
pipeline with the "gpu" preset. Writes to --out: exit_head.safetensors, draft.safetensors
(+ draft.1.safetensors), metrics.json, exit_loss.png, draft_loss.png, answers.json.gz (the target's
greedy answers with their prompts, gzipped: pass it to ``pack --answers`` next time and
its prompts are not answered again), self_prompts.json (the prompts the
target wrote, which the answers follow) and log.txt (from the shell wrapper).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import sys
import time

STASH = "/tmp/mirror_rt_bundle"


def assemble(bundle: str) -> str:
    """Path of the whole target GGUF, checked against the manifest's sha256."""
    with open(os.path.join(bundle, "b", "manifest.json")) as f:
        man = json.load(f)
    os.makedirs(STASH, exist_ok=True)
    out = os.path.join(STASH, man["gguf_name"])
    if os.path.isfile(out) and os.path.getsize(out) == man["gguf_bytes"]:
        return out
    parts = []
    for rel, size in man["parts"].items():
        here, stashed = os.path.join(bundle, rel), os.path.join(STASH, os.path.basename(rel))
        if os.path.isfile(here) and os.path.getsize(here) == size:
            parts.append(here)
        elif os.path.isfile(stashed) and os.path.getsize(stashed) == size:
            parts.append(stashed)
        else:
            sys.exit(f"gpu_train: {rel} is missing ({here} / {stashed}): carry {os.path.dirname(rel)}/ in this call, "
                     f"or stash it first with: mkdir -p {STASH} && cp {bundle}/{rel} {STASH}/")
    h = hashlib.sha256()
    with open(out + ".tmp", "wb") as f:
        for p in parts:
            with open(p, "rb") as src:
                blob = src.read()
            h.update(blob)
            f.write(blob)
    if h.hexdigest() != man["gguf_sha256"]:
        sys.exit("gpu_train: reassembled GGUF does not match the manifest's sha256")
    os.replace(out + ".tmp", out)
    return out


def install_prior_answers(bundle: str, work_answers: str) -> bool:
    """Put the bundle's earlier answers (``pack --answers``) where the pipeline looks, unless this
    machine already has answers from an earlier call. Returns whether it did."""
    prior = os.path.join(bundle, "b", "answers.json.gz")
    if not os.path.isfile(prior) or os.path.isfile(work_answers):
        return False
    os.makedirs(os.path.dirname(os.path.abspath(work_answers)), exist_ok=True)
    with gzip.open(prior, "rb") as src, open(work_answers + ".tmp", "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.replace(work_answers + ".tmp", work_answers)
    print(f"[gpu_train] earlier answers from {prior} -> {work_answers}", flush=True)
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description="one-shot GPU training of the exit head and SS draft")
    p.add_argument("--bundle", default=".gpu_bundle")
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    p.add_argument("--work", default="/tmp/mirror_rt_work")
    p.add_argument("--preset", default="gpu")
    p.add_argument("--budget", type=float, default=300.0, help="seconds of generation + training (default 300: about 6-7 minutes with loading and evaluation); "
                        "generation and training time limits scale with it")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="PipelineConfig overrides")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    from mirror_rt.train.pipeline import PipelineConfig, answers_file, run_pipeline, self_prompts_file

    overrides = {}
    for kv in args.set:
        k, v = kv.split("=", 1)
        overrides[k] = json.loads(v) if v[:1] in "[{0123456789-" or v in ("true", "false", "null") else v
    cfg = PipelineConfig.preset(args.preset, **overrides)
    scale = args.budget / 300.0
    cfg.exit_time *= scale
    cfg.draft_time *= scale
    if cfg.self_prompt_time:
        cfg.self_prompt_time *= scale
    if cfg.gen_time:
        cfg.gen_time *= scale
    gguf = assemble(args.bundle)
    print(f"[gpu_train] target {gguf} ({time.perf_counter() - t0:.0f}s)", flush=True)
    with open(os.path.join(args.bundle, "b", "prompts.json")) as f:
        prompts = json.load(f)
    os.makedirs(args.out, exist_ok=True)
    install_prior_answers(args.bundle, answers_file(args.work))
    metrics = run_pipeline(gguf, prompts, cfg, args.out, args.work)
    if os.path.isfile(answers_file(args.work)):  # gzipped: it grows from run to run
        with open(answers_file(args.work), "rb") as src, gzip.open(os.path.join(args.out, "answers.json.gz"), "wb") as dst:
            shutil.copyfileobj(src, dst)
    if os.path.isfile(self_prompts_file(args.work)):
        shutil.copy(self_prompts_file(args.work), args.out)
    import torch
    metrics["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    print(f"[gpu_train] done in {time.perf_counter() - t0:.0f}s; files: {sorted(os.listdir(args.out))}")


if __name__ == "__main__":
    main()
