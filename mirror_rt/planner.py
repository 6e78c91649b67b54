"""Each Mirror-SD step's plan: how much to draft, how many branches, and whether to overlap.

The Mirror step asks ``planner.plan()`` at its start and reports ``planner.observe(record)`` at
its end. A plan changes the step's speed only, never its tokens: whatever the window, branches,
fallback or overlap, the step commits the target's tokens (DESIGN.md §6).

* ``FixedPlanner``: the config's window, kappa, branch cap, floor and fallback at every step
  (``MirrorConfig(plan="fixed")``).
* ``AutoPlanner`` (``plan="auto"``): fits the plan to the measured phase times and acceptance,
  maximising the latency law's predicted tokens per second (``mirror_rt.sim``); the config's
  window and kappa are upper bounds.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

FALLBACKS = ("recompute", "exit")
OVERLAPS = ("overlapped", "serial", "off")
PLANS = ("auto", "fixed")


@dataclass(frozen=True, slots=True)
class Plan:
    window: int              # draft tokens this step, 0..config.window
    kappa: int               # exit candidates per position, 1..config.kappa
    max_branches: int | None  # branch cap this step (None: as many as kappa and the window give)
    min_branch_prob: float   # ranked: drop branches the exit estimates below this
    fallback: str            # after a miss: "recompute" a fresh window or go on with the "exit"'s branches
    overlap: str             # "overlapped" (draft beside the suffix) | "serial" | "off" (target alone)

    def __post_init__(self):
        if not isinstance(self.window, int) or self.window < 0:
            raise ValueError(f"Plan.window must be an integer >= 0, got {self.window!r}")
        if not isinstance(self.kappa, int) or self.kappa < 1:
            raise ValueError(f"Plan.kappa must be an integer >= 1, got {self.kappa!r}")
        if self.max_branches is not None and (not isinstance(self.max_branches, int) or self.max_branches < 0):
            raise ValueError(f"Plan.max_branches must be None or an integer >= 0, got {self.max_branches!r}")
        if not 0 <= self.min_branch_prob < 1:
            raise ValueError(f"Plan.min_branch_prob must be in [0, 1), got {self.min_branch_prob!r}")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"Plan.fallback must be one of {FALLBACKS}, got {self.fallback!r}")
        if self.overlap not in OVERLAPS:
            raise ValueError(f"Plan.overlap must be one of {OVERLAPS}, got {self.overlap!r}")

    def label(self) -> str:
        """Short name for histograms and tables, e.g. 'w3 k2 b8 exit overlapped'."""
        if self.overlap == "off":
            return "off"
        cap = "" if self.max_branches is None else f" b{self.max_branches}"
        floor = f" p{self.min_branch_prob:g}" if self.min_branch_prob else ""
        return f"w{self.window} k{self.kappa}{cap}{floor} {self.fallback} {self.overlap}"


@dataclass(slots=True)
class StepRecord:
    """What one Mirror-SD step measured; host floats and ints only (no tensors)."""
    plan: Plan
    accepted: int             # draft tokens the target accepted
    window_len: int           # draft tokens verified this step (a copied or shortened window differs from plan)
    reuse_hit: bool           # the next window is a rolled-out branch
    lookup_hit: bool          # the next window was copied from the context
    fallback: bool            # the next window needed a fallback (neither of the above)
    branches: int             # branches the draft rolled out this step
    contained: bool | None    # the target's correction was among the exit's candidates (None: unknown)
    phase_s: dict             # seconds: keys among prefix, exit, suffix, draft, wait, verify, fallback, lane

    def step_s(self) -> float:
        """Seconds the step took on the target's side: every phase but the draft's rollouts, which run
        on the lane (their exposed part is the wait)."""
        return sum(s for name, s in self.phase_s.items() if name != "draft")


def config_kappa(config) -> int:
    """kappa from a config that names it ``kappa`` (or ``top_k``, the older name)."""
    kappa = getattr(config, "kappa", None)
    if kappa is None:
        with warnings.catch_warnings():  # an older config's top_k, read once
            warnings.simplefilter("ignore", DeprecationWarning)
            kappa = getattr(config, "top_k", None)
    return kappa if kappa is not None else 8


def config_field(config, name: str, default):
    """A setting from the config itself or from its draft options (``config.draft``)."""
    if hasattr(config, name):
        return getattr(config, name)
    return getattr(getattr(config, "draft", None), name, default)


def fixed_plan(config) -> Plan:
    """The config's own settings as a plan: window, kappa, branch cap, floor, fallback, overlapped."""
    return Plan(window=int(getattr(config, "window", 7)), kappa=int(config_kappa(config)),
                max_branches=config_field(config, "max_branches", None),
                min_branch_prob=float(config_field(config, "min_branch_prob", 0.0)),
                fallback=getattr(config, "fallback", "recompute"), overlap="overlapped")


class FixedPlanner:
    """The config's settings at every step (``plan="fixed"``). Keeps the same history as the
    AutoPlanner (predicted time None) so stats read alike."""

    def __init__(self, config):
        self.fixed = fixed_plan(config)
        self.history: list[tuple[Plan, float | None, float]] = []

    def plan(self) -> Plan:
        return self.fixed

    def observe(self, rec: StepRecord) -> None:
        self.history.append((rec.plan, None, rec.step_s()))

    def summary(self, since: int = 0) -> dict:
        """For a decoder's stats: the one plan, its steps from step `since` on, the measured mean step."""
        steps = len(self.history) - since
        measured = sum(m for _, _, m in self.history[since:]) / steps * 1e3 if steps > 0 else None
        label = self.fixed.label()
        return {"plans": {label: steps} if steps > 0 else {},
                "plan_step_ms": {label: {"predicted": None, "measured": measured}} if steps > 0 else {},
                "plan_now": label, "plan_pred_tok_s": None}


def plan_report(stats) -> list[str]:
    """Lines that show a run's decisions: AutoDecoder's choice and why, and the Mirror-SD plans used
    (steps each) with the latency law's mean predicted step beside the measured one. stats: one
    decoder's stats dict or a list of them (plans summed over the runs)."""
    runs = [stats] if isinstance(stats, dict) else list(stats)
    lines, reasons = [], {}
    steps, pred, meas = {}, {}, {}
    for s in runs:
        if s.get("auto_choice"):
            reasons[s["auto_reason"]] = None
        for label, n in (s.get("plans") or {}).items():
            row = (s.get("plan_step_ms") or {}).get(label, {})
            steps[label] = steps.get(label, 0) + n
            if row.get("measured") is not None:
                meas[label] = meas.get(label, 0.0) + row["measured"] * n
            if row.get("predicted") is not None:
                pred[label] = pred.get(label, 0.0) + row["predicted"] * n
    lines += [f"  auto decoder: {r}" for r in reasons]
    for label, n in sorted(steps.items(), key=lambda kv: -kv[1]):
        p = f"{pred[label] / n:.1f}" if label in pred else "-"
        m = f"{meas[label] / n:.1f}" if label in meas else "-"
        lines.append(f"  plan {label}: {n} steps, step predicted {p} ms, measured {m} ms")
    return lines


def check_plan_setting(plan) -> str:
    if plan not in PLANS:
        raise ValueError(f"plan must be one of {PLANS}, got {plan!r}")
    return plan


def make_planner(config, placement=None):
    """The planner ``config.plan`` names: "fixed" -> FixedPlanner, "auto" -> AutoPlanner."""
    kind = check_plan_setting(getattr(config, "plan", "fixed"))
    if kind == "fixed":
        return FixedPlanner(config)
    from mirror_rt.planner_auto import AutoPlanner  # noqa: PLC0415 - the estimator and search live apart
    return AutoPlanner(config, placement)


def __getattr__(name):  # ``from mirror_rt.planner import AutoPlanner`` without an import cycle
    if name == "AutoPlanner":
        from mirror_rt.planner_auto import AutoPlanner  # noqa: PLC0415
        return AutoPlanner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
