"""A lane: a device plus an ordered stream of work.

``lane.submit(method, *args)`` queues a call of the lane's worker object (the draft's state
machine) and returns a future; calls run in submission order. ``lane.call`` waits for it.
Only token ids, log-probs, counts (and the adopted window's q rows) cross a lane.
Each result carries the wall-clock interval it ran in, for the overlap statistics.
"""
from __future__ import annotations

import time
from concurrent.futures import Future


class LaneError(RuntimeError):
    """The draft lane failed (raised, died, or timed out)."""


def timed_call(worker, method: str, args):
    """Run worker.method(*args); returns (result, t_start, t_end) with time.perf_counter stamps."""
    t0 = time.perf_counter()
    out = getattr(worker, method)(*args)
    return out, t0, time.perf_counter()


class InlineLane:
    """Runs each call at once in the caller's thread: no overlap, the serial reference."""

    kind = "inline"

    def __init__(self, make_worker):
        self.worker = make_worker()

    def submit(self, method: str, *args) -> Future:
        fut = Future()
        try:
            fut.set_result(timed_call(self.worker, method, args))
        except Exception as e:  # noqa: BLE001 - handed to the caller through the future
            fut.set_exception(e)
        return fut

    def call(self, method: str, *args, timeout=None):
        return result_of(self.submit(method, *args), timeout)[0]

    def close(self, wait=True):
        pass


def is_started(lane) -> bool:
    """Whether a lane's worker is up, without waiting (only a process lane starts in the background)."""
    return lane.started() if hasattr(lane, "started") else True


def wait_started(lane):
    """Wait until a lane's worker is up (a process lane started in the background); LaneError if it
    failed to start. Other lanes are up when built."""
    if hasattr(lane, "wait_started"):
        lane.wait_started()


def is_ready(fut) -> bool:
    """Whether a lane future's result is in, without waiting (a process lane's reply reads what its
    pipe already holds). A failed call counts as ready; ``result_of`` raises it."""
    return fut.ready() if hasattr(fut, "ready") else fut.done()


def result_of(fut: Future, timeout=None):
    """(result, t_start, t_end) of a lane future; any failure becomes LaneError."""
    try:
        return fut.result(timeout=timeout)
    except (LaneError, FloatingPointError):  # NaN/inf logits are a model fault, not a lane fault
        raise
    except TimeoutError:
        raise LaneError(f"draft lane timed out after {timeout} s") from None
    except Exception as e:  # noqa: BLE001
        raise LaneError(f"draft lane failed: {type(e).__name__}: {e}") from e
