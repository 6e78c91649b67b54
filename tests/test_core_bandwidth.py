"""bench/core_bandwidth.py: its three rates come from real streaming workers, and its ratio and
verdict follow from them."""
from helpers import load_bench_script


def test_rates_ratio_and_verdict(capsys):
    bench = load_bench_script("core_bandwidth.py")
    result = bench.main(["--layers", "1", "--reps", "2"])
    assert all(result[k] > 0 for k in ("all", "one", "pair"))
    assert abs(result["ratio"] - result["all"] / result["pair"]) < 1e-9
    out = capsys.readouterr().out
    verdict = "never" if result["ratio"] >= 2 else f"in {result['ratio'] / 2:.2f} of SD's serial time"
    assert f"r = all / one core in the pair = {result['ratio']:.2f}" in out and verdict in out
