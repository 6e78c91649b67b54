#!/usr/bin/env bash
# One script for a GPU machine: install if needed, GPU tests, kernel benchmarks, summary last.
#
#   bash bench/gpu_suite.sh            # results under ${OUT:-bench/results}
#
# Steps are a list (name, command); append yours to STEPS. Every step runs even if an earlier
# one failed, its command and exit status are printed, and the script exits non-zero if any
# step failed. The whole suite fits one device call: a step starts only while SUITE_BUDGET_S
# (default 530 s) has time left, and runs at most that long; steps come in priority order.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS="${OUT:-bench/results}"
mkdir -p "$RESULTS"
PY="${PYTHON:-python}"

install_if_needed() {
  if "$PY" -c "import mirror_rt.triton_kernels.tree_attention" 2>/dev/null; then
    echo "mirror_rt already importable: $("$PY" -c 'import mirror_rt; print(mirror_rt.__file__)')"
    return 0
  fi
  # No network on the lent machines: build with what is installed, never pull torch.
  "$PY" -m pip install --no-build-isolation --no-deps -e . || "$PY" -m pip install --no-build-isolation --no-deps .
}

env_report() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
}

run_systems() {
  # The full log (with an AR profile per target) goes to a file; the table lines to stdout.
  # --budget-s: start no row after 140 s, so the rows measured so far survive the 170 s limit.
  timeout 170 "$PY" bench/systems.py --profile --budget-s 140 --csv "$RESULTS/systems.csv" > "$RESULTS/systems.log" 2>&1
  local rc=$?
  grep -E "^(#| +(llama|qwen|tiny))|FAILED|skipped" "$RESULTS/systems.log" | tail -40
  return $rc
}

run_systems_small() {
  # The embedded default's shapes with the draft on the GPU (a stream beside the target) and on
  # the host CPU (a device of its own: Mirror-SD's premise). Mirror's best case: ranked branches.
  local common="--targets smollm2-135m --draft smollm2-draft --window 3 --kappa 1 --branch-policy ranked
    --min-branch-prob 0.05 --acceptance 0.8 1.0 --containment 0.9 --new-tokens 64 --budget-s 25"
  local rc=0
  timeout 40 "$PY" bench/systems.py $common --csv "$RESULTS/systems_small_gpu_draft.csv" \
    > "$RESULTS/systems_small.log" 2>&1 || rc=$?
  timeout 40 "$PY" bench/systems.py $common --draft-device cpu --lane process \
    --csv "$RESULTS/systems_small_cpu_draft.csv" >> "$RESULTS/systems_small.log" 2>&1 || rc=$?
  grep -E "^(#| +smollm2)|FAILED|skipped" "$RESULTS/systems_small.log" | grep -v "^# reproduce"
  return $rc
}

run_compiled_e2e() {
  # AR, SD and Mirror-SD on the Llama-3.1-8B shape (random bf16 weights, controlled acceptance),
  # eager against compiled (CUDA graphs), HF generate (static cache + torch.compile) as the peer;
  # then one step of the target eager against compiled: host/device time and launches.
  local rc=0
  timeout 230 "$PY" bench/compiled_e2e.py --shape llama3-8b --new-tokens 64 --budget-s 170 \
    --csv "$RESULTS/compiled_e2e.csv" > "$RESULTS/compiled_e2e.log" 2>&1 || rc=$?
  grep -E "^ +llama3|FAILED|skipped" "$RESULTS/compiled_e2e.log"
  timeout 60 "$PY" bench/bench_step.py --shape llama3-8b --tokens 1 5 --steps 10 \
    --csv "$RESULTS/bench_step.csv" > "$RESULTS/bench_step.log" 2>&1 || rc=$?
  grep -E "^ +llama3|Error" "$RESULTS/bench_step.log"
  return $rc
}

summary() {
  "$PY" - "$RESULTS" <<'EOF'
import csv, os, sys
res = sys.argv[1]
def rows(name):
    path = os.path.join(res, name)
    return list(csv.DictReader(open(path))) if os.path.exists(path) else []
ta = rows("tree_attention.csv")
if ta:
    print("tree_attention (us; speedup = sdpa/triton; bw = fraction of copy bandwidth)")
    print(f"{'B':>3} {'T':>3} {'S':>6} {'sdpa':>9} {'triton':>9} {'speedup':>7} {'bw':>6} {'err':>7}")
    for r in ta:
        if r["provider"] != "triton":
            continue
        sd = next((s for s in ta if s["provider"] == "sdpa" and all(s[k] == r[k] for k in ("B", "T", "S"))), {})
        print(f"{r['B']:>3} {r['T']:>3} {r['S']:>6} {sd.get('us', ''):>9} {r['us']:>9} "
              f"{r.get('speedup_vs_sdpa', ''):>7} {r.get('bw_frac', ''):>6} {r.get('err', ''):>7}")
va = rows("verify_accept.csv")
if va:
    print("verify_accept (us; speedup = reference/triton; same = equals the reference)")
    print(f"{'mode':>9} {'B':>3} {'T':>3} {'V':>6} {'ref':>10} {'triton':>9} {'speedup':>8} {'bw':>6} {'same':>5}")
    for r in va:
        if r["provider"] != "triton":
            continue
        rf = next((s for s in va if s["provider"] == "reference" and all(s[k] == r[k] for k in ("mode", "B", "T", "V"))), {})
        print(f"{r['mode']:>9} {r['B']:>3} {r['T']:>3} {r['V']:>6} {rf.get('us', ''):>10} {r['us']:>9} "
              f"{r.get('speedup_vs_reference', ''):>8} {r.get('bw_frac', ''):>6} {r.get('same', ''):>5}")
ce = rows("compiled_e2e.csv")
if ce:
    print("compiled end to end, CONTROLLED-ACCEPTANCE (speedup vs eager AR in the same run; warm = first run, compiling)")
    print(f"{'target':>10} {'decoder':>9} {'mode':>8} {'acc':>4} {'tok/s':>8} {'speedup':>7} {'warm_s':>6} {'==AR':>5} {'compiled':>8}")
    for r in ce:
        print(f"{r['target']:>10} {r['decoder']:>9} {r['mode']:>8} {r['acceptance'] or '':>4} {r['tok_s']:>8} "
              f"{r['speedup_vs_ar']:>7} {r['warm_s']:>6} {r['equals_ar']:>5} {r['compiled']:>8}")
bs = rows("bench_step.csv")
if bs:
    print("one target step, eager vs compiled (ms per step; launches per step)")
    print(f"{'shape':>10} {'mode':>8} {'T':>3} {'step_ms':>8} {'host_ms':>8} {'device_ms':>9} {'launches':>8}")
    for r in bs:
        print(f"{r['shape']:>10} {r['mode']:>8} {r['T']:>3} {r['step_ms']:>8} {r['host_ms']:>8} {r['device_ms']:>9} {r['launches']:>8}")
sy = rows("systems.csv") + rows("systems_small_gpu_draft.csv") + rows("systems_small_cpu_draft.csv")
if sy:
    print("systems, CONTROLLED-ACCEPTANCE (random weights + oracle; speedup vs AR in the same run)")
    print(f"{'target':>12} {'draft on':>8} {'decoder':>7} {'acc':>4} {'cont':>4} {'step_ms':>8} {'tok/s':>7} {'speedup':>7} "
          f"{'accepted':>8} {'reuse':>5} {'fallbk':>6} {'overlap':>7} {'==AR':>5}")
    for r in sy:
        print(f"{r['target']:>12} {r.get('draft_device', ''):>8} {r['decoder']:>7} {r['acceptance']:>4} {r['containment']:>4} {r['step_ms']:>8} "
              f"{r['tok_s']:>7} {r['speedup_vs_ar']:>7} {r['mean_accepted']:>8} {r['reuse_rate']:>5} "
              f"{r['fallback_rate']:>6} {r['overlap_fraction']:>7} {r['equals_ar']:>5}")
if not ta and not va and not sy and not ce and not bs:
    print("no benchmark CSVs found under", res)
EOF
}

# name | command (run with bash -c; keep each one line)
STEPS=(
  "env|env_report"
  "install|install_if_needed"
  "compiled end to end (8B)|run_compiled_e2e"
  "gpu tests|set -o pipefail; timeout 110 $PY -m pytest -m gpu -q -p no:cacheprovider tests/test_tree_attention.py tests/test_verify_accept.py tests/test_mirror_gpu.py tests/test_compile.py 2>&1 | tee $RESULTS/gpu_tests.log"
  "bench tree_attention|timeout 100 $PY bench/bench_tree_attention.py --csv $RESULTS/tree_attention.csv"
  "bench verify_accept|timeout 70 $PY bench/bench_verify_accept.py --csv $RESULTS/verify_accept.csv"
  "bench systems (controlled acceptance)|run_systems"
  "bench systems, default's shapes|run_systems_small"
)

declare -a STATUS
export -f install_if_needed env_report run_compiled_e2e run_systems run_systems_small
export RESULTS
export PY
BUDGET="${SUITE_BUDGET_S:-530}"
start=$SECONDS
for step in "${STEPS[@]}"; do
  name="${step%%|*}"
  cmd="${step#*|}"
  left=$((BUDGET - (SECONDS - start)))
  echo
  if [ "$left" -lt 15 ]; then
    echo "=== [$name] skipped: the suite's ${BUDGET} s budget is spent"
    STATUS+=("$(printf '%-24s skipped (budget)' "$name")")
    continue
  fi
  echo "=== [$name] \$ $cmd"
  t0=$SECONDS
  timeout "$left" bash -c "$cmd"
  rc=$?
  STATUS+=("$(printf '%-24s rc=%-3s %4ss' "$name" "$rc" "$((SECONDS - t0))")")
  [ "$rc" -ne 0 ] && echo "!!! step [$name] FAILED with exit status $rc"
done

echo
echo "=== summary (total $((SECONDS - start))s, results in $RESULTS)"
failed=0
for s in "${STATUS[@]}"; do
  echo "  $s"
  [[ "$s" == *"rc=0 "* || "$s" == *"skipped (budget)"* ]] || failed=1
done
summary
if [ "$failed" -ne 0 ]; then
  echo "!!! some steps FAILED (see above)"
  exit 1
fi
