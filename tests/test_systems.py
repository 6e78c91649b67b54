"""bench/systems.py (controlled acceptance) on tiny shapes on the CPU: the oracle controls what it
says it controls, outputs stay the target's, rows reach the CSV as they are measured, and the
time budget skips (and names) the rows it cannot start."""
import csv

import pytest
from helpers import load_bench_script


@pytest.fixture(scope="module")
def systems():
    return load_bench_script("systems.py")


def test_rows_oracle_and_csv(systems, tmp_path):
    path = tmp_path / "systems.csv"
    rows = systems.main(["--tiny", "--device", "cpu", "--lane", "inline", "--window", "3", "--kappa", "2",
                         "--acceptance", "1.0", "0.0", "--containment", "1.0", "--csv", str(path)])
    kinds = [(r["decoder"], r["acceptance"], r["containment"]) for r in rows]
    assert kinds == [("ar", None, None), ("sd", 1.0, None), ("mirror", 1.0, 1.0), ("sd", 0.0, None),
                     ("mirror", 0.0, 1.0)]
    assert all(r["equals_ar"] for r in rows[1:])
    sd_all, mirror_all, sd_none, mirror_none = rows[1:]
    # Acceptance 1: every full window is accepted; containment 1: every correction was rolled out.
    assert sd_all["mean_accepted"] >= 2.5 and mirror_all["mean_accepted"] >= 2.5
    assert mirror_all["fallback_rate"] == 0.0 and mirror_all["reuse_rate"] > 0.8
    # Acceptance 0: nothing is accepted, and the correction (the true token) is still contained.
    assert sd_none["mean_accepted"] == 0.0 and mirror_none["mean_accepted"] == 0.0
    assert mirror_none["fallback_rate"] == 0.0
    with open(path) as f:
        written = list(csv.DictReader(f))
    assert [w["decoder"] for w in written] == [r["decoder"] for r in rows]
    assert all(w["regime"] == "CONTROLLED-ACCEPTANCE" for w in written)


def test_time_budget_skips_and_names_rows(systems, tmp_path, capsys):
    rows = systems.main(["--tiny", "--device", "cpu", "--budget-s", "1e-9", "--csv", str(tmp_path / "s.csv")])
    assert rows == []
    assert "# skipped (time budget): tiny: all rows" in capsys.readouterr().out


def test_fallback_and_draft_layers_reach_the_decoders(systems):
    # Containment 0: every step misses. "recompute" then rolls out a fresh window (its own phase);
    # "exit" starts the next step at once and never does.
    common = ["--tiny", "--device", "cpu", "--lane", "inline", "--window", "3", "--kappa", "2",
              "--acceptance", "0.5", "--containment", "0.0", "--draft-layers", "2"]
    recompute = systems.main(common + ["--fallback", "recompute"])[-1]
    exit_rows = systems.main(common + ["--fallback", "exit"])
    assert recompute["decoder"] == exit_rows[-1]["decoder"] == "mirror"
    assert "fallback=" in recompute["phase_ms_per_step"]
    assert "fallback=" not in exit_rows[-1]["phase_ms_per_step"]
    assert all(r["equals_ar"] for r in exit_rows[1:])
    assert systems.build("tiny-draft", 512, "cpu", systems.torch.float32, seed=0, layers=2).num_layers == 2


def test_ranked_oracle_rolls_out_the_correction(systems):
    # The oracle's exit is certain of the true token, so "ranked" rolls out (about) the one branch
    # that is the correction: with containment 1 nearly every step reuses, with few branches.
    rows = systems.main(["--tiny", "--device", "cpu", "--lane", "inline", "--window", "3", "--kappa", "1",
                         "--branch-policy", "ranked", "--min-branch-prob", "0.05",
                         "--acceptance", "0.5", "--containment", "1.0"])
    mirror = rows[-1]
    assert mirror["decoder"] == "mirror" and mirror["equals_ar"]
    assert mirror["reuse_rate"] > 0.8 and mirror["fallback_rate"] == 0.0
    assert 0 < mirror["branches_per_step"] <= 1.5  # per_position would roll out one per position: 4


def test_draft_device_is_named_in_every_row(systems):
    # Beside a CUDA target, --draft-device cpu gives the draft a device of its own (Mirror-SD's
    # premise; measured only on a lent GPU). Here both are the CPU: the flag's path and the column.
    rows = systems.main(["--tiny", "--device", "cpu", "--draft-device", "cpu", "--lane", "inline", "--window", "3",
                         "--kappa", "2", "--acceptance", "0.5", "--containment", "0.5"])
    assert [r["draft_device"] for r in rows] == ["cpu"] * 3
    assert all(r["equals_ar"] for r in rows[1:])
