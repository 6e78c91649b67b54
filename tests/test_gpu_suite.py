"""bench/gpu_suite.sh runs only on a lent GPU, where a broken script costs scarce device time: its
syntax and its summary (fed a real systems CSV from a tiny CPU run) are checked here."""
import os
import subprocess
import sys

from helpers import ROOT, load_bench_script

SUITE = os.path.join(ROOT, "bench", "gpu_suite.sh")


def test_suite_parses():
    subprocess.run(["bash", "-n", SUITE], check=True)


def test_summary_prints_the_systems_rows(tmp_path):
    systems = load_bench_script("systems.py")
    systems.main(["--tiny", "--device", "cpu", "--lane", "inline", "--window", "3", "--kappa", "2",
                  "--acceptance", "0.5", "--containment", "0.5", "--csv", str(tmp_path / "systems_small_cpu_draft.csv")])
    script = f'source <(sed -n "/^summary() {{/,/^}}/p" "{SUITE}"); summary'
    out = subprocess.run(["bash", "-c", script], env=dict(os.environ, PY=sys.executable, RESULTS=str(tmp_path)),
                         check=True, capture_output=True, text=True).stdout
    assert "systems, CONTROLLED-ACCEPTANCE" in out and "draft on" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("tiny")]
    assert [r[2] for r in rows] == ["ar", "sd", "mirror"] and all(r[1] == "cpu" for r in rows)


def test_compiled_steps_dry_run(tmp_path):
    """The suite's compiled step on tiny CPU shapes (aot_eager: the same graphs without inductor's
    code generation): bench_step and compiled_e2e measure, compile, agree with eager, and the
    summary prints their rows."""
    step = load_bench_script("bench_step.py")
    rows = step.main(["--shape", "tiny", "--device", "cpu", "--backend", "aot_eager", "--tokens", "1", "--steps", "3",
                      "--warmup", "2", "--prompt-len", "8", "--csv", str(tmp_path / "bench_step.csv")])
    assert [r["mode"] for r in rows] == ["eager", "compiled"] and rows[1]["compiled"] and rows[1]["launches"] > 0
    e2e = load_bench_script("compiled_e2e.py")
    rows = e2e.main(["--tiny", "--device", "cpu", "--backend", "aot_eager", "--decoders", "ar", "sd", "--new-tokens", "16",
                     "--prompt-len", "8", "--no-hf", "--csv", str(tmp_path / "compiled_e2e.csv")])
    assert [(r["decoder"], r["mode"]) for r in rows] == [("ar", "eager"), ("ar", "compiled"), ("sd", "eager"),
                                                         ("sd", "compiled")]
    assert all(r["equals_ar"] for r in rows) and rows[1]["compiled"] and rows[3]["compiled"]
    script = f'source <(sed -n "/^summary() {{/,/^}}/p" "{SUITE}"); summary'
    out = subprocess.run(["bash", "-c", script], env=dict(os.environ, PY=sys.executable, RESULTS=str(tmp_path)),
                         check=True, capture_output=True, text=True).stdout
    assert "compiled end to end" in out and "one target step, eager vs compiled" in out
    assert len([line for line in out.splitlines() if line.strip().startswith("tiny")]) == 6
