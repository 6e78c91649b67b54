"""The latency law of Mirror-SD (DESIGN.md §1), fed by measured per-phase times.

    T_mirror = T_prefix + T_rv_exit + max(T_suffix, T_draft_gen) + T_rv_verify
               + fallback_rate * T_fallback            (the term the paper's Eq. 10 leaves out)
    T_sd     = T_draft_gen + T_target                   (vanilla SD; verify counted with the target)
    T_ar     = T_target(1 token)
    tokens/s = tokens per step / step time              (tokens per step = 1 + E[A] ideally)

``predict_from_stats(stats)`` maps a ``GenerationOutput.stats`` dict (or a list of them, summed)
onto these terms and returns the predicted step time and tokens/s beside the measured ones, so a
benchmark can show how much of the measured time the law explains. What the law cannot see
(lane round trips, Python between phases) shows up as the gap between the two.

Mapping of measured phases (``stats["phase_s"]``, seconds summed over the run) to law terms:
    mirror: prefix -> T_prefix; exit -> T_rv_exit (exit head + top-kappa crossing to the draft);
            suffix -> T_suffix; draft (rollout spans on the lane) -> T_draft_gen;
            verify -> T_rv_verify; fallback -> fallback_rate * T_fallback; target (the last,
            target-only token) is added serially.
    sd:     draft -> T_draft_gen; target + verify -> T_target.
    ar:     target -> T_target.
All terms are per-step means (phase total / steps); max() of means is a lower bound of the mean of
per-step maxima, so the law slightly under-predicts when suffix and draft times cross from step to step.
"""
from __future__ import annotations

# Phases run once per generation, outside the step loop: excluded from the measured step time.
SETUP_PHASES = ("prefill", "first_window")


def mirror_step_time(prefix: float, rv_exit: float, suffix: float, draft_gen: float, rv_verify: float,
                     fallback_rate: float = 0.0, fallback_time: float = 0.0) -> float:
    """Seconds per Mirror-SD step: the paper's Eq. 10 plus fallback_rate * fallback_time
    (fallback_time: seconds of one fresh window rolled out while the target waits)."""
    return prefix + rv_exit + max(suffix, draft_gen) + rv_verify + fallback_rate * fallback_time


def sd_step_time(draft_gen: float, target: float) -> float:
    """Seconds per vanilla SD step: the draft's window, then the target's verification pass."""
    return draft_gen + target


def tokens_per_s(tokens_per_step: float, step_time: float) -> float:
    return tokens_per_step / step_time if step_time > 0 else 0.0


def expected_accepted(alpha: float, window: int) -> float:
    """E[A] for i.i.d. per-token acceptance alpha and window gamma: sum_{i=1..gamma} alpha^i."""
    return sum(alpha ** i for i in range(1, window + 1))


def _merge(stats) -> dict:
    """One stats dict from one or several (phase times, steps, tokens, counters summed)."""
    runs = [stats] if isinstance(stats, dict) else list(stats)
    if not runs:
        raise ValueError("predict_from_stats needs at least one stats dict")
    via_auto = any(r.get("decoder") == "auto" for r in runs)
    if via_auto:  # AutoDecoder: the pieces its chosen decoder wrote (the most frequent choice)
        runs = [r["auto_last"] for r in runs if r.get("auto_last")]
        if not runs:
            raise ValueError("AutoDecoder stats hold no decoding piece: nothing to predict")
        chosen = max(set(r.get("decoder") for r in runs), key=[r.get("decoder") for r in runs].count)
        runs = [r for r in runs if r.get("decoder") == chosen]
    merged = {"decoder": runs[0].get("decoder", "?"), "phase_s": {}, "via_auto": via_auto}
    for key in ("steps", "new_tokens", "wall_s", "reuse_hits", "fallbacks"):
        merged[key] = sum(r.get(key, 0) for r in runs)
    merged["accepted_sum"] = sum(r.get("mean_accepted", 0.0) * r.get("steps", 0) for r in runs)
    for r in runs:
        for name, secs in r.get("phase_s", {}).items():
            merged["phase_s"][name] = merged["phase_s"].get(name, 0.0) + secs
    return merged


def predict_from_stats(stats) -> dict:
    """stats: a GenerationOutput.stats dict, or a list of them from the same decoder.

    Returns a dict of floats (seconds, tokens/s) with keys:
      decoder, steps, mean_accepted, tokens_per_step (measured new_tokens / steps),
      terms (the law's per-step terms), pred_step_s, meas_step_s (wall minus setup phases, per step),
      pred_tok_s, meas_tok_s (decode-only: setup phases excluded), serial_step_s (Mirror only: the
      same phases with no overlap), ideal_tok_s (1 + E[A] tokens per predicted step),
      reuse_rate, fallback_rate, explained (pred_step_s / meas_step_s)."""
    m = _merge(stats)
    steps = m["steps"]
    if steps <= 0:
        raise ValueError("stats hold no decoding steps: nothing to predict")
    per = {k: v / steps for k, v in m["phase_s"].items()}
    ph = lambda name: per.get(name, 0.0)  # noqa: E731 - phases a decoder never ran cost nothing
    decoder = m["decoder"]
    out = {"decoder": decoder, "steps": steps, "via_auto": m["via_auto"]}
    if decoder == "mirror":
        fallback_rate = m["fallbacks"] / steps
        fallback_time = m["phase_s"].get("fallback", 0.0) / m["fallbacks"] if m["fallbacks"] else 0.0
        terms = {"prefix": ph("prefix"), "rv_exit": ph("exit"), "suffix": ph("suffix"), "draft_gen": ph("draft"),
                 "rv_verify": ph("verify"), "fallback_rate": fallback_rate, "fallback_time": fallback_time}
        pred = mirror_step_time(**terms) + ph("target")
        out["serial_step_s"] = (ph("prefix") + ph("exit") + ph("suffix") + ph("draft") + ph("verify")
                                + ph("fallback") + ph("target"))
        out["reuse_rate"] = m["reuse_hits"] / steps
        out["fallback_rate"] = fallback_rate
    elif decoder == "sd":
        terms = {"draft_gen": ph("draft"), "target": ph("target") + ph("verify")}
        pred = sd_step_time(**terms)
    else:  # ar, or any decoder that reports only target time
        terms = {"target": ph("target")}
        pred = ph("target")
    setup = sum(m["phase_s"].get(p, 0.0) for p in SETUP_PHASES)
    decode_wall = max(m["wall_s"] - setup, 0.0)
    out["terms"] = terms
    out["mean_accepted"] = m["accepted_sum"] / steps
    out["tokens_per_step"] = m["new_tokens"] / steps
    out["pred_step_s"] = pred
    out["meas_step_s"] = decode_wall / steps
    out["pred_tok_s"] = tokens_per_s(out["tokens_per_step"], pred)
    out["meas_tok_s"] = m["new_tokens"] / decode_wall if decode_wall > 0 else 0.0
    out["ideal_tok_s"] = tokens_per_s(1.0 + out["mean_accepted"], pred)
    out["explained"] = pred / out["meas_step_s"] if out["meas_step_s"] > 0 else 0.0
    return out


def format_prediction(pred: dict) -> str:
    """One line: predicted vs measured step time and tokens/s, plus the law's terms in ms."""
    ms = lambda s: f"{s * 1e3:.1f}"  # noqa: E731
    t = pred["terms"]
    if pred["decoder"] == "mirror":
        law = (f"prefix {ms(t['prefix'])} + exit {ms(t['rv_exit'])} + max(suffix {ms(t['suffix'])}, "
               f"draft {ms(t['draft_gen'])}) + verify {ms(t['rv_verify'])} + fallback "
               f"{t['fallback_rate']:.0%} x {ms(t['fallback_time'])}; serial {ms(pred['serial_step_s'])}")
    elif pred["decoder"] == "sd":
        law = f"draft {ms(t['draft_gen'])} + target {ms(t['target'])}"
    else:
        law = f"target {ms(t['target'])}"
    name = f"auto: {pred['decoder']}" if pred.get("via_auto") else pred["decoder"]
    return (f"[{name}] law: {law} ms -> predicted step {ms(pred['pred_step_s'])} ms, "
            f"measured {ms(pred['meas_step_s'])} ms ({pred['explained']:.0%} explained); "
            f"tok/s predicted {pred['pred_tok_s']:.1f}, measured {pred['meas_tok_s']:.1f}")


# --- the law applied to a plan (mirror_rt.planner): what one Mirror-SD step is predicted to give ---

def accepted_by_position(accept_rates, window: int) -> float:
    """E[A] for a window of `window` tokens with per-position acceptance a_1, a_2, ... (a_i: the
    probability that w_i is accepted once w_1..w_{i-1} were; the last rate repeats beyond the list):
    sum_{j=1..window} prod_{i<=j} a_i."""
    if window <= 0:
        return 0.0
    if not accept_rates:
        raise ValueError("accepted_by_position needs at least one acceptance rate")
    total, reach = 0.0, 1.0
    for j in range(window):
        reach *= accept_rates[min(j, len(accept_rates) - 1)]
        total += reach
    return total


def reuse_probability(hit_per_unit: float, units: float) -> float:
    """P(the target's correction is among the branches) when each unit of branch budget (a
    candidate per position, or a ranked branch) independently holds it with hit_per_unit:
    1 - (1 - p)^units."""
    if units <= 0:
        return 0.0
    return 1.0 - (1.0 - hit_per_unit) ** units


def overlap_span(suffix: float, draft_gen: float, overlap: str) -> float:
    """The middle of a Mirror step: max(suffix, draft) overlapped, their sum serially."""
    return max(suffix, draft_gen) if overlap == "overlapped" else suffix + draft_gen


def plan_rate(tokens_full: float, t_full: float, miss: float, fallback: str, t_fallback: float = 0.0,
              t_empty: float = 0.0, miss_empty: float | None = None) -> tuple[float, float, float]:
    """(tokens/s, mean seconds per step, mean tokens per step) of a Mirror plan in steady state.

    tokens_full, t_full: tokens and seconds of a step with a window (1 + E[A]; the law's step time).
    miss: P(no branch and no copied window holds the next window).
    fallback "recompute": every miss adds t_fallback (a fresh window while the target waits).
    fallback "exit": a miss makes the next step empty (1 token, t_empty); an empty step misses
    again with miss_empty (default miss): empty steps per full step = miss / (1 - miss_empty)."""
    if fallback == "recompute":
        step = t_full + miss * t_fallback
        return tokens_per_s(tokens_full, step), step, tokens_full
    m0 = min(miss if miss_empty is None else miss_empty, 0.99)
    empties = miss / (1.0 - m0)
    tokens, seconds, steps = tokens_full + empties, t_full + empties * t_empty, 1.0 + empties
    return tokens_per_s(tokens, seconds), seconds / steps, tokens / steps


def sd_rate(accept_rates, window: int, draft_token: float, target_pass) -> float:
    """Vanilla SD tokens/s at `window`: (1 + E[A]) / (window * draft_token + target_pass(window + 1))."""
    return tokens_per_s(1.0 + accepted_by_position(accept_rates, window),
                        sd_step_time(window * draft_token, target_pass(window + 1)))
