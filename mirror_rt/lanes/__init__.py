"""Lanes: where the draft's work runs relative to the target's (see base.py)."""
from __future__ import annotations

import torch

from mirror_rt.lanes.base import InlineLane, LaneError, is_ready, is_started, result_of, wait_started
from mirror_rt.lanes.process import ProcessLane
from mirror_rt.lanes.thread import StreamLane, ThreadLane

LANE_KINDS = ("auto", "inline", "thread", "process", "cuda", "npu")


def make_lane(kind: str, make_worker, device="cpu", threads: int | None = None, background: bool = False):
    """Build a lane of `kind` running make_worker()'s object. threads: torch threads of the draft
    on a process lane (default 1) or a thread lane (default: what the process uses when the
    worker starts). background: a process lane returns while its child is still starting
    (``is_started`` tells when it is up); otherwise every lane is up when this returns.

    auto: a CUDA stream for a CUDA draft, a worker thread otherwise. process: make_worker must
    be picklable. npu: torch.npu streams (untested on hardware; see README).
    """
    if kind not in LANE_KINDS:
        raise ValueError(f"lane must be one of {LANE_KINDS}, got {kind!r}")
    device = torch.device(device)
    if kind == "auto":
        kind = "cuda" if device.type == "cuda" else "thread"
    if kind == "inline":
        return InlineLane(make_worker)
    if kind == "thread":
        return ThreadLane(make_worker, threads)
    if kind == "process":
        lane = ProcessLane(make_worker, threads)
        if not background:
            try:
                lane.wait_started()
            except LaneError:
                lane.close()
                raise
        return lane
    if kind in ("cuda", "npu"):
        module = getattr(torch, kind, None)
        if module is None or not module.is_available():
            raise ValueError(f"lane {kind!r} needs a {kind} device, none is available")
        return StreamLane(make_worker, device, module)


__all__ = ["make_lane", "LANE_KINDS", "LaneError", "is_ready", "is_started", "InlineLane", "ThreadLane", "StreamLane", "ProcessLane",
           "result_of", "wait_started"]
