"""Prepare the bundle for the one-shot GPU run (run here, on the CPU machine, once).

    python -m mirror_rt.train.pack [--out .gpu_bundle] [--n-templates 2000]

Writes (ignored by git; the device tool carries at most 64 MiB per call *including the working
tree*, the target GGUF is 98 MB, so it travels in several calls on the same warm machine; the part
size is what the tracked tree leaves free, so the number of calls grows with the tree):

    .gpu_bundle/a0/target.part0       first part of the target GGUF     (call 1 carries a0/)
    .gpu_bundle/a1/target.part1       ...                               (call 2 carries a1/, ...)
    .gpu_bundle/b/target.partN        the last part                     (the last call carries b/)
    .gpu_bundle/b/prompts.json        chat-templated token ids: train-allowed prompts + held-out eval,
                                      and the chat frame the target writes its own prompts in
    .gpu_bundle/b/manifest.json       sizes and sha256 of the GGUF and its parts
    .gpu_bundle/b/gguf-*.whl          the GGUF reader (absent from the GPU image), if found here
    .gpu_bundle/b/answers.json.gz     with --answers: an earlier run's answers (gpu_train returns
                                      answers.json.gz; keep it under bench/runs/). Its prompts are
                                      not answered again and join training, so data accumulates
                                      from run to run

The GPU machine needs no tokenizer and no network. See mirror_rt/train/gpu_train.sh.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys

CALL_LIMIT = 64 * 2 ** 20   # what one device call may carry, working tree included
MARGIN = 2 * 2 ** 20        # headroom for files that appear between packing and the calls


def tree_bytes(repo: str) -> int:
    """Bytes of the working tree that travels with every device call (tracked + untracked-not-ignored)."""
    try:
        out = subprocess.run(["git", "-C", repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError):
        print("pack: not a git checkout; assuming an empty working tree for the part size")
        return 0
    files = {f for f in out.decode().split("\0") if f}
    return sum(os.path.getsize(os.path.join(repo, f)) for f in files if os.path.isfile(os.path.join(repo, f)))


def dir_bytes(d: str) -> int:
    return sum(os.path.getsize(os.path.join(d, x)) for x in os.listdir(d))


def part_sizes(total: int, room: int, last_room: int) -> list[int]:
    """Split `total` bytes into parts of at most `room` bytes, the last one at most `last_room`."""
    if room <= 0 or last_room <= 0:
        raise SystemExit(f"pack: the working tree leaves no room under the {CALL_LIMIT >> 20} MiB per-call limit")
    sizes = []
    while total > last_room:
        sizes.append(min(room, total))
        total -= sizes[-1]
    return sizes + [total]


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_answers(path: str) -> dict:
    """An answers file (answers.json or .json.gz) that lists its prompts, checked."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"pack: cannot read answers file {path}: {e}") from e
    if not isinstance(data, dict) or "train_prompts" not in data or "train" not in data \
            or len(data["train_prompts"]) != len(data["train"]) or "max_new_tokens" not in data:
        raise SystemExit(f"pack: {path} is not an answers file that lists its prompts "
                         "(train_prompts, train and max_new_tokens, as gpu_train writes them)")
    return data


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
    p.add_argument("--answers", default=None,
                   help="answers.json(.gz) returned by an earlier GPU run: its answered prompts join training")
    args = p.parse_args(argv)
    prior = read_answers(args.answers) if args.answers else None
    repo = os.getcwd()
    ensure_ignored(repo, args.out)
    shutil.rmtree(args.out, ignore_errors=True)
    b = os.path.join(args.out, "b")
    os.makedirs(b)
    target = args.target or default_target_path()
    cfg = PipelineConfig(n_templates=args.n_templates, n_eval=args.n_eval)
    prompts = prepare_prompts(load_tokenizer(target), cfg, args.spec_bench)
    with open(os.path.join(b, "prompts.json"), "w") as f:
        json.dump(prompts, f)
    wheels = glob.glob(os.path.join(args.wheel_dir, "gguf-*.whl")) if args.wheel_dir else []
    if not wheels:
        import gguf
        version = getattr(gguf, "__version__", None) or __import__("importlib.metadata").metadata.version("gguf")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", b, f"gguf=={version}"],
                       check=False)
    for w in wheels:
        shutil.copy(w, b)
    if prior is not None:
        with gzip.open(os.path.join(b, "answers.json.gz"), "wt") as f:
            json.dump(prior, f)
    room = CALL_LIMIT - tree_bytes(repo) - MARGIN
    extras = dir_bytes(b) + 4096  # + manifest
    sizes = part_sizes(os.path.getsize(target), room, room - extras)
    dirs = [os.path.join(args.out, f"a{i}") for i in range(len(sizes) - 1)] + [b]
    parts = {}
    with open(target, "rb") as f:
        for i, (d, n) in enumerate(zip(dirs, sizes)):
            os.makedirs(d, exist_ok=True)
            rel = f"{os.path.basename(d)}/target.part{i}"
            with open(os.path.join(args.out, rel), "wb") as out:
                out.write(f.read(n))
            parts[rel] = n
    manifest = {"gguf_name": os.path.basename(target), "gguf_sha256": sha256(target), "gguf_bytes": os.path.getsize(target),
                "parts": parts, "n_train": len(prompts["train"]), "n_eval": len(prompts["eval"])}
    if prior is not None:
        manifest["prior_answers"] = {"prompts": sum(a is not None for a in prior["train"]),
                                     "tokens": sum(len(a) for a in prior["train"] if a)}
    with open(os.path.join(b, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    mib = {d: round(dir_bytes(d) / 2 ** 20, 1) for d in dirs}
    print(json.dumps({"bundle": args.out, "MiB": mib, "room_per_call_MiB": round(room / 2 ** 20, 1), **manifest}, indent=1))
    for i, d in enumerate(dirs[:-1]):
        print(f"call {i + 1}: carry [{d}] and run  mkdir -p /tmp/mirror_rt_bundle && cp {d}/target.part{i} /tmp/mirror_rt_bundle/")
    print(f"call {len(dirs)}: carry [{b}] and run  bash mirror_rt/train/gpu_train.sh {args.out}")


if __name__ == "__main__":
    main()
