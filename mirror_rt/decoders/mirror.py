"""Mirror Speculative Decoding (DESIGN.md §1).

One step, as the paper draws it:

    prefix    target layers [0, l_e) over [pending, w_1..w_n]
    exit      exit head at every position -> branch candidates E [n+1, k] (ids; only E crosses),
              top-kappa per position or ranked by estimated P(A = i, c = v) (mirror_exit.py)
    overlap   target suffix [l_e, N)   ||   draft rolls out every branch (i, v in E_i) as one tree
    verify    verify_accept -> accepted A, next token c; commit w_1..w_A, c
    reuse     c in E_A: branch (A, c) is the next window (its draft KV adopted); else fallback:
              "recompute" (the paper) waits for the draft to roll out a fresh window from c;
              "exit" starts the next step at once with an empty window, whose exit branches give
              the draft its next window while the target computes c's successor
    lookup    (greedy, ``lookup`` > 0) before any of that, a window copied from the context
              (lookup.py) is the next window when there is one; the draft skips those branches

The draft lives behind a lane (same thread, worker thread, device stream or second process), so
the overlap is real wherever the lane allows it. Output is exactly the target's (lossless).
"""
from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from mirror_rt.decoders.autoregressive import autoregressive_tail
from mirror_rt.decoders.base import (Emitter, GenerationOutput, Sampler, Stats, as_prompt, check_context,
                                     check_finite, check_generation_args, check_pair, prefill)
from mirror_rt.decoders.drafting import check_min_draft_prob
from mirror_rt.decoders.lookup import check_lookup, check_lookup_window
from mirror_rt.decoders.mirror_draft import MirrorDraft
from mirror_rt.decoders.mirror_exit import POLICIES, ExitProposer, draft_vocabulary
from mirror_rt.decoders.speculative import verify_chain
from mirror_rt.lanes import LANE_KINDS, LaneError, is_ready, make_lane, result_of

MODES = ("greedy", "match", "rejection")
FALLBACKS = ("recompute", "exit")


@dataclass(slots=True)
class MirrorConfig:
    exit_layer: int | None = None    # l_e; default N // 2
    top_k: int = 8                   # kappa: exit candidates per position (ranked: (window+1)*kappa in all)
    window: int = 7                  # gamma: draft tokens per window (and rollout depth)
    mode: str = "match"              # acceptance rule when sampling (temperature 0 is always greedy)
    max_branches: int | None = None  # cap on branches per step (None: as many as fit one tree)
    exit_head: object = None         # callable hidden [1, T, H] -> logits [1, T, V]; None = logit lens
    lane: str = "auto"               # where the draft runs: one of LANE_KINDS
    draft_threads: int | None = None  # draft's torch threads on a thread/process lane (None: half the caller's)
    lane_timeout: float = 120.0      # seconds before a silent draft lane counts as failed
    # Added after the first release's fields, so positional construction keeps its meaning:
    branch_policy: str = "ranked"    # "per_position" (top-kappa at every i) or "ranked" (mirror_exit.py)
    min_branch_prob: float = 0.0     # ranked: skip branches the exit estimates below this probability
    fallback: str = "recompute"      # after a miss: "recompute" a window (serial) or "exit" (see above)
    exit_vocab: str = "draft"        # "draft": score only a reduced-vocabulary draft's ids; "full"
    lookup: int = 0                  # context lookup's longest n-gram, tried before the draft (greedy; 0: off)
    lookup_window: int | None = None  # tokens a copied window may hold (None: window); no draft pass makes them
    min_draft_prob: float = 0.0      # a draft window (fresh or a branch's) ends before its first token below this

    def validate(self, num_layers: int):
        head_layer = getattr(self.exit_head, "exit_layer", None)  # a trained head knows its layer
        if self.exit_layer is None:
            self.exit_layer = head_layer if head_layer is not None else num_layers // 2
        if head_layer is not None and head_layer != self.exit_layer:
            raise ValueError(f"exit_layer {self.exit_layer} differs from the exit head's layer {head_layer}")
        if not isinstance(self.exit_layer, int) or not 1 <= self.exit_layer <= num_layers - 1:
            raise ValueError(f"exit_layer must be an integer in [1, {num_layers - 1}], got {self.exit_layer!r}")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= 64:
            raise ValueError(f"top_k (kappa) must be an integer in [1, 64], got {self.top_k!r}")
        if not isinstance(self.window, int) or not 1 <= self.window <= 32:
            raise ValueError(f"window (gamma) must be an integer in [1, 32], got {self.window!r}")
        if self.branch_policy not in POLICIES:
            raise ValueError(f"branch_policy must be one of {POLICIES}, got {self.branch_policy!r}")
        if not isinstance(self.min_branch_prob, (int, float)) or not 0 <= self.min_branch_prob < 1:
            raise ValueError(f"min_branch_prob must be in [0, 1), got {self.min_branch_prob!r}")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {self.fallback!r}")
        if self.exit_vocab not in ("draft", "full"):
            raise ValueError(f"exit_vocab must be 'draft' or 'full', got {self.exit_vocab!r}")
        check_lookup(self.lookup)
        self.lookup_window = check_lookup_window(self.lookup_window, self.window, 32)
        self.min_draft_prob = check_min_draft_prob(self.min_draft_prob)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.max_branches is not None and (not isinstance(self.max_branches, int) or self.max_branches < 0):
            raise ValueError(f"max_branches must be None or an integer >= 0, got {self.max_branches!r}")
        if self.lane not in LANE_KINDS:
            raise ValueError(f"lane must be one of {LANE_KINDS}, got {self.lane!r}")
        if self.exit_head is not None and not callable(self.exit_head):
            raise TypeError("exit_head must be callable: hidden [1, T, H] -> logits [1, T, V]")
        return self


class MirrorDecoder:
    def __init__(self, target, draft, config: MirrorConfig | None = None):
        check_pair(target, draft)
        self.target, self.draft = target, draft
        self.config = (config or MirrorConfig()).validate(target.num_layers)
        self.lane = None
        self.draft_threads = None  # what the lane's draft got (its share of the caller's cores)

    # --- lane lifetime: one draft worker per decoder, reused across generate() calls -------------

    def _lane(self):
        """The draft's lane, built on first use. With a CPU draft on a worker thread or a second
        process the two sides share the caller's cores: the draft takes draft_threads (default
        half), the steps the rest."""
        if self.lane is None:
            cfg = self.config
            maker = _DraftFactory(self.draft, cfg.window, cfg.max_branches, cfg.lookup, cfg.lookup_window,
                                  cfg.min_draft_prob)
            threads = cfg.draft_threads
            if threads is None and cfg.lane in ("auto", "thread", "process") and self.draft.device.type == "cpu":
                threads = max(1, torch.get_num_threads() // 2)
            self.lane = make_lane(cfg.lane, maker, self.draft.device, threads)
            self.draft_threads = threads
        return self.lane

    def step_threads(self, caller_threads: int) -> int | None:
        """torch threads for the target's steps beside a draft that took its share of the caller's
        cores on a thread or process lane; None when the caller's count stays as it is."""
        if not self.draft_threads or self.lane is None or self.lane.kind not in ("thread", "process"):
            return None
        return max(1, caller_threads - self.draft_threads)

    def close(self):
        if self.lane is not None:
            self.lane.close()
            self.lane = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # --- generation ------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, input_ids, max_new_tokens, eos_token_id=None, temperature=0.0, seed=None,
                 top_k=0, top_p=1.0, stream=None) -> GenerationOutput:
        """input_ids [1, L] (or [L]) int64 -> GenerationOutput(tokens [1, n], stats).
        stream: optional callable receiving each list of newly emitted token ids."""
        check_generation_args(max_new_tokens, temperature, top_k, top_p)
        cfg, target = self.config, self.target
        mode = "greedy" if temperature == 0 else cfg.mode
        if mode == "greedy" and temperature > 0:
            raise ValueError("mode 'greedy' needs temperature 0; use 'match' or 'rejection' to sample")
        prompt = as_prompt(input_ids, target.config.vocab_size, target.device)
        reserve = max(cfg.window, cfg.lookup_window) + 1
        capacity = check_context(target, prompt.numel(), max_new_tokens, reserve)
        check_context(self.draft, prompt.numel(), max_new_tokens, reserve)
        run = _Run(self, prompt, capacity, max_new_tokens, eos_token_id, mode, temperature, top_k, top_p, seed, stream)
        return run.generate()


class _DraftFactory:
    """Builds the draft worker inside its lane (picklable, for the process lane)."""

    def __init__(self, draft, window, max_branches, lookup, lookup_window=None, min_draft_prob=0.0):
        self.draft, self.window, self.max_branches, self.lookup = draft, window, max_branches, lookup
        self.lookup_window, self.min_draft_prob = lookup_window, min_draft_prob

    def __call__(self):
        return MirrorDraft(self.draft, self.window, self.max_branches, self.lookup, self.lookup_window,
                           self.min_draft_prob)


class _Run:
    """One generate() call: the step loop and its bookkeeping."""

    def __init__(self, dec, prompt, capacity, max_new_tokens, eos, mode, temperature, top_k, top_p, seed, stream):
        self.dec, self.cfg, self.target = dec, dec.config, dec.target
        self.prompt, self.capacity, self.max_new = prompt, capacity, max_new_tokens
        self.mode, self.temperature, self.top_k, self.top_p, self.seed = mode, temperature, top_k, top_p, seed
        self.sampler = Sampler(temperature, top_k, top_p, seed, self.target.device)
        self.cache = self.target.new_cache(capacity)
        self.out, self.stats = Emitter(max_new_tokens, eos, stream), Stats("mirror")
        self.suffix_spans, self.rollout_spans = [], []
        self.suffix_threads = None  # the target's torch threads beside the draft (share_cores)
        vocab = draft_vocabulary(dec.draft, prompt) if self.cfg.exit_vocab == "draft" else None
        self.exit = ExitProposer(self.target, self.cfg.exit_head, self.cfg.top_k, self.cfg.branch_policy, vocab,
                                 self.cfg.max_branches, self.cfg.window, self.cfg.min_branch_prob)

    def generate(self) -> GenerationOutput:
        stats, timeout = self.stats, self.cfg.lane_timeout
        self.tokens = self.prompt.tolist()
        self.caller_threads = torch.get_num_threads()
        try:
            try:
                # The draft's prefill and first window go to the lane first, so that on a thread, process
                # or stream lane they overlap the target's prefill (an inline lane runs them right here).
                lane = self.dec._lane()
                started = lane.submit("start", self.tokens, self.capacity, self.temperature, self.top_k,
                                      self.top_p, self.seed)
                first = lane.submit("fresh_window", self.cfg.window)
            finally:  # even when the lane failed: the target alone then finishes from this cache
                with stats.phase("prefill"):  # with all the caller's threads (the draft's prefill is short)
                    prefill(self.target, self.cache, self.prompt)
            self.share_cores()
            with stats.phase("first_window"):
                result_of(started, timeout)
                window, q = result_of(first, timeout)[0]
            while not self.out.done:
                window, q = self.step(lane, window, q)
        except LaneError as e:
            self.draft_failed(e)
        finally:
            torch.set_num_threads(self.caller_threads)
        return GenerationOutput(self.out.result(self.target.device), self.finish())

    def share_cores(self):
        """On a CPU thread or process lane the steps run beside the draft's rollouts: this thread
        keeps the cores the draft did not take (torch's thread count is per thread; restored at
        the end)."""
        self.suffix_threads = self.dec.step_threads(self.caller_threads)
        if self.suffix_threads is not None:
            torch.set_num_threads(self.suffix_threads)

    @contextmanager
    def all_cores(self):
        """The target's prefix and exit run while the draft waits for the exit's branches: with every
        core of the caller's, then back to the target's share beside the draft's rollouts."""
        if self.suffix_threads is None:
            yield
            return
        torch.set_num_threads(self.caller_threads)
        try:
            yield
        finally:
            torch.set_num_threads(self.suffix_threads)

    def step(self, lane, window, q):
        """One Mirror-SD step; returns the next window and its q rows."""
        target, stats, le = self.target, self.stats, self.cfg.exit_layer
        remaining = self.max_new - len(self.out.tokens)
        if remaining == 1:  # one token left: the target alone, on every core
            with self.all_cores():
                self.tokens.append(autoregressive_tail(target, self.cache, self.tokens[-1], self.sampler, self.out,
                                                       stats))
            return [], None
        window = window[: remaining - 1]
        n = len(window)
        if n == 0:  # after a miss with fallback="exit": no window, the exit's branches still roll out
            stats.counters["empty_steps"] += 1
        node_ids = torch.tensor([[self.tokens[-1]] + window], device=target.device)
        with self.all_cores():
            with stats.phase("prefix"):
                hidden = target.run_layers(target.embed(node_ids), 0, le, self.cache)
            with stats.phase("exit"):
                exit_ids = self.exit(hidden, window)
        rollouts = lane.submit("rollouts", window, exit_ids, self.cfg.window)
        with stats.phase("suffix"):
            t0 = time.perf_counter()
            logits = self.suffix(hidden, rollouts)
            check_finite(logits, "target", stats.steps)
            self.suffix_spans.append((t0, time.perf_counter()))
        with stats.phase("verify"):
            accepted, next_token = self.verify(node_ids, logits, q)
        self.cache.commit(1 + accepted)
        new = window[:accepted] + [next_token]
        self.tokens += new
        self.out.emit(new)
        stats.add_step(accepted)
        with stats.phase("wait"):
            n_branches, r0, r1 = result_of(rollouts, self.cfg.lane_timeout)
        self.rollout_spans.append((r0, r1))
        stats.phase_s["draft"] += r1 - r0
        stats.counters["branches"] += n_branches
        if self.out.done:
            return [], None
        source, next_window, next_q = lane.call("advance", accepted, next_token, timeout=self.cfg.lane_timeout)
        if source == "branch":
            stats.counters["reuse_hits"] += 1
            return next_window, next_q
        if source == "lookup":
            stats.counters["lookup_windows"] += 1
            return next_window, next_q
        stats.counters["fallbacks"] += 1
        if self.cfg.fallback == "exit":
            return [], None
        with stats.phase("fallback"):
            return lane.call("fresh_window", self.cfg.window, timeout=self.cfg.lane_timeout)

    def suffix(self, hidden, rollouts):
        """The target's layers [l_e, N) and head beside the draft's rollouts -> logits. On a thread or
        process lane sharing the caller's cores, layer by layer on the target's share until the
        rollouts are done, then the rest on every core (never both sides on a core: OpenMP teams on
        an oversubscribed core stall)."""
        target, layer, n = self.target, self.cfg.exit_layer, self.target.num_layers
        shared = self.suffix_threads is not None
        while shared and layer < n and not is_ready(rollouts):
            hidden = target.run_layers(hidden, layer, layer + 1, self.cache)
            layer += 1
        if shared and not is_ready(rollouts):  # every layer ran beside the draft; so does the head
            return target.head(hidden)
        with self.all_cores():
            return target.head(target.run_layers(hidden, layer, n, self.cache))

    def verify(self, node_ids, logits, q):
        return verify_chain(node_ids, logits, q, self.mode, self.sampler, self.temperature, self.top_k, self.top_p)

    def draft_failed(self, error: LaneError):
        """Keep every committed token and finish with the target alone."""
        warnings.warn(f"Mirror-SD draft lane failed ({error}); finishing with the target alone", RuntimeWarning,
                      stacklevel=3)
        self.stats.counters["draft_failures"] += 1
        self.stats.counters["draft_error"] = str(error)
        torch.set_num_threads(self.caller_threads)  # the target alone: every core again
        self.dec.lane, lane = None, self.dec.lane
        if lane is not None:
            try:
                lane.close(wait=False)
            except Exception:  # noqa: BLE001 - the lane is already broken
                pass
        while not self.out.done:
            with self.stats.phase("ar_after_failure"):
                self.tokens.append(autoregressive_tail(self.target, self.cache, self.tokens[-1], self.sampler,
                                                       self.out, self.stats))

    def finish(self) -> dict:
        s = self.stats
        steps = max(s.steps, 1)
        empty = s.counters["empty_steps"]  # steps with no draft window (fallback="exit")
        overlap = sum(_intersect(a, b) for a, b in zip(self.suffix_spans, self.rollout_spans))
        rollout_total = sum(b - a for a, b in self.rollout_spans)
        return s.finish(
            len(self.out.tokens), window=self.cfg.window, exit_layer=self.cfg.exit_layer, kappa=self.cfg.top_k,
            mode=self.mode, lane=self.dec.lane.kind if self.dec.lane else "none",
            reuse_hits=s.counters["reuse_hits"], fallbacks=s.counters["fallbacks"],
            reuse_rate=s.counters["reuse_hits"] / steps, fallback_rate=s.counters["fallbacks"] / steps,
            lookup_windows=s.counters["lookup_windows"], lookup_rate=s.counters["lookup_windows"] / steps,
            overlap_fraction=overlap / rollout_total if rollout_total > 0 else 0.0,
            branches_per_step=s.counters["branches"] / steps, empty_steps=empty,
            mean_accepted_per_window=s.mean_accepted_per_window(empty),
        )


def _intersect(a, b) -> float:
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))

