"""AutoDecoder: lossless whatever it picks, says what it picked and why, chooses again on drift."""
import pytest
import torch
from mirror_helpers import SlowDraft, tiny_pair

from mirror_rt.decoders import AutoregressiveDecoder, MirrorConfig
from mirror_rt.decoders.auto import NAMES, AutoDecoder, _accept_rates


@pytest.fixture(scope="module")
def pair():
    return tiny_pair(layers=4)


def prompt(seed, n=7, vocab=64):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, n), generator=g)


def ar(target, ids, n):
    return AutoregressiveDecoder(target).generate(ids, n, eos_token_id=[]).tokens.tolist()


def config(window=3, kappa=2):
    try:
        return MirrorConfig(window=window, kappa=kappa)
    except TypeError:  # a MirrorConfig from before kappa's rename
        return MirrorConfig(window=window, top_k=kappa)


def test_greedy_output_equals_ar_across_probes_and_calls(pair):
    target, draft = pair
    with AutoDecoder(target, draft, config(), probe=(3, 4, 5), drift=0.9) as dec:
        for seed, n in ((0, 30), (1, 9), (2, 2), (3, 25)):
            ids = prompt(seed)
            out = dec.generate(ids, n, eos_token_id=[])
            assert out.tokens.tolist() == ar(target, ids, n), f"prompt {seed}"
            s = out.stats
            assert s["decoder"] == "auto" and s["new_tokens"] == n == sum(k for _, k in s["auto_pieces"])
        assert dec.choice in NAMES
        assert s["auto_choice"] == dec.choice and dec.choice in s["auto_reason"] and "tok/s" in s["auto_reason"]
        assert set(s["auto_estimates"]) == set(NAMES) and all(v > 0 for v in s["auto_estimates"].values())


def test_first_call_measures_each_decoder_on_the_request(pair):
    target, draft = pair
    # drift 0.99: timing on a tiny model must not make it choose again after the last piece
    with AutoDecoder(target, draft, config(), probe=(2, 3, 4), drift=0.99) as dec:
        out = dec.generate(prompt(5), 20, eos_token_id=[])
    names = [name for name, _ in out.stats["auto_pieces"]]
    assert names[:3] == ["ar", "sd", "mirror"] and names[3:] == [out.stats["auto_choice"]]
    assert [k for _, k in out.stats["auto_pieces"]][:3] == [2, 3, 4]


def test_a_slow_draft_makes_it_choose_ar(pair):
    target, draft = pair
    with AutoDecoder(target, SlowDraft(draft, 0.02), config(), probe=(4, 4, 6)) as dec:
        ids = prompt(7)
        out = dec.generate(ids, 16, eos_token_id=[])
    assert out.tokens.tolist() == ar(target, ids, 16)
    assert dec.choice == "ar" and out.stats["auto_reason"].startswith("ar:")


def test_eos_inside_a_probe_ends_the_call(pair):
    target, draft = pair
    ids = prompt(11)
    ref = ar(target, ids, 12)[0]
    eos = ref[5]  # the 6th token: inside SD's probe (ar 3 + sd 4)
    first = ref.index(eos)
    with AutoDecoder(target, draft, config(), probe=(3, 4, 5)) as dec:
        out = dec.generate(ids, 12, eos_token_id=eos)
    assert out.tokens.tolist()[0] == ref[: first + 1]


def test_choice_takes_the_margin_and_rechecks_on_drift(pair):
    target, draft = pair
    with AutoDecoder(target, draft, config(), margin=0.05, drift=0.10) as dec:
        dec.estimates = {"ar": 100.0, "sd": 104.0, "mirror": 103.0}
        assert dec._choose() == "ar"  # neither beats AR by 5%
        dec.choice, dec.estimates = None, {"ar": 100.0, "sd": 110.0, "mirror": 120.0}
        assert dec._choose() == "mirror" and "mirror: predicted 120.0 tok/s" in dec.reason
        steady = {"new_tokens": 60, "wall_s": 0.5, "phase_s": {"prefill": 0.0}}  # 120 tok/s as predicted
        dec._track(steady)
        assert dec.choice == "mirror"
        slow = {"new_tokens": 60, "wall_s": 1.0, "phase_s": {}}  # 60 tok/s: half the prediction
        dec._track(slow)  # the running ratio falls to 75%: mirror's estimate drops to 90, SD (110) wins
        assert dec.choice == "sd" and dec.estimates == {"ar": 100.0, "sd": 110.0, "mirror": 90.0}
        assert "mirror measured 90.0 tok/s, off its prediction: chose again" in dec.reason
        assert dec.reason.startswith("sd: predicted 110.0 tok/s")
        # AR's drift is the target's own speed (a longer context, a busier machine): every estimate
        # moves with it and the choice stays
        dec.choice, dec.estimates = None, {"ar": 100.0, "sd": 90.0, "mirror": 95.0}
        assert dec._choose() == "ar"
        dec._track({"new_tokens": 60, "wall_s": 1.0, "phase_s": {}})  # 60 tok/s: ratio 0.8
        assert dec.choice == "ar" and dec.estimates == pytest.approx({"ar": 80.0, "sd": 72.0, "mirror": 76.0})
        assert "with every estimate x0.80" in dec.reason


def test_sd_window_follows_its_acceptance(pair):
    target, draft = pair
    assert _accept_rates({0: 10}, 3)[0] < 0.1
    high = _accept_rates({3: 10}, 3)
    assert all(r > 0.9 for r in high)
    with AutoDecoder(target, draft, config(window=5)) as dec:
        base = {"steps": 10, "new_tokens": 40, "wall_s": 1.0, "phase_s": {"draft": 0.05 * 5, "target": 0.5}}
        dec.decoders["sd"].window = 5
        dec._best_sd({**base, "accepted_hist": {5: 10}})
        assert dec.decoders["sd"].window == 5  # everything accepted, cheap draft: the longest window
        dec._best_sd({**base, "accepted_hist": {0: 10}})
        assert dec.decoders["sd"].window == 1  # nothing accepted: the shortest


def test_bad_settings_get_clear_errors(pair):
    target, draft = pair
    with pytest.raises(ValueError, match="probe"):
        AutoDecoder(target, draft, probe=(1, 0, 2))
    with pytest.raises(ValueError, match="drift"):
        AutoDecoder(target, draft, drift=0)
    with AutoDecoder(target, draft, config()) as dec:
        with pytest.raises(ValueError, match="max_new_tokens"):
            dec.generate(prompt(0), -1)
        with pytest.raises(TypeError):
            dec.generate([1, 2, 3], 4)


def test_bench_names_a_grid_point_and_the_auto_decoder(pair):
    from mirror_rt.bench_cli import build_decoders, grid_point
    from mirror_rt.cli import build_parser

    assert grid_point("mirror-w3-k2") == ("mirror", {"window": 3, "kappa": 2, "plan": "fixed"})
    assert grid_point("sd-w5") == ("sd", {"window": 5})
    assert grid_point("mirror") is None and grid_point("sd-w") is None
    target, draft = pair
    args = build_parser().parse_args(["bench", "q.jsonl", "--decoders", "sd-w2,auto", "--window", "3", "--lookup", "0"])
    args.exit_head_fn = None
    decs = build_decoders(args.decoders.split(","), target, draft, args)
    try:
        assert list(decs) == ["ar", "sd-w2", "auto"]
        assert decs["sd-w2"].window == 2 and isinstance(decs["auto"], AutoDecoder)
        ids = prompt(3)
        out = decs["auto"].generate(ids, 12, eos_token_id=[])
        assert out.tokens.tolist() == ar(target, ids, 12)
    finally:
        decs["auto"].close()


def test_plan_report_lines():
    from mirror_rt.planner import plan_report

    runs = [{"plans": {"w3 k2 exit overlapped": 4},
             "plan_step_ms": {"w3 k2 exit overlapped": {"predicted": 10.0, "measured": 12.0}}},
            {"plans": {"w3 k2 exit overlapped": 4, "off": 2},
             "plan_step_ms": {"w3 k2 exit overlapped": {"predicted": 20.0, "measured": 12.0},
                              "off": {"predicted": None, "measured": 5.0}}},
            {"auto_choice": "sd", "auto_reason": "sd: predicted 30.0 tok/s"}]
    lines = plan_report(runs)
    assert lines[0] == "  auto decoder: sd: predicted 30.0 tok/s"
    assert lines[1] == "  plan w3 k2 exit overlapped: 8 steps, step predicted 15.0 ms, measured 12.0 ms"
    assert lines[2] == "  plan off: 2 steps, step predicted - ms, measured 5.0 ms"


def test_a_draft_lane_still_starting_is_measured_on_a_later_request(pair, monkeypatch):
    """A process lane takes seconds to start: auto chooses between AR and SD without waiting for
    it, then measures Mirror-SD on the first request after it is up and chooses again."""
    import mirror_rt.decoders.auto as auto

    target, draft = pair
    up = {"lane": False}
    monkeypatch.setattr(auto, "is_started", lambda lane: up["lane"])
    with AutoDecoder(target, draft, config(), probe=(3, 4, 5)) as dec:
        assert dec.mirror.placement.lane_start == "background"
        ids = prompt(11)
        first = dec.generate(ids, 20, eos_token_id=[])
        assert first.tokens.tolist() == ar(target, ids, 20)
        assert [n for n, _ in first.stats["auto_pieces"]][:2] == ["ar", "sd"]
        assert "mirror" not in {n for n, _ in first.stats["auto_pieces"]} and "mirror" not in dec.estimates
        assert dec.choice in ("ar", "sd") and "not measured yet" in first.stats["auto_reason"]
        again = dec.generate(ids, 12, eos_token_id=[])  # still starting: no probe, no wait
        assert {n for n, _ in again.stats["auto_pieces"]} == {dec.choice}
        up["lane"] = True
        later = dec.generate(ids, 20, eos_token_id=[])
        assert later.tokens.tolist() == ar(target, ids, 20)
        assert later.stats["auto_pieces"][0] == ["mirror", 5] and set(dec.estimates) == set(NAMES)
        assert "not measured yet" not in later.stats["auto_reason"]


def test_a_late_probe_waits_when_reading_the_prompt_again_costs_too_much(pair, monkeypatch):
    import mirror_rt.decoders.auto as auto

    target, draft = pair
    up = {"lane": False}
    monkeypatch.setattr(auto, "is_started", lambda lane: up["lane"])
    with AutoDecoder(target, draft, config(), probe=(3, 4, 5), probe_budget=1e-9, drift=0.99) as dec:
        ids = prompt(12)
        dec.generate(ids, 16, eos_token_id=[])  # the first request measures AR and SD whatever it costs
        assert set(dec.estimates) == {"ar", "sd"} and dec.prefill_rate > 0
        up["lane"] = True
        out = dec.generate(ids, 16, eos_token_id=[])
        assert out.tokens.tolist() == ar(target, ids, 16)
        assert out.stats["auto_pieces"] == [[dec.choice, 16]] and "mirror" not in dec.estimates
    with pytest.raises(ValueError, match="probe_budget"):
        AutoDecoder(target, draft, config(), probe_budget=0)


def test_mirror_with_its_draft_off_is_never_predicted_faster_than_ar(pair):
    target, draft = pair
    with AutoDecoder(target, draft, config()) as dec:
        dec.estimates["ar"] = 40.0
        assert dec._estimate("mirror", {"plan_pred_tok_s": 70.0, "plan_now": "off"}) == 40.0
        assert dec._estimate("mirror", {"plan_pred_tok_s": 70.0, "plan_now": "w1 k1 exit overlapped"}) == 70.0
        dec.estimates.update(sd=30.0, mirror=40.0)
        assert dec._choose() == "ar"  # a tie goes to the simpler decoder


def test_warm_up_waits_for_the_draft_lane_and_measures_all_three(pair, monkeypatch):
    """warm_up: the three probes on one prompt, EOS ignored, the draft lane waited for; the
    requests after it write every token with the chosen decoder, no probe."""
    import mirror_rt.decoders.auto as auto

    target, draft = pair
    up = {"lane": False}
    monkeypatch.setattr(auto, "is_started", lambda lane: up["lane"])
    monkeypatch.setattr(auto, "wait_started", lambda lane: up.update(lane=True))
    ids = prompt(13)
    eos = ar(target, ids, 12)[0][1]  # ends a generate after two tokens, not the warm-up
    with AutoDecoder(target, draft, config(), probe=(3, 4, 5), drift=0.99) as dec:
        stats = dec.warm_up(ids)
        assert up["lane"] and [p for p in stats["auto_pieces"]] == [["ar", 3], ["sd", 4], ["mirror", 5]]
        assert set(dec.estimates) == set(NAMES) and stats["auto_choice"] == dec.choice
        assert "not measured yet" not in stats["auto_reason"]
        # Mirror-SD's piece started from SD's target rows (prompt and 7 tokens; the 8th is pending)
        assert stats["auto_last"]["prefill_reused"] == ids.shape[1] + 7 - 1 and dec.reuse.cache is None
        out = dec.generate(ids, 12, eos_token_id=[])
        assert out.tokens.tolist() == ar(target, ids, 12) and out.stats["auto_pieces"] == [[dec.choice, 12]]
        assert dec.generate(ids, 12, eos_token_id=eos).tokens.tolist()[0] == ar(target, ids, 12)[0][:2]
        dec.estimates["ar"] = -1.0
        dec.warm_up(ids)  # measures afresh
        assert dec.estimates["ar"] > 0
