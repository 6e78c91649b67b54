"""The planner on synthetic StepRecords: a made-up machine whose phase times and acceptance follow
known rules, so each test knows which plan is right (the plans change speed only; the Mirror
decoder's lossless tests cover the tokens)."""
import random
from dataclasses import dataclass

import pytest

from mirror_rt.plan_model import candidate_plans, predict_plan
from mirror_rt.planner import FixedPlanner, Plan, StepRecord, make_planner
from mirror_rt.planner_auto import AutoPlanner, LineFit, MeasuredCosts, MeasuredRates


@dataclass
class Config:  # the fields a planner reads (MirrorConfig's names)
    window: int = 7
    kappa: int = 8
    max_branches: int | None = None
    min_branch_prob: float = 0.0
    fallback: str = "recompute"
    branch_policy: str = "per_position"
    plan: str = "auto"


@dataclass
class Machine:
    """Seconds per phase: target work grows with tokens checked; rollouts cost `per_branch` per
    branch per depth; on shared cores overlap multiplies suffix and draft by `shared_slowdown`."""
    prefix: float = 0.010
    suffix: float = 0.030
    per_token: float = 0.001
    per_branch: float = 0.001
    pass_s: float = 0.001
    alpha: float = 0.6          # acceptance per position
    hit: float = 0.5            # P(one candidate per position holds the correction)
    shared_slowdown: float = 1.0
    noise: float = 0.0

    empty_next: bool = False    # fallback "exit" after a miss: the next step has no window

    def step(self, plan: Plan, rng: random.Random) -> StepRecord:
        jitter = lambda s: s * (1 + rng.uniform(-self.noise, self.noise))  # noqa: E731
        if plan.overlap == "off":
            self.empty_next = True  # the step after the target alone starts without a window
            return StepRecord(plan, 0, 0, False, False, False, 0, None,
                              {"prefix": jitter(self.prefix), "suffix": jitter(self.suffix), "verify": 0.001})
        n = 0 if self.empty_next else plan.window
        T = n + 1
        a = 0
        while a < n and rng.random() < self.alpha:
            a += 1
        branches = T * plan.kappa
        contained = rng.random() < 1 - (1 - self.hit) ** plan.kappa
        slow = self.shared_slowdown if plan.overlap == "overlapped" else 1.0
        suffix = jitter(self.suffix + self.per_token * T) * slow
        draft = jitter(plan.window * (self.pass_s + self.per_branch * branches)) * slow
        phases = {"prefix": jitter(self.prefix + self.per_token * T), "exit": 0.001, "suffix": suffix,
                  "draft": draft, "verify": 0.001,
                  "wait": max(0.0, draft - suffix) if plan.overlap == "overlapped" else draft}
        self.empty_next = not contained and plan.fallback == "exit"
        if not contained and plan.fallback == "recompute":
            phases["fallback"] = plan.window * self.pass_s * 2
        return StepRecord(plan, a, n, contained, False, not contained, branches, contained, phases)


def run(planner, machine, steps=200, seed=0):
    rng = random.Random(seed)
    for _ in range(steps):
        planner.observe(machine.step(planner.plan(), rng))
    return planner


def settled(machine, steps=200, config=None, **kw):
    return run(AutoPlanner(config or Config(), **kw), machine, steps).current


def test_fixed_planner_returns_the_configs_settings():
    p = make_planner(Config(window=3, kappa=2, fallback="exit", plan="fixed", min_branch_prob=0.05), None)
    assert isinstance(p, FixedPlanner)
    assert p.plan() == Plan(3, 2, None, 0.05, "exit", "overlapped")
    p.observe(Machine().step(p.plan(), random.Random(0)))
    assert p.history[0][0] == p.plan() and p.history[0][1] is None and p.history[0][2] > 0


def test_top_k_is_read_as_kappa():
    @dataclass
    class Old:
        window: int = 4
        top_k: int = 3
        plan: str = "fixed"
    assert make_planner(Old(), None).plan().kappa == 3


def test_keeps_rollouts_inside_the_suffix_when_overlap_pays():
    plan = settled(Machine())  # own device: overlap costs nothing
    assert plan.overlap == "overlapped"
    m = Machine()
    T = plan.window + 1
    rollouts = plan.window * (m.pass_s + m.per_branch * T * plan.kappa)
    assert rollouts <= (m.suffix + m.per_token * T) * 1.15  # the draft fits (nearly) under the suffix


def test_stops_overlapping_when_the_cores_are_shared():
    plan = settled(Machine(shared_slowdown=2.0))
    assert plan.overlap != "overlapped"


def test_inline_lane_never_overlaps():
    @dataclass
    class Placement:
        lane: str = "inline"
    p = run(AutoPlanner(Config(), Placement()), Machine(), 60)
    assert all(plan.overlap != "overlapped" for plan, _, _ in p.history)


def test_rollout_cost_up_means_fewer_branches():
    cheap = settled(Machine(per_branch=0.0002))
    dear = settled(Machine(per_branch=0.004))
    assert dear.window * dear.kappa < cheap.window * cheap.kappa


def test_longer_suffix_means_more_branches():
    # a fresh window costs 4 ms a token: branches that save it are worth their rollouts
    short = settled(Machine(suffix=0.010, per_branch=0.001, pass_s=0.004))
    long = settled(Machine(suffix=0.080, per_branch=0.001, pass_s=0.004))
    rollout_tokens = lambda p: p.window * (p.window + 1) * p.kappa  # noqa: E731
    assert rollout_tokens(long) > rollout_tokens(short)
    assert (long.window + 1) * long.kappa >= (short.window + 1) * short.kappa


def test_higher_acceptance_means_a_longer_window():
    low = settled(Machine(alpha=0.3, per_branch=0.0005))
    high = settled(Machine(alpha=0.9, per_branch=0.0005))
    assert high.window > low.window


def test_fallback_follows_what_a_fresh_window_costs():
    cheap = settled(Machine(pass_s=0.0005, hit=0.3))
    dear = settled(Machine(pass_s=0.02, per_branch=0.0002, hit=0.3))
    assert cheap.fallback == "recompute" and dear.fallback == "exit"


def test_ranked_floor_lowers_the_predicted_branches():
    @dataclass
    class Ranked(Config):
        branch_policy: str = "ranked"
    p = AutoPlanner(Ranked())
    plan = Plan(3, 2, None, 0.05, "exit", "overlapped")
    for _ in range(10):  # the floor left 2 of the budget's 8 branches
        p.observe(StepRecord(plan, 1, 3, True, False, False, 2, True, {"suffix": 0.01, "draft": 0.004}))
    assert p.rates.fill == pytest.approx(0.25)
    assert p.costs.draft(8 * p.rates.fill, 3, "overlapped") == pytest.approx(0.004)


def test_target_alone_when_the_draft_never_helps():
    plan = settled(Machine(alpha=0.0, hit=0.01, per_branch=0.003, shared_slowdown=2.0))
    assert plan.overlap == "off"


def test_hysteresis_no_flapping_on_noisy_records():
    p = run(AutoPlanner(Config()), Machine(noise=0.3), 300, seed=1)
    after_warmup = [plan for plan, _, _ in p.history[len(p.warmup):]]
    switches = sum(1 for a, b in zip(after_warmup, after_warmup[1:]) if a != b)
    probes = len(after_warmup) // p.probe_every
    assert switches <= 2 * probes + 6  # probes come and go; the plan itself settles


def test_warmup_is_cheap_and_history_records_predictions():
    p = run(AutoPlanner(Config(window=7, kappa=8)), Machine(), 40)
    for plan in p.warmup:
        assert plan.window <= 7 and plan.kappa <= 4
    assert {"overlapped", "serial"} <= {plan.overlap for plan in p.warmup}
    late = p.history[-10:]
    assert all(pred is not None and pred > 0 and meas > 0 for _, pred, meas in late)
    s = p.summary()
    assert sum(s["plans"].values()) == 40 and s["plan_now"] == p.current.label() and s["plan_pred_tok_s"] > 0
    assert sum(p.summary(since=30)["plans"].values()) == 10  # one generate call's steps


def test_prediction_tracks_measurement_on_a_steady_machine():
    p = run(AutoPlanner(Config()), Machine(), 200)
    tail = [(pred, meas) for plan, pred, meas in p.history[-60:] if plan == p.current]
    pred = sum(x for x, _ in tail) / len(tail)
    meas = sum(y for _, y in tail) / len(tail)
    assert pred == pytest.approx(meas, rel=0.15)


def test_plans_stay_within_the_configs_bounds():
    p = run(AutoPlanner(Config(window=3, kappa=2)), Machine(alpha=0.95, per_branch=0.0), 100)
    assert all(plan.window <= 3 and plan.kappa <= 2 for plan, _, _ in p.history)


def test_bad_settings_get_clear_errors():
    with pytest.raises(ValueError, match="plan must be one of"):
        make_planner(Config(plan="fast"), None)
    with pytest.raises(ValueError, match="config.window"):
        AutoPlanner(Config(window=0))
    with pytest.raises(ValueError, match="config.kappa"):
        AutoPlanner(Config(kappa=1.5))
    with pytest.raises(ValueError, match="margin"):
        AutoPlanner(Config(), margin=-0.1)
    with pytest.raises(ValueError, match="Plan.overlap"):
        Plan(3, 2, None, 0.0, "recompute", "parallel")
    with pytest.raises(ValueError, match="Plan.fallback"):
        Plan(3, 2, None, 0.0, "retry", "serial")
    with pytest.raises(ValueError, match="Plan.kappa"):
        Plan(3, 0, None, 0.0, "exit", "serial")
    with pytest.raises(TypeError, match="StepRecord"):
        AutoPlanner(Config()).observe({"accepted": 1})


def test_line_fit_and_rates():
    f = LineFit(decay=1.0, ridge=0.0)
    for x in (1, 2, 3, 4):
        f.add(x, 2 + 0.5 * x)
    assert f(6) == pytest.approx(5.0)
    flat = LineFit()
    flat.add(3, 7.0)
    assert flat(1) == pytest.approx(7.0) and flat(8) == pytest.approx(7.0)  # one size seen: no slope
    r = MeasuredRates("per_position")
    plan = Plan(4, 2, None, 0.0, "recompute", "serial")
    for a in (4, 4, 0, 0):  # positions 1..4 tried twice and accepted; position 1 rejected twice
        r.add(StepRecord(plan, a, 4, True, False, False, 10, True, {}))
    rates = r.accept_rates
    assert rates[0] < rates[1] and len(rates) == 4
    costs = MeasuredCosts()
    assert costs.suffix(4, "overlapped") == 0 and costs.off() == 0  # nothing measured yet: free
    pred = predict_plan(plan, costs, r, "per_position")
    assert pred.tok_s == 0.0 and pred.tokens_per_step > 1


def test_candidates_cover_the_bounds():
    plans = candidate_plans(5, 6)
    assert {p.window for p in plans if p.overlap != "off"} == {1, 2, 3, 4, 5}
    assert {p.kappa for p in plans if p.overlap != "off"} == {1, 2, 4, 6}
    assert sum(p.overlap == "off" for p in plans) == 1


def test_a_step_without_a_suffix_counts_as_the_target_alone():
    p = AutoPlanner(Config())
    plan = p.plan()
    p.observe(StepRecord(plan, 0, 0, False, False, False, 0, None, {"target": 0.02}))
    assert p.costs.off() == pytest.approx(0.02) and p.costs.residual(plan.overlap) == 0.0


def test_fixed_planner_summary():
    p = make_planner(Config(window=2, kappa=1, plan="fixed"), None)
    assert p.summary()["plans"] == {}
    run(p, Machine(), 5)
    s = p.summary()
    assert s["plans"] == {p.plan().label(): 5} and s["plan_step_ms"][p.plan().label()]["measured"] > 0
    assert p.summary(since=3)["plans"] == {p.plan().label(): 2}


@pytest.mark.parametrize("lane", ["inline", "thread", "process"])
def test_plan_auto_is_lossless_on_every_lane(lane):
    """plan="auto" changes window, kappa, fallback and overlap from step to step (warm-up, probes,
    re-plans): the greedy output stays AR's on every lane."""
    import torch
    from mirror_helpers import tiny_pair

    from mirror_rt.decoders import AutoregressiveDecoder, MirrorConfig, MirrorDecoder
    from mirror_rt.placement import Placement

    target, draft = tiny_pair(layers=4)
    with MirrorDecoder(target, draft, MirrorConfig(window=5, kappa=4, plan="auto"), Placement(lane=lane)) as dec:
        for length, n in ((1, 40), (7, 57)):
            ids = (torch.arange(5, 5 + length)[None] * 7) % 64
            out = dec.generate(ids, n, eos_token_id=[])
            ref = AutoregressiveDecoder(target).generate(ids, n, eos_token_id=[])
            assert out.tokens.tolist() == ref.tokens.tolist(), (lane, length)


def test_make_planner_reads_mirror_config_and_placement():
    from mirror_rt import defaults
    from mirror_rt.decoders import MirrorConfig
    from mirror_rt.placement import Placement

    cfg = MirrorConfig(window=5, kappa=3, plan="auto", min_branch_prob=0.05, max_branches=12)
    p = make_planner(cfg, Placement(lane="inline"))
    assert isinstance(p, AutoPlanner) and (p.max_window, p.max_kappa) == (5, 3)
    assert all(plan.min_branch_prob == 0.05 and plan.max_branches == 12 for plan in p.plans)
    assert {plan.overlap for plan in p.plans} == {"serial", "off"}  # an inline lane cannot overlap
    fixed = make_planner(MirrorConfig(window=5, kappa=3, plan="fixed", fallback="exit"), Placement())
    assert fixed.plan() == Plan(5, 3, None, defaults.MIN_BRANCH_PROB, "exit", "overlapped")


def test_one_planner_per_decoder_and_its_plans_in_each_calls_stats():
    """The planner keeps its measurements across generate calls; each call's stats carry the plans
    it used (steps each, summing to its steps) and the plan now in use."""
    import torch
    from mirror_helpers import tiny_pair

    from mirror_rt.decoders import MirrorConfig, MirrorDecoder
    from mirror_rt.placement import Placement

    target, draft = tiny_pair(layers=4)
    ids = (torch.arange(5, 12)[None] * 7) % 64
    with MirrorDecoder(target, draft, MirrorConfig(window=5, kappa=4, plan="auto"), Placement(lane="inline")) as dec:
        first = dec.generate(ids, 30, eos_token_id=[]).stats
        planner, after_first = dec.planner, len(dec.planner.history)
        second = dec.generate(ids, 30, eos_token_id=[]).stats
        assert dec.planner is planner and len(planner.history) > after_first > 0
    assert sum(first["plans"].values()) == after_first
    assert sum(second["plans"].values()) == len(planner.history) - after_first
    for s in (first, second):
        assert 0 < sum(s["plans"].values()) <= s["steps"] and s["plan_now"]
        assert all(row["measured"] > 0 for row in s["plan_step_ms"].values())
