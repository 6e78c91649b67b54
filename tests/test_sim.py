"""The latency law (mirror_rt.sim) on hand-made stats, and bench/simulate.py's roofline by hand."""
import json

import pytest
from helpers import load_bench_script

from mirror_rt.sim import (expected_accepted, format_prediction, mirror_step_time, predict_from_stats,
                           sd_step_time)


def load_simulate():
    return load_bench_script("simulate.py")


def mirror_stats(suffix, draft, fallbacks=0, fallback_s=0.0, steps=10):
    """Stats as MirrorDecoder reports them: phase totals over `steps` steps."""
    return {"decoder": "mirror", "steps": steps, "new_tokens": 3 * steps, "mean_accepted": 2.0,
            "wall_s": 1.0 + 0.5, "reuse_hits": steps - fallbacks, "fallbacks": fallbacks,
            "phase_s": {"prefill": 0.5, "prefix": 0.1 * steps, "exit": 0.01 * steps, "suffix": suffix * steps,
                        "draft": draft * steps, "verify": 0.02 * steps, "wait": 0.0, "fallback": fallback_s}}


def test_law_takes_the_longer_of_suffix_and_draft():
    assert mirror_step_time(1, 0.1, 5, 3, 0.2) == pytest.approx(6.3)  # suffix hides the draft
    assert mirror_step_time(1, 0.1, 3, 5, 0.2) == pytest.approx(6.3)  # draft exposed beyond the suffix
    assert mirror_step_time(1, 0.1, 3, 5, 0.2, fallback_rate=0.25, fallback_time=4) == pytest.approx(7.3)
    assert sd_step_time(2.0, 3.0) == 5.0
    assert expected_accepted(0.5, 3) == pytest.approx(0.5 + 0.25 + 0.125)


def test_predict_suffix_longer_than_draft():
    p = predict_from_stats(mirror_stats(suffix=0.3, draft=0.2))
    assert p["pred_step_s"] == pytest.approx(0.1 + 0.01 + 0.3 + 0.02)
    assert p["serial_step_s"] == pytest.approx(0.1 + 0.01 + 0.3 + 0.2 + 0.02)
    assert p["meas_step_s"] == pytest.approx(1.0 / 10)  # wall minus prefill, per step
    assert p["tokens_per_step"] == 3 and p["pred_tok_s"] == pytest.approx(3 / 0.43)
    assert p["ideal_tok_s"] == pytest.approx(3 / 0.43)  # 1 + E[A] = 3
    assert p["fallback_rate"] == 0 and p["reuse_rate"] == 1


def test_predict_draft_longer_than_suffix_and_fallback_term():
    p = predict_from_stats(mirror_stats(suffix=0.2, draft=0.3, fallbacks=4, fallback_s=0.8))
    # fallback: 4 of 10 steps at 0.2 s each -> 0.4 * 0.2 = 0.08 s per step
    assert p["terms"]["fallback_rate"] == pytest.approx(0.4) and p["terms"]["fallback_time"] == pytest.approx(0.2)
    assert p["pred_step_s"] == pytest.approx(0.1 + 0.01 + 0.3 + 0.02 + 0.08)
    assert "fallback 40%" in format_prediction(p)


def test_predict_merges_runs_and_other_decoders():
    a, b = mirror_stats(0.3, 0.2, steps=10), mirror_stats(0.3, 0.2, steps=30)
    assert predict_from_stats([a, b])["steps"] == 40
    assert predict_from_stats([a, b])["pred_step_s"] == pytest.approx(predict_from_stats(a)["pred_step_s"])
    sd = {"decoder": "sd", "steps": 4, "new_tokens": 8, "mean_accepted": 1.0, "wall_s": 2.0,
          "phase_s": {"prefill": 0.4, "draft": 0.4, "target": 0.8, "verify": 0.08}}
    p = predict_from_stats(sd)
    assert p["pred_step_s"] == pytest.approx(0.1 + 0.2 + 0.02) and p["meas_step_s"] == pytest.approx(0.4)
    ar = {"decoder": "ar", "steps": 5, "new_tokens": 5, "mean_accepted": 0.0, "wall_s": 1.0,
          "phase_s": {"prefill": 0.5, "target": 0.45}}
    assert predict_from_stats(ar)["pred_tok_s"] == pytest.approx(1 / 0.09)
    with pytest.raises(ValueError):
        predict_from_stats({**ar, "steps": 0})


def test_roofline_by_hand():
    sim = load_simulate()
    s = sim.Shape("tiny", layers=2, hidden=4, intermediate=8, heads=2, kv_heads=1, head_dim=2, vocab=10)
    # per layer: q 4*4 + k,v 2*4*2 + o 4*4 = 48 attention, 3*4*8 = 96 MLP -> 144
    assert sim.layer_params(s) == 144
    nbytes, flops = sim.forward_cost(s, tokens=3, context=5)
    # weights 2*144 + LM head 40 = 328 -> 656 B; KV 2 layers * (K,V) * 5 pos * 1 head * 2 dim * 2 B = 80 B
    assert nbytes == 656 + 80
    # 2 * 3 tokens * 328 + attention 2 layers * 4 * 3 * 5 * 2 heads * 2 dim
    assert flops == 1968 + 480
    assert sim.forward_cost(s, 3, 5, layers=0) == (80, 2 * 3 * 40)  # LM head alone (the exit head)
    assert sim.roofline_s((736, 2448), sim.Device(736, 1224, 1.0)) == 2.0  # compute-bound
    assert sim.roofline_s((736, 2448), sim.Device(368, 1e9, 0.5)) == 4.0  # memory-bound at half efficiency
    opt = sim.Shape("opt", 1, 4, 8, 2, 2, 2, 10, gated=False)
    assert sim.layer_params(opt) == 16 + 2 * 16 + 16 + 2 * 32


def test_simulator_step_times_follow_the_law():
    sim = load_simulate()
    t = sim.TARGETS["qwen3-14b"]
    d = sim.Shape(**{**sim.DRAFT_BODY.__dict__, "vocab": t.vocab})
    kw = dict(gamma=7, kappa=8, exit_frac=0.5, context=1024, rv_exit=3e-5, rv_verify=3e-5)
    r = sim.step_times(t, d, sim.H100, sim.H100, mean_accepted=3.0, fallback_rate=0.0, **kw)
    # AR reads ~14.8B bf16 weights once per token at 0.7 * 3.35 TB/s: about 12.6 ms
    assert 0.010 < r["ar_s"] < 0.015
    assert r["mirror_s"] == pytest.approx(mirror_step_time(**r["terms"]))
    worse = sim.step_times(t, d, sim.H100, sim.H100, mean_accepted=3.0, fallback_rate=1.0, **kw)
    assert worse["mirror_s"] == pytest.approx(r["mirror_s"] + r["terms"]["fallback_time"])
    assert r["mirror_speedup"] > worse["mirror_speedup"] > 1


def test_simulator_reads_our_csv_and_stats(tmp_path, capsys):
    sim = load_simulate()
    path = tmp_path / "specbench.csv"
    path.write_text("family,decoder,mean_accepted,fallback_rate\nqa,ar,0,\nqa,sd,1.5,\nqa,mirror,1.5,0.7\n")
    assert sim.rates_from_csv(str(path)) == [{"family": "qa", "mean_accepted": 1.5, "sd_mean_accepted": 1.5,
                                              "fallback_rate": 0.7}]
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps([{"steps": 10, "mean_accepted": 2.0, "fallbacks": 5},
                                 {"steps": 30, "mean_accepted": 1.0, "fallbacks": 5}]))
    assert sim.rates_from_stats(str(stats))[0]["mean_accepted"] == pytest.approx(1.25)
    assert sim.main(["--from-csv", str(path), "--targets", "qwen3-14b"]) == 0
    out = capsys.readouterr().out
    assert "PREDICTION" in out and "Qwen3-14B" in out and "not available" in out


def test_paper_column_is_the_abstracts_range_and_never_invented(monkeypatch):
    sim = load_simulate()
    assert sim.paper_speedup("all") == "2.8-5.8*"
    assert sim.paper_speedup("qa") == "n/a"  # per-family numbers unknown: not made up
    monkeypatch.setattr(sim, "PAPER_TABLE1", {"qa": 3.25})
    assert sim.paper_speedup("qa") == "3.25"


def test_law_over_plans_by_hand():
    from mirror_rt.sim import accepted_by_position, overlap_span, plan_rate, reuse_probability, sd_rate
    assert accepted_by_position([0.5, 0.5, 0.5], 3) == pytest.approx(expected_accepted(0.5, 3))
    assert accepted_by_position([1.0, 0.5], 3) == pytest.approx(1 + 0.5 + 0.25)  # the last rate repeats
    assert accepted_by_position([0.9], 0) == 0.0
    with pytest.raises(ValueError):
        accepted_by_position([], 2)
    assert reuse_probability(0.5, 2) == pytest.approx(0.75) and reuse_probability(0.5, 0) == 0.0
    assert overlap_span(3.0, 5.0, "overlapped") == 5.0 and overlap_span(3.0, 5.0, "serial") == 8.0
    # recompute: each miss adds a fresh window: 2 tokens in 10 + 0.5 * 4 = 12 s
    assert plan_rate(2.0, 10.0, 0.5, "recompute", t_fallback=4.0) == pytest.approx((2 / 12, 12.0, 2.0))
    # exit: a miss (p 0.5) makes the next step empty (1 token, 6 s); an empty step misses with 0.5:
    # one empty step per full step -> (2 + 1) tokens in (10 + 6) s over 2 steps
    assert plan_rate(2.0, 10.0, 0.5, "exit", t_empty=6.0) == pytest.approx((3 / 16, 8.0, 1.5))
    # SD: (1 + E[A]) / (w * draft + target(w + 1))
    assert sd_rate([0.5], 2, 1.0, lambda T: 2.0 * T) == pytest.approx((1 + 0.75) / (2 + 6))


def test_planner_on_profiles_overlaps_where_the_draft_has_its_own_device(capsys):
    sim = load_simulate()
    rows = {r["profile"]: r for r in sim.print_profiles(0.8, 0.9, 7, 8, 1024)}
    out = capsys.readouterr().out
    assert "PLANNER on hardware profiles" in out and "2-core CPU" in out
    own_device = [p.name for p in sim.profiles() if p.name != "2-core CPU (this one)"]
    assert len(own_device) == 3
    for name in own_device:
        r = rows[name]
        assert r["plan"].overlap == "overlapped", name
        assert r["mirror_x"] > r["sd_x"] > 1, name  # the law puts planned Mirror-SD ahead of SD's best window
        assert r["mirror_x"] >= r["fixed_x"] - 1e-9  # the plan is never worse than the bounds' fixed plan
    cpu = rows["2-core CPU (this one)"]
    assert cpu["mirror_x"] < cpu["sd_x"]  # shared cores: SD stays ahead (RESULTS, perfect-draft section)


def test_profile_choice_moves_with_the_draft_device():
    sim = load_simulate()
    gpu_npu = sim.profiles()[0]
    fast = sim.plan_profile(gpu_npu, 0.8, 0.9, 7, 8)
    slow_npu = sim.Profile("slow NPU", gpu_npu.target, gpu_npu.draft, gpu_npu.dev_t,
                           sim.Device(0.2e12, 40e12))
    slow = sim.plan_profile(slow_npu, 0.8, 0.9, 7, 8)
    work = lambda p: p.window * (p.window + 1) * p.kappa  # noqa: E731 - rollout tokens a step
    assert work(slow["plan"]) < work(fast["plan"])


def test_predict_from_auto_stats_uses_the_chosen_decoders_pieces():
    m = mirror_stats(suffix=0.3, draft=0.2)
    ar = {"decoder": "ar", "steps": 5, "new_tokens": 5, "mean_accepted": 0.0, "wall_s": 1.0,
          "phase_s": {"prefill": 0.5, "target": 0.45}}
    runs = [{"decoder": "auto", "auto_last": m}, {"decoder": "auto", "auto_last": m},
            {"decoder": "auto", "auto_last": ar}]
    p = predict_from_stats(runs)
    assert p["decoder"] == "mirror" and p["steps"] == 20 and format_prediction(p).startswith("[auto: mirror]")
    with pytest.raises(ValueError, match="no decoding piece"):
        predict_from_stats([{"decoder": "auto", "auto_last": None}])
