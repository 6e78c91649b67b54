"""Mirror Speculative Decoding (DESIGN.md §1).

One step, as the paper draws it (``_Run.step``):

    prefix    target layers [0, l_e) over [pending, w_1..w_n]
    exit      exit head at every position -> branch candidates E [n+1, k] (ids; only E crosses),
              top-kappa per position or ranked by estimated P(A = i, c = v) (mirror_exit.py)
    rollouts  submitted to the draft's lane: every branch (i, v in E_i) as one tree
    suffix    target layers [l_e, N) beside the rollouts
    verify    accepted A, next token c, read once with the step's checks (verify.py)
    commit    w_1..w_A, c
    reuse     c in E_A: branch (A, c) is the next window (its draft KV adopted); else fallback:
              "recompute" (the paper) waits for the draft to roll out a fresh window from c;
              "exit" starts the next step at once with an empty window, whose exit branches give
              the draft its next window while the target computes c's successor
    lookup    (greedy, ``lookup`` > 0) a window copied from the context (lookup.py) is the next
              window when there is one; the draft skips those branches

A planner (``mirror_rt.planner``) sets each step's window, kappa, branch cap and floor, fallback
and overlap; where the draft runs and on which cores is the placement's (``mirror_rt.placement``).
Neither changes a token: the output is exactly the target's (lossless).
"""
from __future__ import annotations

import time
import warnings

import torch

from mirror_rt.decoders.autoregressive import target_step
from mirror_rt.decoders.base import GenerateArgs, GenerationOutput, check_pair, prepare_model, start_generation
from mirror_rt.decoders.mirror_config import FALLBACKS, DraftOptions, ExitAt, LogitLens, MirrorConfig  # noqa: F401
from mirror_rt.decoders.mirror_draft import MirrorDraft
from mirror_rt.decoders.mirror_exit import ExitProposer, draft_vocabulary
from mirror_rt.decoders.verify import verify_step
from mirror_rt.lanes import LaneError, is_started, result_of
from mirror_rt.placement import CoreShare, Placement


def make_planner(config, placement):
    from mirror_rt.planner import FixedPlanner
    from mirror_rt.planner import make_planner as make

    try:
        return make(config, placement)
    except ImportError:  # the measured AutoPlanner is not in this build: the config's own plan
        return FixedPlanner(config)


class MirrorDecoder:
    """MirrorDecoder(target, draft, config=MirrorConfig(), placement=Placement()): the algorithm's
    settings in ``config``, where the draft runs in ``placement``. One draft lane per decoder,
    reused across generate() calls; ``close()`` (or a ``with`` block) ends it."""

    def __init__(self, target, draft, config: MirrorConfig | None = None, placement: Placement | None = None):
        check_pair(target, draft)
        self.target, self.draft = target, draft
        self.config = (config or MirrorConfig()).validate(target.num_layers)
        self.placement = (placement or Placement(**self.config.legacy_placement)).validate()
        self.runner = prepare_model(target, self.placement.compile)
        self.lane = None
        self.draft_threads = None  # what the lane's draft got (its share of the caller's cores)
        self.planner = None  # one per decoder: plan="auto" keeps its measurements across generate calls
        self.reuse = None  # a decoders.reuse.PrefixReuse: start from an earlier generation's cache

    def _lane(self):
        """The draft's lane, built on first use."""
        if self.lane is None:
            cfg, where = self.config, self.placement
            threads = where.threads_for(self.draft.device)
            self.lane = where.open_lane(_DraftFactory(self.draft, cfg.window, cfg.draft, where.compile),
                                        self.draft.device, threads)
            self.draft_threads = threads
        return self.lane

    def step_threads(self, caller_threads: int) -> int | None:
        """torch threads for the target's suffix beside a draft that took its share of the caller's
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

    @torch.inference_mode()
    def generate(self, input_ids, max_new_tokens, eos_token_id=None, temperature=0.0, seed=None,
                 top_k=0, top_p=1.0, stream=None, stop=None, tokenizer=None) -> GenerationOutput:
        """input_ids [1, L] (or [L]) int64 -> GenerationOutput(tokens [1, n] int64, stats).
        Keywords as ``base.GenerateArgs``: eos_token_id None is the model's EOS ([] for none),
        stop strings need ``tokenizer``, stream receives each list of new token ids."""
        args = GenerateArgs(max_new_tokens, eos_token_id, temperature, seed, top_k, top_p, stream, stop, tokenizer)
        mode = "greedy" if temperature == 0 else self.config.mode
        if mode == "greedy" and temperature > 0:
            raise ValueError("mode 'greedy' needs temperature 0; use 'match' or 'rejection' to sample")
        slack = max(self.config.window, self.config.draft.lookup_window) + 1
        gen = start_generation(self.runner, input_ids, args, "mirror", slack, self.draft, self.reuse)
        return _Run(self, gen, mode, seed).generate()


class _DraftFactory:
    """Builds the draft worker inside its lane (picklable, for the process lane)."""

    def __init__(self, draft, window: int, options: DraftOptions, compile):
        self.draft, self.window, self.options, self.compile = draft, window, options, compile

    def __call__(self):
        return MirrorDraft(prepare_model(self.draft, self.compile), self.window, self.options)


class _Run:
    """One generate() call: the step loop and its bookkeeping."""

    def __init__(self, dec: MirrorDecoder, gen, mode: str, seed):
        self.dec, self.cfg, self.gen, self.mode, self.seed = dec, dec.config, gen, mode, seed
        self.target, self.stats, self.timeout = dec.runner, gen.stats, dec.placement.lane_timeout
        self.sampler = gen.sampler  # the verify rule's random source (tests replace verify)
        if dec.planner is None:
            dec.planner = make_planner(self.cfg, dec.placement)
        self.planner, self.first_step = dec.planner, len(dec.planner.history)
        vocab = draft_vocabulary(dec.draft, gen.prompt) if self.cfg.draft.exit_vocab == "draft" else None
        head = None if isinstance(self.cfg.exit_head, LogitLens) else self.cfg.exit_head
        self.exit = ExitProposer(dec.target, head, self.planner.plan(), self.cfg.branch_policy, vocab)
        self.cores, self.spans = CoreShare(None, None), []

    def generate(self) -> GenerationOutput:
        gen, stats = self.gen, self.stats
        try:
            try:
                # The draft's prefill and first window go to the lane first, so that on a thread, process
                # or stream lane they overlap the target's prefill (an inline lane runs them right here).
                # A process lane still starting (a new interpreter: seconds) joins later instead; one
                # started in the background is first asked for after the first token, so a request
                # that ends sooner never starts a draft process.
                lane = None if self.dec.lane is None and self.dec.placement.starts_late() else self.dec._lane()
                first = self.draft_start(lane) if lane is not None and is_started(lane) else None
            finally:  # even when the lane failed: the target alone then finishes from this cache
                with stats.phase("prefill"):  # with all the caller's threads (the draft's prefill is short)
                    gen.prefill_target(self.target)
            while first is None and not gen.out.done:  # the target decodes alone until the lane is up
                gen.tokens.append(target_step(self.target, gen))
                if lane is None and not gen.out.done:
                    lane = self.dec._lane()
                first = self.draft_start(lane) if lane is not None and is_started(lane) else None
            if not gen.out.done:
                self.cores = CoreShare(lane, self.dec.draft_threads)
                self.cores.beside_draft()
                with stats.phase("first_window"):
                    result_of(first[0], self.timeout)
                    window, q = result_of(first[1], self.timeout)[0]
                while not gen.out.done:
                    window, q = self.step(lane, window, q)
        except LaneError as e:
            self.draft_failed(e)
        finally:
            self.cores.restore()
        return gen.output(self.dec.target.device, **self.finish())

    def draft_start(self, lane):
        """Send the draft the committed tokens and ask for its first window: (start, window) replies."""
        s = self.gen.sampler
        started = lane.submit("start", self.gen.tokens, self.gen.capacity, (s.temperature, s.top_k, s.top_p),
                              self.seed)
        return started, lane.submit("fresh_window", self.planner.plan().window)

    def step(self, lane, window, q):
        """One Mirror-SD step (DESIGN.md §1); returns the next window and its q rows."""
        plan, before = self.planner.plan(), dict(self.stats.phase_s)
        if self.gen.out.remaining == 1 or plan.overlap == "off":
            return self.target_alone(lane, plan, before)
        window = window[: self.gen.out.remaining - 1]  # a copied window may be longer than the plan's
        with self.cores.all_cores():
            node_ids, hidden = self.prefix(window)
            with self.stats.phase("exit"):
                exit_ids = self.exit(hidden, window, plan)
        rollouts = self.submit_rollouts(lane, window, exit_ids, plan)
        logits = self.suffix(hidden, rollouts, plan)
        with self.stats.phase("verify"):
            accepted, next_token = self.verify(node_ids, logits, q)
        self.commit(window, accepted, next_token)
        branches = self.wait(rollouts)
        source, next_window = self.reuse_or_fallback(lane, accepted, next_token, plan)
        self.observe(plan, before, (accepted, len(window), branches), source)
        return next_window

    # --- the phases -------------------------------------------------------------------------------

    def prefix(self, window):
        """Target layers [0, l_e) over [pending, w_1..w_n] -> (node ids [1, n+1], hidden)."""
        target = self.target
        if not window:  # after a miss with fallback="exit": no window, the exit's branches still roll out
            self.stats.counters["empty_steps"] += 1
        with self.stats.phase("prefix"):
            node_ids = torch.tensor([[self.gen.tokens[-1]] + window], device=target.device)
            return node_ids, target.run_layers(target.embed(node_ids), 0, self.cfg.exit_layer, self.gen.cache)

    def submit_rollouts(self, lane, window, exit_ids, plan):
        if lane.kind == "process":  # a pipe carries bytes: a numpy array pickles without shared memory
            exit_ids = (exit_ids if exit_ids.device.type == "cpu" else exit_ids.cpu()).numpy()
        return lane.submit("rollouts", window, exit_ids, plan.window)

    def suffix(self, hidden, rollouts, plan):
        """Target layers [l_e, N) and head beside the rollouts -> logits [1, n+1, V]; "serial"
        plans let the rollouts finish first."""
        if plan.overlap == "serial":
            with self.stats.phase("wait"):
                result_of(rollouts, self.timeout)
        with self.stats.phase("suffix"):
            t0 = time.perf_counter()
            logits = self.cores.run_suffix(self.target, hidden, self.cfg.exit_layer, self.gen.cache, rollouts)
            self.spans.append((t0, time.perf_counter()))
            return logits

    def verify(self, node_ids, logits, q):
        return verify_step(node_ids, logits, q, self.mode, self.sampler, self.stats.steps)

    def commit(self, window, accepted: int, next_token: int):
        self.gen.cache.commit(1 + accepted)
        new = window[:accepted] + [next_token]
        self.gen.tokens += new
        self.gen.out.emit(new)
        self.stats.add_step(accepted)

    def wait(self, rollouts) -> int:
        with self.stats.phase("wait"):
            n_branches, r0, r1 = result_of(rollouts, self.timeout)
        self.spans[-1] += (r0, r1)
        self.stats.phase_s["draft"] += r1 - r0
        self.stats.counters["branches"] += n_branches
        return n_branches

    def reuse_or_fallback(self, lane, accepted: int, next_token: int, plan):
        """(source, (next window, q)): the adopted branch, the context lookup's window, or a fallback."""
        if self.gen.out.done:
            return "done", ([], None)
        source, window, q = lane.call("advance", accepted, next_token, timeout=self.timeout)
        if source in ("branch", "lookup"):
            self.stats.counters["reuse_hits" if source == "branch" else "lookup_windows"] += 1
            return source, (window, q)
        self.stats.counters["fallbacks"] += 1
        if plan.fallback == "exit":
            return None, ([], None)
        with self.stats.phase("fallback"):
            return None, lane.call("fresh_window", plan.window, timeout=self.timeout)

    def target_alone(self, lane, plan, before):
        """A target-only step on every core (the last token, or a plan that turns the draft off);
        the draft then commits the token too, and the next step starts without a window."""
        with self.cores.all_cores():
            token = target_step(self.target, self.gen)
        self.gen.tokens.append(token)
        if self.gen.out.done:
            return [], None
        lane.call("advance", 0, token, timeout=self.timeout)
        self.observe(plan, before, (0, 0, 0), "off")
        return [], None

    def observe(self, plan, before: dict, counts: tuple, source):
        """Tell the planner what this step did: counts (accepted, window length, branches), source
        of the next window ("branch", "lookup", None: a fallback, "off", "done"), phase times."""
        from mirror_rt.planner import StepRecord

        accepted, window_len, branches = counts
        phases = {k: v - before.get(k, 0.0) for k, v in self.stats.phase_s.items() if v != before.get(k, 0.0)}
        self.planner.observe(StepRecord(plan, accepted, window_len, source == "branch", source == "lookup",
                                        source is None, branches, None, phases))

    # --- failure and statistics -------------------------------------------------------------------

    def draft_failed(self, error: LaneError):
        """Keep every committed token and finish with the target alone."""
        warnings.warn(f"Mirror-SD draft lane failed ({error}); finishing with the target alone", RuntimeWarning,
                      stacklevel=3)
        self.stats.counters["draft_failures"] += 1
        self.stats.counters["draft_error"] = str(error)
        self.cores.restore()  # the target alone: every core again
        self.cores = CoreShare(None, None)
        self.dec.lane, lane = None, self.dec.lane
        if lane is not None:
            try:
                lane.close(wait=False)
            except Exception:  # noqa: BLE001 - the lane is already broken
                pass
        while not self.gen.out.done:
            with self.stats.phase("ar_after_failure"):
                self.gen.tokens.append(target_step(self.target, self.gen))

    def finish(self) -> dict:
        s, cfg = self.stats, self.cfg
        steps = max(s.steps, 1)
        empty = s.counters["empty_steps"]  # steps with no draft window (fallback="exit")
        full = [sp for sp in self.spans if len(sp) == 4]
        overlap = sum(max(0.0, min(a1, b1) - max(a0, b0)) for a0, a1, b0, b1 in full)
        rollout_total = sum(b1 - b0 for _, _, b0, b1 in full)
        return dict(
            window=cfg.window, exit_layer=cfg.exit_layer, kappa=cfg.kappa, mode=self.mode,
            lane=self.dec.lane.kind if self.dec.lane else "none", reuse_hits=s.counters["reuse_hits"],
            fallbacks=s.counters["fallbacks"], reuse_rate=s.counters["reuse_hits"] / steps,
            fallback_rate=s.counters["fallbacks"] / steps, lookup_windows=s.counters["lookup_windows"],
            lookup_rate=s.counters["lookup_windows"] / steps,
            overlap_fraction=overlap / rollout_total if rollout_total > 0 else 0.0,
            branches_per_step=s.counters["branches"] / steps, empty_steps=empty,
            mean_accepted_per_window=s.mean_accepted_per_window(empty),
            **self.planner.summary(since=self.first_step),
        )
