"""The draft in a second process, joined by a local pipe (no network listener).

This is the lane for a draft on an Ascend NPU beside a CUDA target (torch_npu refuses to share a
process with CUDA torch) and for a CPU-only machine to overlap without the GIL. Calls are sent in
order as (method, args) and answered in order; only ids, counts and q rows travel.
"""
from __future__ import annotations

import collections
import multiprocessing as mp

from mirror_rt.lanes.base import LaneError, timed_call


def _serve(conn, make_worker, threads):
    import torch

    torch.set_num_threads(threads or 1)
    try:
        worker = make_worker()
        conn.send(("ready", None))
    except Exception as e:  # noqa: BLE001 - reported to the parent, then exit
        conn.send(("error", (type(e).__name__, str(e))))
        return
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        method, args = msg
        try:
            conn.send(("ok", timed_call(worker, method, args)))
        except Exception as e:  # noqa: BLE001
            conn.send(("error", (type(e).__name__, str(e))))


class _Reply:
    """A future for one call; replies arrive in call order."""

    def __init__(self, lane):
        self.lane, self.value, self.done = lane, None, False

    def ready(self) -> bool:
        """Whether the reply is in, without waiting: reads the replies the pipe already holds."""
        while not self.done and self.lane.waiting and self.lane.conn.poll(0):
            self.lane._receive_one(None)
        return self.done

    def result(self, timeout=None):
        while not self.done:
            self.lane._receive_one(timeout)
        status, payload = self.value
        if status != "ok":
            kind, message = payload
            if kind == "FloatingPointError":  # NaN/inf logits: a model fault, raised as such
                raise FloatingPointError(message)
            raise LaneError(f"draft process failed: {kind}: {message}")
        return payload


class ProcessLane:
    kind = "process"

    def __init__(self, make_worker, threads: int | None = None, start_timeout: float = 300.0,
                 call_timeout: float | None = 120.0):
        """make_worker: a picklable callable building the worker (e.g. functools.partial)."""
        ctx = mp.get_context("spawn")  # fork would copy the parent's threads and CUDA state
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_serve, args=(child, make_worker, threads), daemon=True,
                                name="mirror-draft")
        self.proc.start()
        child.close()
        self.call_timeout = call_timeout
        self.waiting = collections.deque()
        status, payload = self._recv(start_timeout)
        if status != "ready":
            self.close()
            raise LaneError(f"draft process failed to start: {payload[0]}: {payload[1]}")

    def _recv(self, timeout):
        timeout = self.call_timeout if timeout is None else timeout
        try:
            if not self.conn.poll(timeout):
                raise LaneError(f"draft process did not answer within {timeout} s")
            return self.conn.recv()
        except (EOFError, OSError, ConnectionError):
            code = self.proc.exitcode
            raise LaneError(f"draft process died (exit code {code})") from None

    def _receive_one(self, timeout):
        reply = self.waiting.popleft()
        reply.value, reply.done = self._recv(timeout), True

    def submit(self, method: str, *args) -> _Reply:
        try:
            self.conn.send((method, args))
        except (OSError, BrokenPipeError, ValueError):
            raise LaneError(f"draft process died (exit code {self.proc.exitcode})") from None
        reply = _Reply(self)
        self.waiting.append(reply)
        return reply

    def call(self, method: str, *args, timeout=None):
        return self.submit(method, *args).result(timeout)[0]

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def close(self, wait=True):
        """Ask the process to exit; kill it if it does not within 5 s."""
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5)
        self.conn.close()
