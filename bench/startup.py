"""Start-up of the command line with the embedded default: import, load, first token, peak memory.

Each run is a fresh process, as a user's command is:

- ``import``: ``import torch``, then ``import mirror_rt`` and its CLI on top (the budget is 0.3 s);
- ``generate``: ``mirror-rt generate PROMPT --max-new-tokens 1`` (the default decoder, and
  ``--decoder ar``), wall time of the whole process, the load and first-token times it prints, and
  its peak RSS (``wait4``'s ``ru_maxrss``);
- ``stages``: one process timing each stage in turn (import torch, import mirror_rt, the GGUF
  header, the target, the tokenizer, the draft and exit head, the first token of an AR generate).

"cold" runs get an empty tokenizer cache (``MIRROR_RT_CACHE`` set to a new temporary folder),
"warm" runs the cache the cold run left. The default's tokenizer is built from the GGUF's own
vocabulary, so it uses no cache and cold equals warm for it; a GGUF whose tokenizer is converted
by transformers (``--target``) shows the difference. The OS page cache stays warm either way (the
GGUF and the libraries stay in memory between runs): a start after a reboot also reads them from
disk. With ``llama_cpp`` (llama-cpp-python) importable, its load and first token on the same file
are measured as the peer; without it that row is skipped with a note.

    python bench/startup.py                       # 3 warm runs of each, 1 cold
    python bench/startup.py --runs 5 --json out.json
    python bench/startup.py --target model.gguf   # another GGUF (its tokenizer may use the cache)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

_IMPORT_PROBE = """
import json, time
t0 = time.perf_counter(); import torch
t1 = time.perf_counter(); import mirror_rt, mirror_rt.cli; mirror_rt.cli.build_parser()
t2 = time.perf_counter()
print(json.dumps({"torch_s": t1 - t0, "mirror_rt_s": t2 - t1}))
"""

_STAGES_PROBE = """
import json, sys, time
marks = [("start", time.perf_counter())]
def mark(name): marks.append((name, time.perf_counter()))
import torch; mark("import torch")
import mirror_rt.cli; mark("import mirror_rt")
from mirror_rt import default
from mirror_rt.models import load_model
from mirror_rt.models.gguf_header import read_gguf_header
from mirror_rt.tokenizer import encode_chat, load_tokenizer
path = sys.argv[1] or default.default_target_path()
read_gguf_header(path); mark("GGUF header")
target = load_model(path); mark("target")
tok = load_tokenizer(path); mark("tokenizer")
if not sys.argv[1]:
    default.load_default_draft(target); default.load_default_exit_head(target); mark("draft + exit head")
from mirror_rt.decoders import AutoregressiveDecoder
dec = AutoregressiveDecoder(target); mark("import decoders")
dec.generate(encode_chat(tok, sys.argv[2]), 1, eos_token_id=tok.eos_token_id); mark("first token (AR)")
print(json.dumps({b[0]: b[1] - a[1] for a, b in zip(marks, marks[1:])}))
"""

_LLAMA_CPP_PROBE = """
import json, resource, sys, time
t0 = time.perf_counter()
from llama_cpp import Llama
t1 = time.perf_counter()
llm = Llama(model_path=sys.argv[1], n_ctx=512, verbose=False)
t2 = time.perf_counter()
prompt = "<|im_start|>user\\n" + sys.argv[2] + "<|im_end|>\\n<|im_start|>assistant\\n"
llm.create_completion(prompt, max_tokens=1, temperature=0.0)
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_token_s": t3 - t2,
                  "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_child(argv: list[str], env: dict) -> dict:
    """Run argv; {"wall_s", "maxrss_mb", "returncode", "stdout", "stderr"} for that process alone."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        return {"wall_s": wall, "maxrss_mb": usage.ru_maxrss / 1024, "returncode": proc.returncode,
                "stdout": out.read(), "stderr": err.read()}


def parse_cli_times(stderr: str) -> dict:
    """The load and first-token times ``mirror-rt generate`` prints."""
    found = {}
    if m := re.search(r"loaded target in ([\d.]+) s, tokenizer in ([\d.]+) s", stderr):
        found["target_s"], found["tokenizer_s"] = map(float, m.groups())
    if m := re.search(r"load ([\d.]+) s, first token ([\d.]+) s", stderr):
        found["load_s"], found["first_token_s"] = map(float, m.groups())
    return found


def generate_run(args, decoder: str | None, cache: str) -> dict:
    argv = [sys.executable, "-m", "mirror_rt.cli", "generate", args.prompt, "--max-new-tokens", "1"]
    argv += ["--decoder", decoder] if decoder else []
    argv += ["--target", args.target] if args.target else []
    res = run_child(argv, {**os.environ, "MIRROR_RT_CACHE": cache})
    if res["returncode"] != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{res['stderr'][-2000:]}")
    return {"wall_s": res["wall_s"], "maxrss_mb": res["maxrss_mb"], **parse_cli_times(res["stderr"])}


def python_probe(code: str, *argv: str, env=None) -> dict:
    res = run_child([sys.executable, "-c", code, *argv], env or dict(os.environ))
    if res["returncode"] != 0:
        raise RuntimeError(res["stderr"][-2000:])
    return {**json.loads(res["stdout"].strip().splitlines()[-1]), "wall_s": res["wall_s"],
            "maxrss_mb": res["maxrss_mb"]}


def median_row(runs: list[dict]) -> dict:
    keys = [k for k in runs[0] if all(k in r for r in runs)]
    return {k: statistics.median(r[k] for r in runs) for k in keys}


def fmt(row: dict, keys) -> str:
    return "  ".join(f"{k} {row[k]:.2f}" if k in row else f"{k} -" for k in keys)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="warm runs of each measurement (median reported)")
    p.add_argument("--prompt", default="hi")
    p.add_argument("--target", default=None, help="a GGUF or HF directory instead of the embedded default")
    p.add_argument("--decoders", default="default,ar",
                   help="comma list: 'default' (the CLI's default decoder) and/or ar, sd, mirror")
    p.add_argument("--json", default=None, help="write every measurement here")
    args = p.parse_args(argv)
    from mirror_rt.default import default_target_path

    gguf = args.target or default_target_path()
    report = {"target": gguf, "cpu_count": os.cpu_count(), "runs": args.runs}
    print(f"start-up of mirror-rt, target {gguf}, {os.cpu_count()} CPUs, median of {args.runs} warm runs "
          f"(OS page cache warm throughout)")

    imports = [python_probe(_IMPORT_PROBE) for _ in range(args.runs)]
    report["import"] = imports
    row = median_row(imports)
    print(f"import:   torch {row['torch_s']:.2f} s, then mirror_rt + CLI {row['mirror_rt_s']:.2f} s (budget 0.30 s)")

    stages = [python_probe(_STAGES_PROBE, args.target or "", args.prompt) for _ in range(args.runs)]
    report["stages"] = stages
    row = median_row(stages)
    print("stages:   " + ", ".join(f"{k} {v:.2f} s" for k, v in row.items() if k not in ("wall_s", "maxrss_mb")))

    keys = ("wall_s", "load_s", "target_s", "tokenizer_s", "first_token_s", "maxrss_mb")
    report["generate"] = {}
    for decoder in [d.strip() for d in args.decoders.split(",") if d.strip()]:
        with tempfile.TemporaryDirectory() as cache:
            cold = generate_run(args, None if decoder == "default" else decoder, cache)
            warm = [generate_run(args, None if decoder == "default" else decoder, cache) for _ in range(args.runs)]
        report["generate"][decoder] = {"cold": cold, "warm": warm}
        label = f"generate --decoder {decoder}" if decoder != "default" else "generate (default decoder)"
        print(f"{label}, --max-new-tokens 1 (s; peak RSS MB):")
        print(f"  cold cache: {fmt(cold, keys)}")
        print(f"  warm cache: {fmt(median_row(warm), keys)}")

    try:
        import importlib.util

        has_llama_cpp = importlib.util.find_spec("llama_cpp") is not None
    except ValueError:
        has_llama_cpp = False
    if has_llama_cpp and gguf.endswith(".gguf"):
        peer = [python_probe(_LLAMA_CPP_PROBE, gguf, args.prompt) for _ in range(args.runs)]
        report["llama_cpp"] = peer
        keys = ("import_s", "load_s", "first_token_s", "wall_s", "maxrss_mb")
        print(f"llama.cpp (llama_cpp): {fmt(median_row(peer), keys)}")
    else:
        print("llama.cpp: skipped (llama_cpp is not importable here: pip install llama-cpp-python)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
