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
