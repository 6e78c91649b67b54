"""The draft in a second process, joined by a local pipe (no network listener).

This is the lane for a draft on an Ascend NPU beside a CUDA target (torch_npu refuses to share a
process with CUDA torch) and for a CPU-only machine to overlap without the GIL. Calls are sent in
order as (method, args) and answered in order; only ids, counts and q rows travel.
"""
from __future__ import annotations

import collections
import multiprocessing as mp
import threading

from mirror_rt.lanes.base import LaneError, timed_call


def _serve(conn, threads):
    import torch

    torch.set_num_threads(threads or 1)
    try:
        worker = conn.recv()()  # the recipe (e.g. the draft's weights) comes over our pipe: see ProcessLane
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
    """The draft in a spawned process. The child starts in the background: a new interpreter
    imports torch and receives the draft (seconds on a small CPU), and the caller goes on meanwhile;
    ``started()`` says whether it is up, without waiting, and the first call waits for it (a child
    that failed to start raises LaneError there)."""

    kind = "process"

    def __init__(self, make_worker, threads: int | None = None, start_timeout: float = 300.0,
                 call_timeout: float | None = 120.0):
        """make_worker: a picklable callable building the worker (e.g. functools.partial)."""
        ctx = mp.get_context("spawn")  # fork would copy the parent's threads and CUDA state
        self.conn, child = ctx.Pipe(duplex=True)
        # Only the pipe and the thread count go through Process.start: it writes its arguments to
        # the new process while still holding that pipe's read end itself, so a child that dies before
        # reading them (a script without the __main__ guard re-runs itself there and fails) would
        # leave start() blocked forever on a payload as large as a model. Sent over our own pipe,
        # it fails with a broken pipe instead.
        self.proc = ctx.Process(target=_serve, args=(child, threads), daemon=True, name="mirror-draft")
        self.proc.start()
        child.close()
        self.call_timeout = call_timeout
        self.waiting = collections.deque()
        self._start_error = None
        self._starter = threading.Thread(target=self._start, args=(make_worker, start_timeout), daemon=True,
                                         name="mirror-draft-start")
        self._starter.start()

    def _start(self, make_worker, start_timeout):
        """In the starter thread: send the recipe, wait for "ready"; a failure is kept for the first call."""
        try:
            self.conn.send(make_worker)
            status, payload = self._recv(start_timeout)
            if status != "ready":
                raise LaneError(f"draft process failed to start: {payload[0]}: {payload[1]}")
        except (LaneError, OSError, ValueError) as e:
            self.proc.join(timeout=2.0)  # a child that broke the pipe is exiting: let it finish, then ask
            died = not self.proc.is_alive()
            message = str(e if isinstance(e, LaneError) else self._died())
            if died and "failed to start" not in message:
                message += (" before it built the draft; a script that starts a process lane must do so under "
                            "`if __name__ == '__main__':` (the 'spawn' start method re-imports the main module)")
            self._start_error = LaneError(message)

    def started(self) -> bool:
        """Whether the child is up (or failed to start), without waiting."""
        return not self._starter.is_alive()

    def wait_started(self):
        """Wait for the child; LaneError if it did not start."""
        self._starter.join()
        if self._start_error is not None:
            raise self._start_error

    def _recv(self, timeout):
        timeout = self.call_timeout if timeout is None else timeout
        try:
            if not self.conn.poll(timeout):
                raise LaneError(f"draft process did not answer within {timeout} s")
            return self.conn.recv()
        except (EOFError, OSError, ConnectionError):
            raise self._died() from None

    def _died(self) -> LaneError:
        return LaneError(f"draft process died (exit code {self.proc.exitcode})")

    def _receive_one(self, timeout):
        reply = self.waiting.popleft()
        reply.value, reply.done = self._recv(timeout), True

    def submit(self, method: str, *args) -> _Reply:
        self.wait_started()
        try:
            self.conn.send((method, args))
        except (OSError, BrokenPipeError, ValueError):
            raise self._died() from None
        reply = _Reply(self)
        self.waiting.append(reply)
        return reply

    def call(self, method: str, *args, timeout=None):
        return self.submit(method, *args).result(timeout)[0]

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def close(self, wait=True):
        """Ask the process to exit; kill it if it does not within 5 s (at once if still starting)."""
        if not self.started():  # the starter may be writing to the pipe: end the child, then the starter
            self.proc.kill()
            self._starter.join()
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5)
        self.conn.close()
