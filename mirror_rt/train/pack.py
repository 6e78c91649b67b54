"""Prepare the bundle for the one-shot GPU run (run here, on the CPU machine, once).

    python -m mirror_rt.train.pack [--out .gpu_bundle] [--n-templates 2000]

Writes (ignored by git; the device tool carries at most 64 MiB per call, the target GGUF is 98 MB,
so it travels in two calls on the same warm machine):

    .gpu_bundle/a/target.part0        first 56 MiB of the target GGUF   (call 1 carries a/)
    .gpu_bundle/b/target.part1        the rest                          (call 2 carries b/)
    .gpu_bundle/b/prompts.json        chat-templated token ids: train-allowed prompts + held-out eval
    .gpu_bundle/b/manifest.json       sizes and sha256 of the GGUF and its parts
    .gpu_bundle/b/gguf-*.whl          the GGUF reader (absent from the GPU image), if found here

The GPU machine needs no tokenizer and no network. See mirror_rt/train/gpu_train.sh.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys

PART_BYTES = 56 * 2 ** 20


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def ensure_ignored(repo: str, rel: str):
    exclude = os.path.join(repo, ".git", "info", "exclude")
    if not os.path.isdir(os.path.dirname(exclude)):
        return
    line = f"/{rel.strip('/')}/"
    lines = open(exclude).read().splitlines() if os.path.isfile(exclude) else []
    if line not in lines:
        with open(exclude, "a") as f:
            f.write(line + "\n")


def main(argv=None):
    from mirror_rt.default import default_target_path
    from mirror_rt.tokenizer import load_tokenizer
    from mirror_rt.train.pipeline import PipelineConfig, prepare_prompts

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=".gpu_bundle")
    p.add_argument("--target", default=None, help="target GGUF (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--n-templates", type=int, default=PipelineConfig().n_templates)
    p.add_argument("--n-eval", type=int, default=PipelineConfig().n_eval)
    p.add_argument("--spec-bench", default=None)
    p.add_argument("--wheel-dir", default=None, help="folder holding a gguf wheel (default: pip download)")
    args = p.parse_args(argv)
    repo = os.getcwd()
    ensure_ignored(repo, args.out)
    a, b = os.path.join(args.out, "a"), os.path.join(args.out, "b")
    for d in (a, b):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    target = args.target or default_target_path()
    with open(target, "rb") as f:
        head = f.read(PART_BYTES)
        rest = f.read()
    for path, blob in ((os.path.join(a, "target.part0"), head), (os.path.join(b, "target.part1"), rest)):
        with open(path, "wb") as f:
            f.write(blob)
    cfg = PipelineConfig(n_templates=args.n_templates, n_eval=args.n_eval)
    prompts = prepare_prompts(load_tokenizer(target), cfg, args.spec_bench)
    with open(os.path.join(b, "prompts.json"), "w") as f:
        json.dump(prompts, f)
    manifest = {"gguf_name": os.path.basename(target), "gguf_sha256": sha256(target), "gguf_bytes": os.path.getsize(target),
                "parts": {"a/target.part0": len(head), "b/target.part1": len(rest)},
                "n_train": len(prompts["train"]), "n_eval": len(prompts["eval"])}
    with open(os.path.join(b, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    wheels = glob.glob(os.path.join(args.wheel_dir, "gguf-*.whl")) if args.wheel_dir else []
    if not wheels:
        import gguf
        version = getattr(gguf, "__version__", None) or __import__("importlib.metadata").metadata.version("gguf")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", b, f"gguf=={version}"],
                       check=False)
    for w in wheels:
        shutil.copy(w, b)
    sizes = {d: sum(os.path.getsize(os.path.join(d, x)) for x in os.listdir(d)) / 2 ** 20 for d in (a, b)}
    print(json.dumps({"bundle": args.out, "MiB": sizes, **manifest}, indent=1))
    print(f"call 1: carry [{a}] ; call 2: carry [{b}] and run  bash mirror_rt/train/gpu_train.sh {args.out}")


if __name__ == "__main__":
    main()
