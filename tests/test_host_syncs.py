"""Host synchronisations per step, counted on the CPU: every way a tensor's value reaches Python
(``item``, ``tolist``, ``cpu``, ``int()``, ``bool()``, ``float()``, ``index()``) and
``torch.cuda.synchronize`` are wrapped during generate on a tiny random model.

Bounds (decoders/base.py, ``read_back``): the target's side reads once a step in AR, SD and
Mirror-SD (inline lane); the draft's side once per rollout batch (a Mirror-SD rollouts call, an
SD window, a fresh window) and once when it adopts a branch (``advance``)."""
from __future__ import annotations

import sys
from collections import Counter

import pytest
import torch

import mirror_rt.decoders.autoregressive as ar_mod
from mirror_helpers import tiny_pair
from mirror_rt.decoders import AutoregressiveDecoder, MirrorConfig, MirrorDecoder, Placement, SpeculativeDecoder
from mirror_rt.decoders.drafting import DraftState
from mirror_rt.decoders.mirror import _Run
from mirror_rt.decoders.mirror_draft import MirrorDraft

READS = ("item", "tolist", "cpu", "__int__", "__bool__", "__float__", "__index__")
DRAFT_CALLS = [(MirrorDraft, "rollouts"), (MirrorDraft, "advance"), (MirrorDraft, "fresh_window"),
               (DraftState, "propose")]


def host_only_check(frame) -> bool:
    """A value check of ``ops.checks`` that runs only on host tensors (it is skipped on a device,
    where it would be a transfer), so on the CPU it reads memory, not a device."""
    return frame.f_code.co_filename.endswith("ops/checks.py") and frame.f_code.co_name == "check_tree_attention"


class SyncLog:
    """Reads while a step runs go to that step's count on the side that made them: the target's,
    or the draft's while one of DRAFT_CALLS runs (whose own count is kept per call)."""

    def __init__(self):
        self.step = None  # Counter of the running step: {"target": n, "draft": n}
        self.draft_call = None  # [method, n] of the running draft call
        self.steps, self.draft_calls = [], []

    def hit(self):
        if self.draft_call is not None:
            self.draft_call[1] += 1
        if self.step is not None:
            self.step["draft" if self.draft_call is not None else "target"] += 1


@pytest.fixture
def syncs(monkeypatch):
    log = SyncLog()
    for name in READS:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, **kwargs):
            if not (self.device.type == "cpu" and host_only_check(sys._getframe(1))):
                log.hit()
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    real_sync = torch.cuda.synchronize
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: (log.hit(), real_sync(*a, **k))[1])

    def step_scope(real):
        def scoped(*args, **kwargs):
            outer, log.step = log.step, Counter()
            try:
                return real(*args, **kwargs)
            finally:
                log.steps.append(log.step)
                log.step = outer
        return scoped

    def draft_scope(real, method):
        def scoped(*args, **kwargs):
            outer, log.draft_call = log.draft_call, [method, 0]
            try:
                return real(*args, **kwargs)
            finally:
                log.draft_calls.append(tuple(log.draft_call))
                log.draft_call = outer
        return scoped

    monkeypatch.setattr(ar_mod, "target_step", step_scope(ar_mod.target_step))
    monkeypatch.setattr(SpeculativeDecoder, "step", step_scope(SpeculativeDecoder.step))
    monkeypatch.setattr(_Run, "step", step_scope(_Run.step))
    for cls, method in DRAFT_CALLS:
        monkeypatch.setattr(cls, method, draft_scope(getattr(cls, method), method))
    return log


@pytest.fixture(scope="module")
def pair():
    return tiny_pair()


IDS = torch.tensor([[4, 8, 15, 16, 23, 42]])
SAMPLING = [dict(), dict(temperature=1.0, seed=3), dict(temperature=0.7, top_k=20, top_p=0.9, seed=5)]


def check_bounds(log, min_steps):
    assert len(log.steps) >= min_steps, log.steps  # the steps were seen
    target = [s["target"] for s in log.steps]
    assert max(target) == 1 and sum(target) == len(target), target  # exactly one read a step: counted, and 1
    for method, n in log.draft_calls:
        assert n <= 1, (method, n, log.draft_calls)


@pytest.mark.parametrize("kwargs", SAMPLING)
def test_autoregressive_reads_once_a_step(pair, syncs, kwargs):
    AutoregressiveDecoder(pair[0]).generate(IDS, 12, **kwargs)
    check_bounds(syncs, 12)


@pytest.mark.parametrize("kwargs", SAMPLING)
def test_speculative_reads_once_a_step_and_once_a_window(pair, syncs, kwargs):
    out = SpeculativeDecoder(*pair, window=4).generate(IDS, 24, **kwargs)
    check_bounds(syncs, out.stats["steps"])
    assert [m for m, _ in syncs.draft_calls].count("propose") >= out.stats["steps"] - 1


@pytest.mark.parametrize("kwargs", SAMPLING)
@pytest.mark.parametrize("policy, fallback", [("ranked", "exit"), ("per_position", "recompute")])
def test_mirror_reads_once_a_step_and_once_a_rollout_batch(pair, syncs, kwargs, policy, fallback):
    cfg = MirrorConfig(exit_layer=2, kappa=3, window=3, branch_policy=policy, fallback=fallback, plan="fixed",
                       mode="rejection")
    with MirrorDecoder(*pair, cfg, Placement(lane="inline")) as dec:
        out = dec.generate(IDS, 24, **kwargs)
    check_bounds(syncs, out.stats["steps"])
    rollouts = [n for m, n in syncs.draft_calls if m == "rollouts"]
    assert len(rollouts) >= out.stats["steps"] - 1 and out.stats["branches"] > 0
