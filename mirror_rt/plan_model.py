"""The latency law (mirror_rt.sim) over Mirror-SD plans: predicted tokens/s of a plan, the plans a
config allows, and the best of them. Pure arithmetic on two duck-typed inputs, so the planner (fed
by measured steps) and bench/simulate.py (fed by a roofline) search the same way.

costs: seconds of each phase
    prefix(tokens), exit(tokens), verify(tokens)     the target's side over `tokens` = window + 1
    suffix(tokens, overlap)                          the suffix while the draft runs beside it or not
    draft(branches, depth, overlap)                  the rollouts: `depth` passes over `branches`
    fallback(window)                                 a fresh window while the target waits
    lane()                                           the lane's round trips in one step
    off()                                            one step of the target alone (1 token)
    residual(overlap)                                what the law misses (measured - law), per mode
rates:
    accept_rates                                     a_1, a_2, ...: acceptance of w_i given w_1..w_{i-1}
    hit_per_unit                                     P(one unit of branch budget holds the correction)
    lookup_rate                                      P(the next window is copied from the context)
    fill                                             branches rolled out / branch budget (floor, holes)
"""
from __future__ import annotations

from dataclasses import dataclass

from mirror_rt.planner import Plan
from mirror_rt.sim import accepted_by_position, overlap_span, plan_rate, reuse_probability, tokens_per_s

KAPPA_STEPS = (1, 2, 4, 8, 16, 32, 64)  # powers of two (and the bound itself): a short search
TREE_NODES = 256  # the packed tree mask's limit (mirror_rt.ops.checks.MAX_TREE_NODES)


@dataclass(frozen=True, slots=True)
class Prediction:
    tok_s: float            # predicted tokens per second
    step_s: float           # predicted mean seconds per step (fallbacks and empty steps included)
    tokens_per_step: float
    miss: float             # P(fallback) after a step with a window


def plan_branches(plan: Plan, window: int, fill: float) -> float:
    """Branches the draft is predicted to roll out: (window + 1) * kappa (per position, or the ranked
    budget), capped by the plan's max_branches and by one tree's size, times the fill."""
    budget = (window + 1) * plan.kappa
    depth = max(plan.window, 1)
    budget = min(budget, max(0, (TREE_NODES - (window + 1)) // depth))
    if plan.max_branches is not None:
        budget = min(budget, plan.max_branches)
    return budget * fill


def predict_plan(plan: Plan, costs, rates, policy: str = "ranked", memo: dict | None = None) -> Prediction:
    """The law's tokens/s and step time for `plan` in steady state (see mirror_rt.sim.plan_rate).
    memo: a dict shared across calls with the same costs and rates (a search), for the terms that do
    not depend on the branches."""
    memo = {} if memo is None else memo
    if plan.overlap == "off":
        t = costs.off() + costs.residual("off")
        return Prediction(tokens_per_s(1.0, t), t, 1.0, 0.0)
    ov, n = plan.overlap, plan.window

    def target_side(T):  # (the target's serial phases + lane + residual, suffix) at T tokens
        key = ("target", T, ov)
        if key not in memo:
            memo[key] = (costs.prefix(T) + costs.exit(T) + costs.verify(T) + costs.lane() + costs.residual(ov),
                         costs.suffix(T, ov))
        return memo[key]

    def step_s(window):
        serial, suffix = target_side(window + 1)
        b = plan_branches(plan, window, rates.fill)
        key = ("draft", b, n, ov)
        if key not in memo:
            memo[key] = costs.draft(b, n, ov)
        return serial + overlap_span(suffix, memo[key], ov)

    def miss_at(window):
        units = plan.kappa if policy == "per_position" else plan_branches(plan, window, rates.fill)
        return (1.0 - rates.lookup_rate) * (1.0 - reuse_probability(rates.hit_per_unit, units))

    if ("accepted", n) not in memo:
        memo[("accepted", n)] = 1.0 + accepted_by_position(rates.accept_rates, n)
    tokens_full, miss = memo[("accepted", n)], miss_at(n)
    if plan.fallback == "recompute":
        tok_s, mean_s, per_step = plan_rate(tokens_full, step_s(n), miss, "recompute", costs.fallback(n))
    else:
        tok_s, mean_s, per_step = plan_rate(tokens_full, step_s(n), miss, "exit", t_empty=step_s(0),
                                            miss_empty=miss_at(0))
    return Prediction(tok_s, mean_s, per_step, miss)


def candidate_plans(max_window: int, max_kappa: int, max_branches=None, min_branch_prob: float = 0.0,
                    overlaps=("overlapped", "serial"), fallbacks=("recompute", "exit"), off: bool = True):
    """Every plan the search considers: windows 1..max_window, kappa on a coarse ladder up to
    max_kappa (and max_kappa itself), each fallback and overlap mode, and the target alone."""
    kappas = sorted({k for k in KAPPA_STEPS if k <= max_kappa} | {max_kappa})
    plans = [Plan(w, k, max_branches, min_branch_prob, fb, ov)
             for ov in overlaps for fb in fallbacks for w in range(1, max_window + 1) for k in kappas]
    if off:
        plans.append(off_plan(max_branches, min_branch_prob))
    return plans


def off_plan(max_branches=None, min_branch_prob: float = 0.0) -> Plan:
    return Plan(0, 1, max_branches, min_branch_prob, "recompute", "off")


def best_plan(plans, costs, rates, policy: str = "ranked") -> tuple[Plan, Prediction]:
    """The plan with the highest predicted tokens/s (ties: the first, i.e. the cheaper listed)."""
    best, memo = None, {}
    for plan in plans:
        pred = predict_plan(plan, costs, rates, policy, memo)
        if best is None or pred.tok_s > best[1].tok_s * (1 + 1e-9):
            best = (plan, pred)
    if best is None:
        raise ValueError("best_plan needs at least one candidate plan")
    return best
