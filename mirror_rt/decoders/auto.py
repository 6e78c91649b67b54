"""AutoDecoder: autoregressive, vanilla SD or Mirror-SD, whichever this machine and pair run fastest.

The first ``generate`` call measures all three on the request itself: AR writes the first few
tokens, SD continues from them, Mirror-SD continues from SD's, each a short probe (each piece
starts from the previous piece's target cache, so the target reads the prompt once:
``decoders.reuse``); then the latency law (mirror_rt.sim) turns each probe's phase times into a
predicted tokens/s: AR's measured rate, SD's at its best window from its measured acceptance by
position, Mirror-SD's from its planner. The fastest (a simpler decoder wins ties within
``margin``) writes the rest, and every later call. Mirror-SD's draft lane starts in the
background: while a draft process is still starting (a new interpreter: seconds), its probe waits
for a later request and the choice is made between AR and SD meanwhile, then made again once
Mirror-SD is measured (on a request whose prompt is short enough that its draft reading it again
costs little: ``probe_budget``). When the chosen decoder's measured rate drifts more than
``drift`` from its prediction, the measurement replaces its estimate and the choice is made again
from the estimates (no new probes). ``warm_up(prompt)`` measures all three at once, waiting for
the draft process, before any request is served (benchmarks call it untimed, as they warm the
other decoders up).

Lossless whatever it picks: every decoder emits the target's tokens (greedy: exactly AR's), and a
continuation from any prefix is the target's continuation. Sampling: each piece draws from the
target's distribution given what came before, with its own seed derived from ``seed``.
"""
from __future__ import annotations

import time
from contextlib import suppress
from dataclasses import replace

import torch

from mirror_rt.decoders.autoregressive import AutoregressiveDecoder
from mirror_rt.decoders.base import GenerationOutput, as_prompt
from mirror_rt.decoders.mirror import MirrorConfig, MirrorDecoder
from mirror_rt.decoders.reuse import PrefixReuse
from mirror_rt.decoders.speculative import SpeculativeDecoder
from mirror_rt.lanes import LaneError, is_started, wait_started
from mirror_rt.placement import Placement
from mirror_rt.sim import SETUP_PHASES, accepted_by_position, predict_from_stats, tokens_per_s

NAMES = ("ar", "sd", "mirror")


class AutoDecoder:
    """target, draft: as for the other decoders; config: the MirrorConfig for Mirror-SD (its window
    also bounds SD's); placement: Mirror-SD's Placement (None: its default).
    probe: new tokens each decoder writes while measured (ar, sd, mirror); margin: how much faster a
    more complex decoder must be predicted to be chosen; drift: the relative gap between the chosen
    decoder's measured and predicted tokens/s that makes it choose again; probe_budget: a probe
    after the first request has its draft read the prompt once more (the target's rows are reused),
    so it waits for a later request when that read, counted at the target's prefill rate, would take
    more than this share of the request's decoding time (at the chosen decoder's measured rate)."""

    def __init__(self, target, draft, config: MirrorConfig | None = None, placement=None, *,
                 probe=(8, 16, 24), margin: float = 0.02, drift: float = 0.10, probe_budget: float = 0.25):
        if len(probe) != 3 or any(not isinstance(n, int) or n < 1 for n in probe):
            raise ValueError(f"probe must be three positive token counts (ar, sd, mirror), got {probe!r}")
        if not 0 <= margin < 1 or not 0 < drift < 1 or not probe_budget > 0:
            raise ValueError(f"AutoDecoder needs 0 <= margin < 1, 0 < drift < 1 and probe_budget > 0, got {margin}, "
                             f"{drift}, {probe_budget}")
        self.target, self.draft = target, draft
        config = config or MirrorConfig()
        where = placement or Placement(**config.legacy_placement)
        # never wait for a draft process: AR and SD are measured while it starts
        self.mirror = MirrorDecoder(target, draft, config, replace(where, lane_start="background"))
        self.max_window = self.mirror.config.window
        self.decoders = {"ar": AutoregressiveDecoder(target), "sd": SpeculativeDecoder(target, draft, self.max_window),
                         "mirror": self.mirror}
        self.reuse = PrefixReuse()  # each piece starts from the previous piece's target cache
        for dec in self.decoders.values():
            dec.reuse = self.reuse
        self.probe, self.margin, self.drift, self.probe_budget = dict(zip(NAMES, probe)), margin, drift, probe_budget
        self.prefill_rate: float | None = None  # prompt tokens/s of the target's prefill, measured
        self.estimates: dict[str, float] = {}   # predicted tokens/s per decoder from the last probes
        self.choice: str | None = None
        self.reason = ""
        self.ratio = 1.0                        # running measured / predicted of the chosen decoder

    # --- lifetime: Mirror-SD's lane -------------------------------------------------------------
    def close(self):
        self.mirror.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- generation -----------------------------------------------------------------------------
    def warm_up(self, input_ids, temperature=0.0, seed=None, **kwargs) -> dict:
        """Measure AR, SD and Mirror-SD now, on this prompt, in one generation whose tokens are thrown
        away: what a server does before its first request. Unlike a first ``generate``, it waits for
        Mirror-SD's draft process to start (seconds) and probes it too, and ignores EOS so that every
        probe runs its full length; estimates from earlier calls are replaced. input_ids as for
        ``generate``; returns the generation's stats (auto_choice, auto_reason, auto_estimates)."""
        self.estimates, self.choice, self.ratio = {}, None, 1.0
        n = sum(self.probe.values())
        return self._generate(input_ids, n, [], temperature, seed, kwargs, wait_for_lane=True).stats

    @torch.inference_mode()
    def generate(self, input_ids, max_new_tokens, eos_token_id=None, temperature=0.0, seed=None, **kwargs):
        """input_ids [1, L] (or [L]) int64 -> GenerationOutput(tokens [1, n] int64, stats); keywords as
        the other decoders' generate (top_k, top_p, stream, stop, tokenizer, ...). stats: the chosen
        decoder's, with decoder "auto", auto_choice, auto_reason, auto_estimates (predicted tok/s each),
        auto_pieces ([decoder, tokens] in order) and auto_last (the last piece's own stats, for the law)."""
        return self._generate(input_ids, max_new_tokens, eos_token_id, temperature, seed, kwargs)

    def _generate(self, *args, **kwargs):
        try:
            return self._write_pieces(*args, **kwargs)
        finally:
            self.reuse.clear()  # the cache is handed between a request's pieces, not kept after it

    @torch.inference_mode()
    def _write_pieces(self, input_ids, max_new_tokens, eos_token_id, temperature, seed, kwargs, wait_for_lane=False):
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        ids = as_prompt(input_ids, self.target.config.vocab_size, self.target.device)[None]
        t0 = time.perf_counter()
        stopper = _stop_checker(kwargs.get("stop"), kwargs.get("tokenizer"))
        eos = _eos_ids(self.target, eos_token_id)
        new, pieces, last_stats, done, used = [], [], None, False, None
        order = [n for n in NAMES if n not in self.estimates and (self.choice is None or n == "mirror")]
        while not done and len(new) < max_new_tokens:
            # Mirror-SD's lane is opened at its turn, after AR's and SD's probes: a process lane starting
            # beside them (an interpreter importing torch) would slow them and bias their estimates
            if order and order[0] == "mirror" and not is_started(self.mirror._lane()):
                if wait_for_lane:
                    with suppress(LaneError):  # a lane that failed to start: Mirror-SD's piece says so
                        wait_started(self.mirror.lane)
                else:
                    order.pop(0)  # its draft process is still starting: measured on a later request
                    continue
            if order and self._too_costly(ids.shape[1] + len(new), max_new_tokens - len(new)):
                order.clear()  # a long prompt: its probes wait for a shorter request
                continue
            if order:  # still measuring
                name = order.pop(0)
            else:
                name = used = self._choose()
            budget = max_new_tokens - len(new)
            n = min(budget, self.probe[name]) if name not in self.estimates else budget
            piece_seed = None if seed is None else seed + 1_000_003 * len(pieces)
            prefix = torch.cat([ids, torch.tensor([new], dtype=ids.dtype, device=ids.device)], 1) if new else ids
            lane = self.mirror.lane
            starting = lane is not None and not is_started(lane)  # a piece beside it runs slower than it will
            out = self.decoders[name].generate(prefix, n, eos_token_id=eos_token_id, temperature=temperature,
                                               seed=piece_seed, **kwargs)
            got = out.tokens[0].tolist()
            self._note_prefill(prefix.shape[1], out.stats)
            if stopper is not None:
                keep = stopper(got)
                if keep is not None:
                    got, done = got[:keep], True
            new += got
            pieces.append([name, len(got)])
            last_stats = out.stats
            done = done or len(got) < n or (bool(got) and got[-1] in eos)
            if name not in self.estimates and len(got) == n:
                self.estimates[name] = self._estimate(name, out.stats)
                self.choice = None  # a late measurement (Mirror-SD's) makes the choice again
            elif name == self.choice and not starting:
                self._track(out.stats)
        if self.choice is None and {"ar", "sd"} <= set(self.estimates):
            used = self._choose()
        stats = dict(last_stats or {})
        wall = time.perf_counter() - t0
        stats.update(decoder="auto", new_tokens=len(new), wall_s=wall, tokens_per_s=tokens_per_s(len(new), wall),
                     auto_choice=self.choice or used, auto_reason=self.reason, auto_estimates=dict(self.estimates) or None,
                     auto_pieces=pieces, auto_last=last_stats)
        return GenerationOutput(torch.tensor([new], dtype=torch.int64, device=self.target.device), stats)

    # --- what a probe costs ----------------------------------------------------------------------
    def _note_prefill(self, prompt_tokens: int, stats: dict):
        """The target's prefill rate, from a piece that read the whole prompt (a request's first)."""
        seconds = stats.get("phase_s", {}).get("prefill", 0.0)
        if seconds > 0 and prompt_tokens > 0 and not stats.get("prefill_reused"):
            self.prefill_rate = prompt_tokens / seconds

    def _too_costly(self, prompt_tokens: int, remaining: int) -> bool:
        """Whether a probe now (its draft's read of the prompt) would cost more than ``probe_budget``
        of decoding the rest of this request; never before a choice exists (the first request
        measures AR and SD whatever its length)."""
        rate = self.estimates.get(self.choice) if self.choice else None
        if not rate or not self.prefill_rate:
            return False
        return prompt_tokens / self.prefill_rate > self.probe_budget * remaining / rate

    # --- the choice -----------------------------------------------------------------------------
    def _choose(self) -> str:
        if self.choice is None:
            est = self.estimates
            best = "ar"
            for name in ("sd", "mirror"):  # a more complex decoder must win by the margin
                if name in est and est[name] > est[best] * (1 + self.margin):
                    best = name
            self.choice, self.ratio = best, 1.0
            rest = ", ".join(f"{n} {est[n]:.1f}" for n in NAMES if n in est and n != best)
            self.reason = (f"{best}: predicted {est[best]:.1f} tok/s against {rest} (latency law on a measured probe"
                           f"{self._detail(best)}; margin {self.margin:.0%})")
            if "mirror" not in est:
                self.reason += ("; Mirror-SD not measured yet (its draft process was starting, or later prompts "
                                "were too long to measure it cheaply)")
        return self.choice

    def _detail(self, name: str) -> str:
        if name == "sd":
            return f", SD window {self.decoders['sd'].window}"
        if name == "mirror" and getattr(self, "mirror_plan", None):
            return f", plan {self.mirror_plan}"
        return ""

    def _estimate(self, name: str, stats: dict) -> float:
        """Predicted decode tokens/s of `name` from its probe's stats."""
        if name == "sd":
            return self._best_sd(stats)
        if name == "mirror":
            planned = stats.get("plan_pred_tok_s") or _decode_rate(stats)
            self.mirror_plan = stats.get("plan_now")
            if self.mirror_plan == "off" and "ar" in self.estimates:
                # its planner runs the target alone: AR with Mirror-SD's bookkeeping, never faster than
                # AR (AR's probe, the first piece, may also have paid the process's warm-up)
                return min(planned, self.estimates["ar"])
            return planned
        return _decode_rate(stats)

    def _best_sd(self, stats: dict) -> float:
        """SD at the window the law predicts fastest (1..the config's window), from the probe's
        acceptance by position and its draft and target costs; switches SD to that window."""
        steps, w = stats.get("steps", 0), self.decoders["sd"].window
        if not steps:
            return _decode_rate(stats)
        ph = stats.get("phase_s", {})
        draft_token = ph.get("draft", 0.0) / (steps * w)
        target = (ph.get("target", 0.0) + ph.get("verify", 0.0)) / steps
        rest = max(0.0, predict_from_stats(stats)["meas_step_s"] - draft_token * w - target)  # what the law misses
        rates = _accept_rates(stats.get("accepted_hist", {}), w)
        best = max(range(1, self.max_window + 1),
                   key=lambda k: (1 + accepted_by_position(rates, k)) / (k * draft_token + target + rest))
        if best != w:
            self.decoders["sd"] = SpeculativeDecoder(self.target, self.draft, best)
            self.decoders["sd"].reuse = self.reuse
        return (1 + accepted_by_position(rates, best)) / (best * draft_token + target + rest)

    def _track(self, stats: dict):
        """After a piece by the chosen decoder: when its rate drifted from the prediction, its
        measured rate replaces its estimate and the choice is made again from the estimates (no new
        probes: each would slow the request it runs in). AR's rate is the target's speed alone, so
        AR's drift (a longer context, a busier machine) moves every decoder's estimate by the same
        factor, which keeps the choice; SD's or Mirror-SD's may be their own (their acceptance)."""
        if stats.get("new_tokens", 0) < 8 or not self.estimates.get(self.choice):
            return
        measured = _decode_rate(stats)
        self.ratio = 0.5 * self.ratio + 0.5 * measured / self.estimates[self.choice]
        if abs(self.ratio - 1) > self.drift:
            old, factor = self.choice, self.ratio
            for name in list(self.estimates) if old == "ar" else [old]:
                self.estimates[name] *= factor
            self.choice, self.ratio = None, 1.0
            note = f"{old} measured {self.estimates[old]:.1f} tok/s, off its prediction: chose again"
            if old == "ar":
                note += f" with every estimate x{factor:.2f}"
            self._choose()
            self.reason += f" ({note})"


def _decode_rate(stats: dict) -> float:
    """Tokens/s of the decoding steps (prefill and other set-up excluded)."""
    setup = sum(stats.get("phase_s", {}).get(p, 0.0) for p in SETUP_PHASES)
    return tokens_per_s(stats.get("new_tokens", 0), max(stats.get("wall_s", 0.0) - setup, 1e-9))


def _accept_rates(hist: dict, window: int) -> list[float]:
    """a_i = P(w_i accepted | w_1..w_{i-1} accepted) from an accepted-length histogram at `window`."""
    hist = {int(k): v for k, v in hist.items()}
    rates = []
    for i in range(1, window + 1):
        reached = sum(v for k, v in hist.items() if k >= i - 1)
        took = sum(v for k, v in hist.items() if k >= i)
        rates.append((took + 0.5) / (reached + 1.0))
    return rates


def _eos_ids(target, eos_token_id) -> set:
    try:
        from mirror_rt.generation import resolve_eos
        return set(resolve_eos(target, eos_token_id))
    except ImportError:  # noqa: PERF203 - an older build: only the ids given
        if eos_token_id is None:
            return set()
        return {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)


def _stop_checker(stop, tokenizer):
    """Stop strings across pieces: a callable(ids) -> how many of `ids` to keep, or None."""
    if stop is None:
        return None
    from mirror_rt.generation import StopStrings
    s = StopStrings(stop, tokenizer)
    return s.feed
