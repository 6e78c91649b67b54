"""AutoPlanner: each Mirror-SD step's plan from what the steps so far measured.

It keeps running estimates (recent steps weigh most, so the plan follows the prompt) of
* each phase's cost as a line in its size: prefix, exit, suffix and verify in the tokens checked
  (window + 1); the rollouts per pass in the branches; a fresh window per token; suffix and
  rollouts apart for each overlap mode, because on shared cores each slows the other;
* acceptance by position, the exit's containment per unit of branch budget, copied-window hits,
  the branches actually rolled out per unit of budget;
* what the law misses per overlap mode (the measured step minus the law's sum of its phases);
and picks the plan with the highest predicted tokens/s (mirror_rt.plan_model, the law of
mirror_rt.sim). A cheap warm-up measures a few small plans first (both overlap modes); after it,
a better plan replaces the current one only when it is predicted ``margin`` faster at
``patience`` re-plans in a row (no flapping on noisy steps), and now and then one probe step
measures a neighbouring plan so that the estimates do not go stale.
"""
from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from types import SimpleNamespace

from mirror_rt.plan_model import Prediction, best_plan, candidate_plans, off_plan, predict_plan
from mirror_rt.planner import Plan, StepRecord, config_field, config_kappa

DECAY = 0.97  # weight of a step's evidence per later step: about the last 30 steps count


class LineFit:
    """y = a + b * x by decayed least squares; b >= 0 (a phase never gets cheaper as it grows), and a
    ridge on b so that one size seen gives a flat line."""

    def __init__(self, decay: float = DECAY, ridge: float = 0.5):
        self.decay, self.ridge = decay, ridge
        self.w = self.wx = self.wy = self.wxx = self.wxy = 0.0
        self.mx = self.my = self.b = 0.0  # the line through (mx, my) with slope b (kept: read per plan)

    def add(self, x: float, y: float):
        d = self.decay
        self.w, self.wx, self.wy = d * self.w + 1, d * self.wx + x, d * self.wy + y
        self.wxx, self.wxy = d * self.wxx + x * x, d * self.wxy + x * y
        self.mx, self.my = self.wx / self.w, self.wy / self.w
        var, cov = self.wxx / self.w - self.mx ** 2, self.wxy / self.w - self.mx * self.my
        self.b = max(0.0, cov / (var + self.ridge)) if var + self.ridge > 1e-12 else 0.0

    @property
    def empty(self) -> bool:
        return self.w == 0

    def __call__(self, x: float) -> float:
        y = self.my + self.b * (x - self.mx)
        return y if y > 0 else 0.0


class Mean(LineFit):
    def __call__(self, x: float = 0.0) -> float:
        return self.my


class MeasuredCosts:
    """The plan model's ``costs`` from StepRecords (see mirror_rt.plan_model)."""

    def __init__(self):
        self.fits = defaultdict(LineFit)  # "prefix", "exit", "verify", ("suffix", mode), ("draft", mode)
        self.fallback_per_token, self.lane_s, self.off_s = Mean(), Mean(), Mean()
        self.residuals = defaultdict(Mean)
        self._resolved = {}

    def _fit(self, key, *alternatives):
        """The fit for key, or the first measured alternative (kept until the next record)."""
        if key not in self._resolved:
            self._resolved[key] = next((self.fits[k] for k in (key, *alternatives) if not self.fits[k].empty),
                                       self.fits[key])
        return self._resolved[key]

    def prefix(self, tokens):
        return self.fits["prefix"](tokens)

    def exit(self, tokens):
        return self.fits["exit"](tokens)

    def verify(self, tokens):
        return self.fits["verify"](tokens)

    def suffix(self, tokens, overlap):
        other = "serial" if overlap == "overlapped" else "overlapped"
        return self._fit(("suffix", overlap), ("suffix", other))(tokens)

    def draft(self, branches, depth, overlap):
        other = "serial" if overlap == "overlapped" else "overlapped"
        return depth * self._fit(("draft", overlap), ("draft", other))(branches)

    def fallback(self, window):
        return window * self.fallback_per_token()

    def lane(self):
        return self.lane_s()

    def off(self):
        if not self.off_s.empty:
            return self.off_s()
        return self.prefix(1) + self.suffix(1, "serial") + self.verify(1)

    def residual(self, overlap):
        """What the law misses in this mode; a mode never measured borrows a measured one's (the lane's
        round trips and the bookkeeping between phases are in every mode)."""
        for mode in (overlap, "serial", "overlapped", "off"):
            if not self.residuals[mode].empty:
                return self.residuals[mode]()
        return 0.0

    def law_step(self, rec: StepRecord) -> float:
        """The law's time for the phases `rec` measured (its own suffix and rollouts)."""
        ph = rec.phase_s.get
        if rec.plan.overlap == "off":
            return sum(v for k, v in rec.phase_s.items() if k != "draft")
        mid = max(ph("suffix", 0.0), ph("draft", 0.0)) if rec.plan.overlap == "overlapped" \
            else ph("suffix", 0.0) + ph("draft", 0.0)
        return (ph("prefix", 0.0) + ph("exit", 0.0) + mid + ph("verify", 0.0) + ph("lane", 0.0)
                + ph("fallback", 0.0))

    def add(self, rec: StepRecord, measured_s: float):
        self._resolved.clear()
        ph, mode, T = rec.phase_s, rec.plan.overlap, rec.window_len + 1
        if mode == "off" or "suffix" not in ph:  # the target alone (an "off" plan, or a step cut short)
            self.off_s.add(0, measured_s)
            self.residuals["off"].add(0, 0.0)  # off_s is the whole measured step
            return
        self.residuals[mode].add(0, measured_s - self.law_step(rec))
        for name in ("prefix", "exit", "verify"):
            if name in ph:
                self.fits[name].add(T, ph[name])
        if "suffix" in ph:
            self.fits[("suffix", mode)].add(T, ph["suffix"])
        depth = rec.plan.window
        if "draft" in ph and depth > 0 and rec.branches > 0:
            self.fits[("draft", mode)].add(rec.branches, ph["draft"] / depth)
        if rec.fallback and "fallback" in ph and depth > 0:
            self.fallback_per_token.add(0, ph["fallback"] / depth)
        self.lane_s.add(0, ph.get("lane", 0.0))


class MeasuredRates:
    """The plan model's ``rates`` from StepRecords."""

    def __init__(self, policy: str, prior: float = 2.0):
        self.policy, self.prior = policy, prior
        self.tried, self.taken = defaultdict(float), defaultdict(float)
        self.hits = defaultdict(lambda: [0.0, 0.0])  # budget units -> [hits, trials], decayed
        self.lookup, self.fill_mean = Mean(), Mean()
        self.hit_per_unit = 0.5

    @property
    def lookup_rate(self):
        return self.lookup()

    @property
    def fill(self):
        return self.fill_mean() if not self.fill_mean.empty else 1.0

    @property
    def accept_rates(self) -> list[float]:
        """a_i with a Beta prior at the pooled rate; a position never tried repeats the one before."""
        pooled = (sum(self.taken.values()) + 1) / (sum(self.tried.values()) + 2)
        rates = []
        for i in range(1, (max(self.tried) if self.tried else 0) + 1):
            if self.tried[i] > 0:
                rates.append((self.taken[i] + self.prior * pooled) / (self.tried[i] + self.prior))
            else:
                rates.append(rates[-1] if rates else pooled)
        return rates or [pooled]

    def add(self, rec: StepRecord):
        for table in (self.tried, self.taken):
            for k in table:
                table[k] *= DECAY
        for i in range(1, min(rec.accepted + 1, rec.window_len) + 1):
            self.tried[i] += 1
            self.taken[i] += i <= rec.accepted
        if rec.plan.overlap == "off":
            return
        self.lookup.add(0, float(rec.lookup_hit))
        budget = (rec.window_len + 1) * rec.plan.kappa
        if rec.plan.max_branches is not None:
            budget = min(budget, rec.plan.max_branches)
        if budget > 0:
            self.fill_mean.add(0, min(1.0, rec.branches / budget))
        units = rec.plan.kappa if self.policy == "per_position" else rec.branches
        hit = rec.contained if rec.contained is not None else (rec.reuse_hit if not rec.lookup_hit else None)
        if units > 0 and hit is not None:
            for v in self.hits.values():
                v[0] *= DECAY
                v[1] *= DECAY
            self.hits[units][0] += float(hit)
            self.hits[units][1] += 1

    def snapshot(self) -> SimpleNamespace:
        """The rates as plain numbers, computed once per re-plan (the search reads them per plan)."""
        if self.hits:
            self.hit_per_unit = self._fit_hit()
        return SimpleNamespace(accept_rates=self.accept_rates, hit_per_unit=self.hit_per_unit,
                               lookup_rate=self.lookup_rate, fill=self.fill)

    def _fit_hit(self) -> float:
        """Maximum likelihood p of P(hit | u units) = 1 - (1 - p)^u over a grid."""
        def loglik(p):
            total = 0.0
            for u, (h, n) in self.hits.items():
                miss = (1 - p) ** u
                total += h * math.log(max(1 - miss, 1e-12)) + (n - h) * math.log(max(miss, 1e-12))
            return total
        coarse = max((i / 10 for i in range(1, 10)), key=loglik)
        return max((coarse + i / 100 for i in range(-9, 10) if 0 < coarse + i / 100 < 1), key=loglik)


class AutoPlanner:
    """plan="auto": config.window and kappa are upper bounds; placement (may be None) tells whether the
    draft can run beside the target at all (an inline lane cannot)."""

    def __init__(self, config, placement=None, margin: float = 0.05, patience: int = 3, replan_every: int = 4,
                 probe_every: int = 24):
        self.max_window, self.max_kappa = _bound(config, "window", 32), _bound(config, "kappa", 64)
        if not 0 <= margin < 1 or patience < 1 or replan_every < 1 or probe_every < 2:
            raise ValueError(f"AutoPlanner needs 0 <= margin < 1, patience >= 1, replan_every >= 1, probe_every "
                             f">= 2; got {margin}, {patience}, {replan_every}, {probe_every}")
        self.policy = getattr(config, "branch_policy", "ranked")
        self.margin, self.patience, self.replan_every, self.probe_every = margin, patience, replan_every, probe_every
        cap, floor = config_field(config, "max_branches", None), float(config_field(config, "min_branch_prob", 0.0))
        lane = getattr(placement, "lane", None) or getattr(config, "lane", "auto")
        overlaps = ("serial",) if lane == "inline" else ("overlapped", "serial")
        self.plans = candidate_plans(self.max_window, self.max_kappa, cap, floor, overlaps)
        self.costs, self.rates = MeasuredCosts(), MeasuredRates(self.policy)
        small, fb = min(3, self.max_window), getattr(config, "fallback", "recompute")
        mk = lambda w, k, ov: Plan(w, min(k, self.max_kappa), cap, floor, fb, ov)  # noqa: E731
        self.warmup = [mk(small, 1, ov) for ov in overlaps for _ in range(2)]
        self.warmup += [mk(self.max_window, 2, overlaps[0]), mk(1, 4, overlaps[0]), off_plan(cap, floor)]
        self.current, self.streak, self.steps = self.warmup[0], 0, 0
        self.prediction: Prediction | None = None
        self.snap: SimpleNamespace | None = None  # the rates at the last re-plan
        self.history: list[tuple[Plan, float | None, float]] = []
        self._pending: tuple[Plan, float | None, float] | None = None

    def plan(self) -> Plan:
        if self.steps < len(self.warmup):
            plan = self.warmup[self.steps]
        elif self.steps % self.probe_every == 0:
            plan = self._probe()
        else:
            plan = self.current
        pred = predict_plan(plan, self.costs, self.snap, self.policy).step_s if self.snap else None
        self._pending = (plan, pred, time.perf_counter())
        return plan

    def observe(self, rec: StepRecord) -> None:
        if not isinstance(rec, StepRecord):
            raise TypeError(f"observe takes a StepRecord, got {type(rec).__name__}")
        pred, wall = None, 0.0
        if self._pending is not None and self._pending[0] == rec.plan:
            pred, wall = self._pending[1], time.perf_counter() - self._pending[2]
        measured = max(rec.step_s(), wall)  # the wall time when the planner saw the step, else its phases
        self._pending = None
        self.costs.add(rec, measured)
        self.rates.add(rec)
        self.history.append((rec.plan, pred, measured))
        self.steps += 1
        if self.steps >= len(self.warmup) and (self.steps - len(self.warmup)) % self.replan_every == 0:
            self._replan()

    def _replan(self):
        self.snap = self.rates.snapshot()
        best, best_pred = best_plan(self.plans, self.costs, self.snap, self.policy)
        now = predict_plan(self.current, self.costs, self.snap, self.policy)
        if self.steps == len(self.warmup) or best_pred.tok_s > now.tok_s * (1 + self.margin):
            self.streak += 1
        else:
            self.streak = 0
        if self.steps == len(self.warmup) or self.streak >= self.patience:
            self.current, self.streak, now = best, 0, best_pred
        self.prediction = now

    def _probe(self) -> Plan:
        """One step of a neighbour of the current plan (turn by turn), to keep its estimates fresh."""
        c = self.current
        if c.overlap == "off":
            return best_plan([p for p in self.plans if p.overlap != "off"], self.costs, self.snap, self.policy)[0]
        turn = (self.steps // self.probe_every) % 4
        w = min(self.max_window, c.window + 1) if turn == 0 else max(1, c.window - 1) if turn == 1 else c.window
        k = min(self.max_kappa, c.kappa * 2) if turn == 2 else max(1, c.kappa // 2) if turn == 3 else c.kappa
        return Plan(w, k, c.max_branches, c.min_branch_prob, c.fallback, c.overlap)

    def summary(self, since: int = 0) -> dict:
        """For a decoder's stats: the plans used (steps each) from step `since` on (e.g. one generate
        call's), the law's mean predicted step beside the measured one per plan, and the plan now in
        use with its predicted tokens/s."""
        per, used = defaultdict(lambda: [0.0, 0, 0.0]), Counter()
        for plan, pred, meas in self.history[since:]:
            row = per[plan.label()]
            used[plan.label()] += 1
            row[2] += meas
            if pred is not None:
                row[0] += pred
                row[1] += 1
        return {"plans": dict(used.most_common()),
                "plan_step_ms": {k: {"predicted": (r[0] / r[1] * 1e3) if r[1] else None,
                                     "measured": r[2] / used[k] * 1e3} for k, r in per.items()},
                "plan_now": self.current.label(),
                "plan_pred_tok_s": self.prediction.tok_s if self.prediction else None}


def _bound(config, name: str, limit: int) -> int:
    value = config_kappa(config) if name == "kappa" else getattr(config, name, None)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
        raise ValueError(f"plan='auto' takes config.{name} as an upper bound: an integer in [1, {limit}], "
                         f"got {value!r}")
    return value


__all__ = ["AutoPlanner", "MeasuredCosts", "MeasuredRates", "LineFit", "off_plan"]
