"""``mirror-rt train-exit`` and ``mirror-rt train-draft`` (registered into mirror_rt.cli).

Both share the data step: the train-allowed prompts (``mirror_rt.train.data``) and prompts the
target writes itself (``mirror_rt.train.self_prompts``) are answered
greedily by the target, cached in ``<work-dir>/answers.json`` (so the second command and a
resumed run reuse them), and each command trains its part with a progress bar, a loss-curve
PNG, a resumable checkpoint in the work dir and a fixed seed, on CUDA when present.

    mirror-rt train-exit  --preset cpu --out-dir runs/cpu      # exit_head.safetensors
    mirror-rt train-draft --preset cpu --out-dir runs/cpu      # draft.safetensors
"""
from __future__ import annotations

import json
import os
import sys


def _common(p):
    p.add_argument("--target", help="target checkpoint dir or .gguf (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--preset", default=None, choices=["cpu", "gpu", "tiny"],
                   help="scale preset (default: gpu when CUDA is present, else cpu)")
    p.add_argument("--out-dir", default="mirror_rt_train", help="where the weights, curves and metrics.json go")
    p.add_argument("--work-dir", default=None, help="answers cache + checkpoints (default: OUT_DIR/work)")
    p.add_argument("--prompts-json", default=None, help="prepared prompt ids (mirror_rt.train.pack's prompts.json)")
    p.add_argument("--spec-bench", default=None, help="Spec-Bench question.jsonl (train-allowed half is used)")
    p.add_argument("--n-templates", type=int, default=None, help="template prompts added to the Spec-Bench ones")
    p.add_argument("--self-prompts", type=int, default=None,
                   help="user prompts the target writes itself (Magpie-style; 0: none)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="length of the target's answers")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--time-limit", type=float, default=None, help="seconds of training at most")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)


def _config(args, part: str):
    import torch

    from mirror_rt.train.pipeline import PipelineConfig

    preset = args.preset or ("gpu" if torch.cuda.is_available() else "cpu")
    ov = dict(n_templates=args.n_templates, n_self_prompts=args.self_prompts, max_new_tokens=args.max_new_tokens,
              device=args.device, seed=args.seed)
    if part == "exit":
        layers = [args.exit_layer] + [int(x) for x in (args.also_layers or "").split(",") if x]
        ov.update(exit_layers=layers if args.exit_layer else None, exit_rank=args.rank, exit_steps=args.steps,
                  exit_time=args.time_limit, exit_act=args.act)
    else:
        ov.update(draft_layers=args.layers, n_streams=args.n_streams, stream_layers=args.stream_layers,
                  draft_vocab=args.draft_vocab, draft_kd=args.kd, draft_steps=args.steps, draft_time=args.time_limit,
                  draft_batch=args.batch_size, draft_epochs=args.epochs, draft_val=args.val_prompts,
                  draft_export_quant=args.export_quant)
    return PipelineConfig.preset(preset, **ov)


def _run(args, part: str):
    import torch

    from mirror_rt.train.pipeline import prepare_prompts, run_pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = _config(args, part)
    if args.target:
        target = args.target
    else:
        from mirror_rt.default import default_target_path
        target = default_target_path()
    work = args.work_dir or os.path.join(args.out_dir, "work")
    os.makedirs(work, exist_ok=True)
    if args.prompts_json:
        with open(args.prompts_json) as f:
            prompts = json.load(f)
    else:
        cached = os.path.join(work, "prompts.json")
        if os.path.isfile(cached):
            with open(cached) as f:
                prompts = json.load(f)
        else:
            from mirror_rt.tokenizer import load_tokenizer
            prompts = prepare_prompts(load_tokenizer(target), cfg, args.spec_bench)
            with open(cached, "w") as f:
                json.dump(prompts, f)
    print(f"[{part}] {len(prompts['train'])} training prompts, {len(prompts['eval'])} held-out prompts; "
          f"preset config: {cfg}", file=sys.stderr)
    m = run_pipeline(target, prompts, cfg, args.out_dir, work, parts=(part,))
    print(json.dumps(m.get(part, {}), indent=1)[:3000])


def cmd_train_exit(args):
    _run(args, "exit")


def cmd_train_draft(args):
    _run(args, "draft")


def register(sub):
    e = sub.add_parser("train-exit", help="train an exit-head adapter (KL to the target's final distribution)")
    _common(e)
    e.add_argument("--exit-layer", type=int, default=None, help="l_e of the shipped head (default 15)")
    e.add_argument("--also-layers", default=None, help="comma list of more layers to train and report")
    e.add_argument("--rank", type=int, default=None)
    e.add_argument("--act", default=None, choices=["silu", "linear"])
    e.set_defaults(func=cmd_train_exit)
    d = sub.add_parser("train-draft", help="distil a Speculative Streaming draft (SS loss, optional KL)")
    _common(d)
    d.add_argument("--layers", type=int, default=None, help="draft layers of its own")
    d.add_argument("--n-streams", type=int, default=None)
    d.add_argument("--stream-layers", type=int, default=None, help="top layers with multi-stream attention")
    d.add_argument("--draft-vocab", type=int, default=None, help="reduced draft vocabulary size (0: full)")
    d.add_argument("--kd", type=float, default=None, help="weight of the KL-to-target term (0: CE only)")
    d.add_argument("--batch-size", type=int, default=None)
    d.add_argument("--export-quant", default=None, choices=["q8_0", "q4_0"],
                   help="write the draft's linears as GGUF blocks (smaller file; loaded as they are beside a quantized target)")
    d.add_argument("--epochs", type=float, default=None,
                   help="at most this many passes over the answers (gpu preset: 6; more memorises them)")
    d.add_argument("--val-prompts", type=int, default=None,
                   help="training prompts held out to pick the best step by greedy agreement (0: keep the last)")
    d.set_defaults(func=cmd_train_draft)
