"""Reliability: a failing draft lane loses nothing, NaN logits stop generation, bad config is
rejected with a clear message, long runs stay flat in memory and time, seeds are deterministic."""
from __future__ import annotations

import dataclasses
import gc
import os
import resource
import signal
import time

import pytest
import torch

from mirror_helpers import FailingDraft, tiny_pair
from mirror_rt.decoders import AutoregressiveDecoder, MirrorConfig, MirrorDecoder, Placement, SpeculativeDecoder
from mirror_rt.lanes import LaneError
from mirror_rt.models.derive import random_model

IDS = torch.tensor([[4, 8, 15, 16, 23, 42]])


@pytest.fixture(scope="module")
def pair():
    return tiny_pair()


@pytest.fixture(scope="module")
def reference(pair):
    return AutoregressiveDecoder(pair[0]).generate(IDS, 40).tokens.tolist()


@pytest.mark.parametrize("lane", ["inline", "thread", "process"])
def test_draft_that_raises_falls_back_to_target(pair, reference, lane):
    target, draft = pair
    dec = MirrorDecoder(target, FailingDraft(draft, after=12), MirrorConfig(window=3), Placement(lane=lane))
    with pytest.warns(RuntimeWarning, match="draft lane failed"):
        out = dec.generate(IDS, 40)
    assert out.tokens.tolist() == reference
    assert out.stats["draft_failures"] == 1 and "injected draft failure" in out.stats["draft_error"]
    assert dec.lane is None  # cleaned up
    dec.close()


@pytest.mark.parametrize("after", [0, 1])
def test_lane_that_fails_before_the_prefill_falls_back_to_target(pair, reference, monkeypatch, after):
    """A lane that cannot even be built (after=0) or take the first call (after=1): the target
    still prefills and finishes alone."""
    target, draft = pair
    dec = MirrorDecoder(target, draft, MirrorConfig(window=3), Placement(lane="inline"))

    class DeadLane:
        kind = "dead"

        def submit(self, *args):
            raise LaneError("draft process died (exit code -9)")

        def close(self, wait=True):
            pass

    def broken_lane():
        if after == 0:
            raise LaneError("draft process failed to start: OSError: no memory")
        dec.lane = DeadLane()
        return dec.lane

    monkeypatch.setattr(dec, "_lane", broken_lane)
    with pytest.warns(RuntimeWarning, match="draft lane failed"):
        out = dec.generate(IDS, 40)
    assert out.tokens.tolist() == reference
    assert out.stats["draft_failures"] == 1


def test_killed_draft_process_loses_nothing(pair, reference):
    target, draft = pair
    dec = MirrorDecoder(target, draft, MirrorConfig(window=3), Placement(lane="process"))
    seen = []

    def kill_after_ten(new):
        seen.extend(new)
        if len(seen) >= 10 and dec.lane is not None and dec.lane.proc.is_alive():
            os.kill(dec.lane.pid, signal.SIGKILL)

    with pytest.warns(RuntimeWarning, match="died"):
        out = dec.generate(IDS, 40, stream=kill_after_ten)
    assert out.tokens.tolist() == reference
    assert out.stats["draft_failures"] == 1
    dec.close()


_UNGUARDED_SCRIPT = """
import functools
from mirror_rt.lanes import LaneError
from mirror_rt.lanes.process import ProcessLane
try:  # no __main__ guard: the spawned child re-runs this file and fails while starting its own lane
    ProcessLane(functools.partial(dict, blob=bytes(1 << 20)), 1, start_timeout=60).wait_started()  # 1 MB: more than a pipe holds
    print("started")
except LaneError as e:
    print("LaneError:", e)
"""


def test_process_lane_started_without_main_guard_raises_instead_of_hanging(tmp_path):
    """A script without `if __name__ == '__main__':` makes the spawned child fail before it reads
    its start-up data; a worker recipe as large as a model then used to block Process.start()
    forever. Now the recipe travels over the lane's own pipe and the parent gets a LaneError that
    names the guard."""
    import subprocess
    import sys

    script = tmp_path / "unguarded.py"
    script.write_text(_UNGUARDED_SCRIPT)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "LaneError:" in run.stdout and "__main__" in run.stdout, run.stdout


def test_hung_draft_process_times_out(pair, reference):
    target, draft = pair
    dec = MirrorDecoder(target, FailingDraft(draft, after=12, how="hang"),
                        MirrorConfig(window=3), Placement(lane="process", lane_timeout=3.0))
    t0 = time.perf_counter()
    with pytest.warns(RuntimeWarning, match="did not answer"):
        out = dec.generate(IDS, 40)
    assert out.tokens.tolist() == reference
    assert time.perf_counter() - t0 < 60


@pytest.mark.parametrize("lane", ["inline", "process"])
def test_nan_in_draft_logits_raises(pair, lane):
    target, draft = pair
    dec = MirrorDecoder(target, FailingDraft(draft, after=5, how="nan"), MirrorConfig(window=3), Placement(lane=lane))
    with pytest.raises(FloatingPointError, match="draft produced NaN/inf logits at step"):
        dec.generate(IDS, 40)
    dec.close()


def test_nan_in_target_logits_raises(pair):
    target, draft = pair
    broken = random_model(5, vocab_size=64, num_layers=4)
    with torch.no_grad():
        broken.layers[2].mlp.up_proj.weight.fill_(float("inf"))
    for dec in (AutoregressiveDecoder(broken), SpeculativeDecoder(broken, draft, 3),
                MirrorDecoder(broken, draft, MirrorConfig(), Placement(lane="inline"))):
        with pytest.raises(FloatingPointError, match="target produced NaN/inf logits"):
            dec.generate(IDS, 10)


@pytest.mark.parametrize("kwargs,match", [
    (dict(exit_layer=0), "exit_layer must be an integer in \\[1, 3\\]"),
    (dict(exit_layer=4), "exit_layer must be an integer in \\[1, 3\\]"),
    (dict(kappa=0), "kappa must be an integer in \\[1, 64\\]"),
    (dict(top_k=0), "kappa must be an integer in \\[1, 64\\]"),
    (dict(window=0), "window \\(gamma\\) must be an integer in \\[1, 32\\]"),
    (dict(window=33), "window \\(gamma\\) must be an integer in \\[1, 32\\]"),
    (dict(plan="sometimes"), "plan must be one of"),
    (dict(mode="argmax"), "mode must be one of"),
    (dict(lane="gpu9"), "lane must be one of"),
    (dict(max_branches=-1), "max_branches must be None or an integer >= 0"),
    (dict(branch_policy="best"), "branch_policy must be one of"),
    (dict(exit_vocab="tiny"), "exit_vocab must be 'draft' or 'full'"),
    (dict(min_branch_prob=1.0), "min_branch_prob must be in \\[0, 1\\)"),
])
def test_bad_mirror_config(pair, kwargs, match):
    target, draft = pair
    with pytest.raises(ValueError, match=match):
        MirrorDecoder(target, draft, MirrorConfig(**kwargs))


def test_bad_generate_arguments(pair):
    target, draft = pair
    dec = MirrorDecoder(target, draft, MirrorConfig(), Placement(lane="inline"))
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        dec.generate(IDS, 5, temperature=-1)
    with pytest.raises(ValueError, match="top_p must be in \\(0, 1\\]"):
        dec.generate(IDS, 5, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        dec.generate(IDS, 9000)
    with pytest.raises(ValueError, match="empty"):
        dec.generate(torch.zeros(1, 0, dtype=torch.int64), 5)
    with pytest.raises(ValueError, match="vocabulary"):
        MirrorDecoder(target, random_model(0, vocab_size=65), MirrorConfig())


@pytest.mark.parametrize("decoder", ["sd", "mirror"])
def test_same_size_but_different_tokenizer_is_refused(pair, decoder):
    target, draft = pair
    make = (lambda t, d: SpeculativeDecoder(t, d, 3)) if decoder == "sd" else \
        (lambda t, d: MirrorDecoder(t, d, MirrorConfig(), Placement(lane="inline")))
    V = target.config.vocab_size
    target.tokenizer_tokens = tuple(f"t{i}" for i in range(V))
    try:
        draft.tokenizer_tokens = tuple(f"t{i}" if i != 7 else "other" for i in range(V))
        with pytest.raises(ValueError, match="token id 7 is 'other' in the draft and 't7' in the target"):
            make(target, draft)
        # The same tokens, or a tokenizer with extra ids past the other's end, or an unknown one: fine.
        for tokens in (target.tokenizer_tokens, target.tokenizer_tokens[:-3], None):
            draft.tokenizer_tokens = tokens
            make(target, draft)
    finally:
        target.tokenizer_tokens = draft.tokenizer_tokens = None


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


@pytest.mark.slow
@pytest.mark.parametrize("lane", ["inline", "thread", "process"])
def test_long_run_is_flat_in_memory_and_time(lane):
    target = random_model(21, vocab_size=64, hidden_size=32, num_layers=2)
    draft = random_model(22, vocab_size=64, hidden_size=32, num_layers=1)
    times = []
    with MirrorDecoder(target, draft, MirrorConfig(exit_layer=1, kappa=2, window=3), Placement(lane=lane)) as dec:
        dec.generate(IDS, 200)  # warm-up: caches, allocator pools, the process lane's start
        gc.collect()
        rss_before, tensors_before = rss_mb(), _live_tensors()
        last = [time.perf_counter()]

        def tick(new):
            now = time.perf_counter()
            times.append((now - last[0]) / len(new))
            last[0] = now

        out = dec.generate(IDS, 5000, stream=tick)
        gc.collect()
    assert out.tokens.shape[1] == 5000
    grown = rss_mb() - rss_before
    assert grown < 64, f"RSS grew by {grown:.0f} MiB over 5,000 tokens"
    assert _live_tensors() - tensors_before < 50
    fifth = len(times) // 5
    early, late = sorted(times[:fifth])[fifth // 2], sorted(times[-fifth:])[fifth // 2]
    assert late < 3 * early + 1e-3, f"per-token time grew from {early * 1e3:.2f} ms to {late * 1e3:.2f} ms"


def _live_tensors() -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_same_seed_same_tokens_across_runs_and_lanes(pair):
    target, draft = pair
    results = []
    for lane in ("inline", "thread", "process", "inline"):
        with MirrorDecoder(target, draft, MirrorConfig(window=3, kappa=4, plan="fixed"), Placement(lane=lane)) as dec:
            results.append(dec.generate(IDS, 30, temperature=0.8, seed=1234).tokens.tolist())
    assert all(r == results[0] for r in results), results
    with MirrorDecoder(target, draft, MirrorConfig(window=3, kappa=4, plan="fixed"), Placement(lane="inline")) as dec:
        assert dec.generate(IDS, 30, temperature=0.8, seed=99).tokens.tolist() != results[0]


def test_old_config_names_warn_and_are_routed(pair):
    """top_k= is kappa, and the placement fields given to MirrorConfig reach the Placement, for one
    release, each with a DeprecationWarning."""
    target, draft = pair
    with pytest.warns(DeprecationWarning, match="kappa"):
        cfg = MirrorConfig(top_k=5)
    assert cfg.kappa == 5
    with pytest.warns(DeprecationWarning, match="Placement"):
        cfg = MirrorConfig(lane="inline", lane_timeout=7.0, draft_threads=1)
    dec = MirrorDecoder(target, draft, cfg)
    assert (dec.placement.lane, dec.placement.lane_timeout, dec.placement.draft_threads) == ("inline", 7.0, 1)
    with pytest.raises(TypeError, match="unexpected keyword"):
        MirrorConfig(topk=3)
    assert len(dataclasses.fields(MirrorConfig)) <= 8


def test_process_lane_started_in_the_background_joins_later_and_stays_lossless(pair, reference):
    """lane_start="background": the first generate does not wait for the draft's process (the
    target decodes alone until it is up); once it is up the draft takes part; tokens never change."""
    from mirror_rt.placement import Placement

    target, draft = pair
    with MirrorDecoder(target, draft, MirrorConfig(window=3, plan="fixed"),
                       Placement(lane="process", lane_start="background")) as dec:
        t0 = time.perf_counter()
        first = dec.generate(IDS, 40)
        assert first.tokens.tolist() == reference
        assert not dec.lane.started() or time.perf_counter() - t0 < 60
        dec.lane.wait_started()
        second = dec.generate(IDS, 40)
    assert second.tokens.tolist() == reference
    assert second.stats["reuse_hits"] + second.stats["fallbacks"] > 0  # the draft's windows took part


def test_lane_start_setting_is_checked():
    from mirror_rt.placement import Placement

    with pytest.raises(ValueError, match="lane_start"):
        Placement(lane="process", lane_start="later").validate()
