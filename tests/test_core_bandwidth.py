"""bench/core_bandwidth.py: its rates come from real streaming workers, and its ratios, bound and
verdict follow from them; a draft share that leaves the target nothing is refused."""
import pytest
from helpers import load_bench_script


@pytest.fixture(scope="module")
def bench():
    return load_bench_script("core_bandwidth.py")


def test_rates_ratios_and_verdict(bench, capsys):
    result = bench.main(["--threads", "2", "--layers", "1", "--reps", "2"])
    assert all(result[k] > 0 for k in ("all", "alone", "target", "draft"))
    r_t, r_d = result["all"] / result["target"], result["all"] / result["draft"]
    assert abs(result["r_target"] - r_t) < 1e-9 and abs(result["r_draft"] - r_d) < 1e-9
    assert abs(result["best"] - r_t * r_d / (r_t + r_d)) < 1e-9
    out = capsys.readouterr().out
    verdict = "never" if result["best"] >= 1 else f"at best in {result['best']:.2f} of SD's serial time"
    assert f"r_t = {r_t:.2f}, r_d = {r_d:.2f}" in out and verdict in out


def test_draft_share_must_leave_the_target_threads(bench):
    with pytest.raises(SystemExit):
        bench.main(["--threads", "2", "--draft-threads", "2"])
