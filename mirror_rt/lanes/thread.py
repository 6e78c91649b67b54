"""Worker-thread lanes: the CPU (draft on a thread) and device streams (CUDA, NPU).

torch releases the GIL inside its kernels, so a draft on a worker thread overlaps the target's
suffix on the main thread. On a GPU (or NPU) the worker issues the draft's work on its own
stream, after waiting for an event the target recorded at its early exit.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from mirror_rt.lanes.base import result_of, timed_call


class ThreadLane:
    kind = "thread"

    def __init__(self, make_worker, threads: int | None = None):
        """threads: torch intra-op threads of the worker thread, set in that thread (None: it takes
        the process-wide default at its first op). torch's count is per thread once a thread has
        run an op or set it, so the caller can then change its own count without touching the
        draft's (MirrorDecoder prefills with more threads than it steps with)."""
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mirror-draft")
        self.threads = threads
        self.worker = self.pool.submit(self._init, make_worker).result()

    def _init(self, make_worker):
        if self.threads:
            torch.set_num_threads(self.threads)
        return make_worker()

    def _run(self, method, args, event):
        return timed_call(self.worker, method, args)

    def submit(self, method: str, *args) -> Future:
        return self.pool.submit(self._run, method, args, None)

    def call(self, method: str, *args, timeout=None):
        return result_of(self.submit(method, *args), timeout)[0]

    def close(self, wait=True):
        """wait=False abandons a hung call (its thread ends when the call returns)."""
        self.pool.shutdown(wait=wait, cancel_futures=True)


class StreamLane(ThreadLane):
    """The draft on its own device stream (torch.cuda, or torch.npu which mirrors its API).

    submit() records an event on the caller's current stream (the target's, right after its early
    exit) and the draft's stream waits on it, so the draft sees the exit's results without a host
    sync; the worker synchronises its own stream before returning so results are final.
    """

    kind = "stream"

    def __init__(self, make_worker, device, device_module=None):
        self.device = torch.device(device)
        self.dm = device_module or getattr(torch, self.device.type)
        self.stream = self.dm.Stream(device=self.device)
        super().__init__(make_worker)

    def _init(self, make_worker):
        with self.dm.stream(self.stream):
            return make_worker()

    def _run(self, method, args, event):
        with self.dm.stream(self.stream):
            if event is not None:
                self.stream.wait_event(event)
            out, t0, _ = timed_call(self.worker, method, args)
            self.stream.synchronize()  # the interval must cover the device work, not its launch
        return out, t0, time.perf_counter()

    def submit(self, method: str, *args) -> Future:
        event = self.dm.Event()
        event.record(self.dm.current_stream(self.device))
        return self.pool.submit(self._run, method, args, event)
