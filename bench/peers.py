"""Our decoders beside llama.cpp and Hugging Face ``generate`` on the same model, prompts and threads.

    python bench/peers.py [--target FILE.gguf] [--prompts 3] [--max-new-tokens 128] [--threads 2]
                          [--csv bench/results/peers.csv]

Engines, one process, interleaved per prompt (a change in machine load hits every engine alike):
``llama.cpp`` (llama-cpp-python on the same GGUF; skipped with a note when it is not installed: it
is an optional extra, never needed by the install or CI), ``hf`` (transformers loading the same GGUF,
dequantized to float32, ``generate`` greedy), ours on the quantized file as loaded (``ar``, ``sd``,
``mirror`` and ``auto`` when ``mirror_rt.AutoDecoder`` exists) and ``ar-fp32`` (our AR on the
dequantized model: what the quantized kernels gain). Prompts: held-out Spec-Bench questions (the
evaluation split, one per task family, ``mirror_rt.specbench.load_questions``) in the chat template.
Greedy outputs are compared token for token with our quantized AR: SD / Mirror / auto must agree on
every token (lossless); engines with other arithmetic report how many leading tokens agree.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch

ENGINES = ("llama.cpp", "hf", "ar-fp32", "ar", "sd", "mirror", "auto")


def agreeing(a: list[int], b: list[int]) -> int:
    """Leading tokens two greedy outputs share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def held_out_prompts(path: str, n: int) -> list[str]:
    from mirror_rt.specbench import load_questions

    return [q["turns"][0] for q in load_questions(path, limit=1, split="eval")][:n]


def _ours(path, threads, names):
    """{engine: generate(ids, n, eos) -> token list} for our decoders (the CLI's own construction)."""
    from mirror_rt import cli
    from mirror_rt.decoders import AutoregressiveDecoder
    from mirror_rt.models import load_model

    args = SimpleNamespace(target=path, draft=None, device="cpu", threads=threads, exit_head=None, decoder=None,
                           window=None, kappa=None, exit_layer=None, lane=None)
    target, draft, tok, _ = cli.load_pair(args)
    runs = {}
    if "ar-fp32" in names:
        dense = AutoregressiveDecoder(load_model(path, quant="dequantize"))
        runs["ar-fp32"] = dense
    for name in ("ar", "sd", "mirror", "auto"):
        if name in names:
            try:
                runs[name] = cli.make_decoder(name, target, draft, args)
            except (ImportError, AttributeError) as e:  # auto before AutoDecoder exists
                print(f"# {name}: skipped ({e})", file=sys.stderr)

    def wrap(dec):
        return lambda ids, n, eos: dec.generate(ids, n, eos_token_id=eos).tokens[0].tolist()

    return {k: wrap(v) for k, v in runs.items()}, tok, runs


def _hf(path, threads):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                                              gguf_file=os.path.basename(path), dtype=torch.float32)
    model.eval()

    def run(ids, n, eos):
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=eos[0])
        return out[0, ids.shape[1]:].tolist()

    return run


def _llama_cpp(path, threads, context):
    from llama_cpp import Llama  # optional extra: ImportError skips its rows

    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=context, verbose=False)

    def run(ids, n, eos):
        llm.reset()
        out = []
        for t in llm.generate(ids[0].tolist(), top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
            if t in eos or len(out) >= n:
                break
            out.append(int(t))
        return out

    return run


def main(argv=None) -> list[dict]:
    from mirror_rt import default
    from mirror_rt.prompts import SPEC_BENCH_DEFAULT, SPEC_BENCH_ENV
    from mirror_rt.tokenizer import encode_chat

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", default=None, help="a GGUF (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    p.add_argument("--prompt-file", default=os.environ.get(SPEC_BENCH_ENV, SPEC_BENCH_DEFAULT))
    p.add_argument("--csv", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = args.target or default.default_target_path()
    runs, tok, decoders = _ours(path, args.threads, args.engines)
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    notes = []
    for name, make in (("hf", lambda: _hf(path, args.threads)),
                       ("llama.cpp", lambda: _llama_cpp(path, args.threads, 4096))):
        if name in args.engines:
            try:
                runs[name] = make()
            except ImportError as e:
                notes.append(f"{name}: skipped, not installed ({e.name or e}); pip install llama-cpp-python")
    order = [e for e in ENGINES if e in runs]
    prompts = [encode_chat(tok, text) for text in held_out_prompts(args.prompt_file, args.prompts)]
    for name in order:  # warm-up, not timed
        runs[name](prompts[0], 4, eos)
    rows = []
    for i, ids in enumerate(prompts):
        reference = None
        for name in order:
            t0 = time.perf_counter()
            tokens = runs[name](ids, args.max_new_tokens, eos)
            seconds = time.perf_counter() - t0
            if name == "ar":
                reference = tokens
            rows.append(dict(prompt=i, engine=name, threads=args.threads, new_tokens=len(tokens), seconds=seconds,
                             tok_s=len(tokens) / seconds, tokens=tokens))
        for r in rows[-len(order):]:
            r["agree"] = agreeing(r.pop("tokens"), reference) if reference is not None else None
    for dec in decoders.values():
        if hasattr(dec, "close"):
            dec.close()
    summary = _summary(rows, order)
    print(f"# {os.path.basename(path)}, {len(prompts)} held-out Spec-Bench prompts x {args.max_new_tokens} tokens, "
          f"greedy, {args.threads} threads")
    for n in notes:
        print(f"# {n}")
    print(f"{'engine':10} {'tok/s (all)':>11} {'(median)':>9} {'x llama.cpp':>11} {'x ar-fp32':>9} {'agree with ar':>14}")
    for s in summary:
        print(f"{s['engine']:10} {s['pooled_tok_s']:11.1f} {s['tok_s']:9.1f} {s['vs_llama_cpp']:>11} {s['vs_ar_fp32']:>9} "
              f"{s['agree']:>14}")
    if args.csv:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return summary


def _summary(rows, order) -> list[dict]:
    """Per engine: the median of the per-prompt rates, and all tokens over all seconds (prompts of
    very different lengths make the median noisy; the pooled rate weighs each by its time)."""
    med = {e: statistics.median(r["tok_s"] for r in rows if r["engine"] == e) for e in order}
    pooled = {e: sum(r["new_tokens"] for r in rows if r["engine"] == e) /
              sum(r["seconds"] for r in rows if r["engine"] == e) for e in order}
    out = []
    for e in order:
        mine = [r for r in rows if r["engine"] == e]
        agree = sum(r["agree"] or 0 for r in mine)
        total = sum(r["new_tokens"] for r in mine)
        out.append(dict(engine=e, tok_s=med[e], pooled_tok_s=pooled[e],
                        vs_llama_cpp=f"{pooled[e] / pooled['llama.cpp']:.2f}x" if "llama.cpp" in pooled else "-",
                        vs_ar_fp32=f"{pooled[e] / pooled['ar-fp32']:.2f}x" if "ar-fp32" in pooled else "-",
                        agree=f"{agree}/{total}"))
    return out


if __name__ == "__main__":
    main()
