#!/usr/bin/env bash
# One-shot GPU training of the embedded default's exit head + Speculative Streaming draft.
#
# Here (CPU machine, repo root), once:   python -m mirror_rt.train.pack [--answers bench/runs/<last GPU run>/answers.json.gz]
#     (--answers: the answers an earlier run returned; those prompts are not answered again and
#     join training, so the draft's data grows from run to run. Use a new --set seed=N per run so
#     that the target writes new prompts of its own.)
#     It splits the target GGUF into .gpu_bundle/a0, a1, ..., b so that each device call (working
#     tree included) stays under 64 MiB, and prints the calls. With 30 MB of tracked assets that is:
# Device calls 1..k-1 (carry [".gpu_bundle/aI"]), back to back on the same warm machine:
#     mkdir -p /tmp/mirror_rt_bundle && cp .gpu_bundle/aI/target.partI /tmp/mirror_rt_bundle/
# Device call k (carry [".gpu_bundle/b"]):
#     bash mirror_rt/train/gpu_train.sh .gpu_bundle --budget 350
#     (time limits scale with --budget/300: self-written prompts 40 s, answers 200 s, exit 40 s,
#     draft 60 s, at most 6 epochs, keeping the step that agrees best with 64 held-out training
#     prompts; with loading and evaluation --budget 350 should end in about 8 minutes, under the
#     10-minute call limit)
# A further call on the same machine reuses /tmp/mirror_rt_work: it answers the prompts the first
# call had no time for (gen_time), then resumes both trainings from their checkpoints, e.g.
# --budget 300 --set exit_time=25.
# Files come back from $OUT: exit_head.safetensors, draft.safetensors, draft.1.safetensors,
# metrics.json, exit_loss.png, draft_loss.png, answers.json.gz, self_prompts.json, log.txt (9 files,
# each < 16 MB). Keep answers.json.gz under bench/runs/ for the next run's pack --answers.
set -uo pipefail
BUNDLE=${1:-.gpu_bundle}
shift || true
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if ! python3 -c "import gguf" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/mirror_rt_site "$BUNDLE"/b/gguf-*.whl \
        || { echo "gpu_train.sh: cannot install the gguf wheel from $BUNDLE/b"; exit 1; }
    export PYTHONPATH=/tmp/mirror_rt_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -m mirror_rt.train.gpu_train --bundle "$BUNDLE" --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
exit "${PIPESTATUS[0]}"
