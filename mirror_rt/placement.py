"""Where a decoder's work runs: the draft's lane, its threads, the lane's timeout, compilation.

``Placement`` is what a caller chooses (``MirrorDecoder(target, draft, config, placement)``);
``CoreShare`` is the runtime policy it implies for one generation on a CPU: when the draft runs on
a worker thread or a second process, the caller's cores are split between the draft's rollouts
and the target's suffix, and given back to the target whenever the draft waits. None of this
changes a token; it only decides which core does what, so the algorithm (decoders/mirror.py)
never touches a thread count.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from mirror_rt import defaults
from mirror_rt.lanes import LANE_KINDS, is_ready, make_lane


LANE_STARTS = ("wait", "background")


@dataclass(slots=True)
class Placement:
    """lane          where the draft runs: one of ``mirror_rt.lanes.LANE_KINDS`` ("auto": a stream for
                     a CUDA draft, a worker thread otherwise; "process" needs the caller's script under
                     ``if __name__ == "__main__":``)
    draft_threads    torch threads of a CPU draft on a thread or process lane (None: half the caller's)
    lane_timeout     seconds before a silent draft lane counts as failed
    compile          ``mirror_rt.compiled.prepare``'s choice for the target and draft: False, True, "auto"
    lane_start       "wait": the lane is up before the first generate goes on (the draft takes part from
                     the first step); "background": a process lane starts after the first token while
                     the target decodes alone, and the draft joins at the first step after it is up
                     (a one-off command does not wait seconds for a new interpreter, and a one-token
                     request starts none); other lanes start at once either way
    """

    lane: str = defaults.LANE
    draft_threads: int | None = None
    lane_timeout: float = defaults.LANE_TIMEOUT
    compile: object = defaults.COMPILE
    lane_start: str = "wait"

    def validate(self) -> "Placement":
        if self.lane not in LANE_KINDS:
            raise ValueError(f"lane must be one of {LANE_KINDS}, got {self.lane!r}")
        if self.draft_threads is not None and (not isinstance(self.draft_threads, int) or self.draft_threads < 1):
            raise ValueError(f"draft_threads must be None or a positive integer, got {self.draft_threads!r}")
        if not isinstance(self.lane_timeout, (int, float)) or not self.lane_timeout > 0:
            raise ValueError(f"lane_timeout must be a positive number of seconds, got {self.lane_timeout!r}")
        if self.lane_start not in LANE_STARTS:
            raise ValueError(f"lane_start must be one of {LANE_STARTS}, got {self.lane_start!r}")
        return self

    def threads_for(self, draft_device) -> int | None:
        """The draft's torch threads on its lane: on a CPU thread or process lane it shares the
        caller's cores (default half); elsewhere the lane's own default (None)."""
        if self.draft_threads is not None:
            return self.draft_threads
        if self.lane in ("auto", "thread", "process") and torch.device(draft_device).type == "cpu":
            return max(1, torch.get_num_threads() // 2)
        return None

    def starts_late(self) -> bool:
        """A process lane started in the background: the decoder opens it after the first token."""
        return self.lane == "process" and self.lane_start == "background"

    def open_lane(self, make_worker, draft_device, threads: int | None):
        return make_lane(self.lane, make_worker, draft_device, threads, background=self.lane_start == "background")


class CoreShare:
    """The caller's torch threads during one Mirror-SD generation beside a lane.

    On a CPU thread or process lane (``draft_threads`` set) the target's suffix runs on the cores
    the draft did not take while the rollouts run, and on every core otherwise: OpenMP teams on an
    oversubscribed core stall each other, so the two sides never share a core. torch's thread
    count is per thread, so changing it here leaves the draft's worker alone. On an inline or
    device lane nothing changes.
    """

    def __init__(self, lane, draft_threads: int | None):
        self.caller = torch.get_num_threads()
        shares = bool(draft_threads) and lane is not None and lane.kind in ("thread", "process")
        self.suffix_threads = max(1, self.caller - draft_threads) if shares else None

    @property
    def shared(self) -> bool:
        return self.suffix_threads is not None

    def beside_draft(self):
        """From here on the target keeps only its share (called once the draft has work)."""
        if self.shared:
            torch.set_num_threads(self.suffix_threads)

    @contextmanager
    def all_cores(self):
        """Every core of the caller's while the draft waits (prefix and exit, the target alone)."""
        if not self.shared:
            yield
            return
        torch.set_num_threads(self.caller)
        try:
            yield
        finally:
            torch.set_num_threads(self.suffix_threads)

    def restore(self):
        torch.set_num_threads(self.caller)

    def run_suffix(self, target, hidden, first_layer: int, cache, rollouts):
        """The target's layers [first_layer, N) and head -> logits. Beside a draft sharing the cores:
        layer by layer on the target's share until the rollouts are done, then the rest on every
        core; the head too runs beside the draft if the rollouts outlast every layer."""
        layer, n = first_layer, target.num_layers
        while self.shared and layer < n and not is_ready(rollouts):
            hidden = target.run_layers(hidden, layer, layer + 1, cache)
            layer += 1
        if self.shared and not is_ready(rollouts):
            return target.head(hidden)
        with self.all_cores():
            return target.head(target.run_layers(hidden, layer, n, cache))
