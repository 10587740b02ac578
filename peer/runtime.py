"""The peer's compute runtime: one worker thread, fed by a priority queue.

gRPC handlers run on the asyncio event loop, which must stay free to read and write
messages; a span's forward pass (milliseconds to seconds) therefore runs on a worker
thread. There is exactly one worker: the span's weights are shared by every request, and
torch already parallelises one computation over the CPU cores or the GPU, so two
computations at once would only compete. Adapter hooks also rely on it
(`swarm.tuning.adapters_applied`: hooks of two calls never overlap).

Inference steps go before Forward/Backward: a client generating text waits for every token,
while training batches are large and can wait, so training never starves generation. Within
one priority, work runs in arrival order.

Light jobs (a decode step: one token per sequence) may run on fewer threads than the rest
(`light_threads`). On CPU a decode step is a chain of small memory-bound ops where threads add
synchronisation and little speed, and several peers sharing a machine (`LocalSwarm`) would
otherwise spin OpenMP workers on each other's cores: measured on 2 cores, 3 peers, a 10-block
decode step took 17.6 ms on one thread vs 19.3 ms on two, while a training Forward+Backward
(4 x 64 tokens) took 0.25 s on two vs 0.44 s on one.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from swarm.heap import release_freed_memory

from .threads import run_into

logger = logging.getLogger(__name__)

T = TypeVar("T")
# Seconds without work after a heavy job (training, prefill) before freed memory goes back to the OS.
IDLE_TRIM_SECONDS = 1.0


class Priority(enum.IntEnum):
    """Lower runs first."""

    INFERENCE = 0
    TRAINING = 1


@dataclass(order=True)
class _Job:
    priority: int
    seq: int
    fn: Callable[..., Any] | None = field(compare=False)  # None: the stop signal
    args: tuple = field(compare=False, default=())
    kwargs: dict = field(compare=False, default_factory=dict)
    light: bool = field(compare=False, default=False)
    future: asyncio.Future | None = field(compare=False, default=None)
    loop: asyncio.AbstractEventLoop | None = field(compare=False, default=None)


class RuntimeStopped(RuntimeError):
    """Work was submitted after `ComputeRuntime.shutdown`."""


class ComputeRuntime:
    """Runs functions on a single worker thread, highest priority first.

    `await runtime.run(priority, fn, *args)` returns fn's result (or raises its exception)
    in the caller's event loop. If the caller is cancelled (e.g. the client hung up) before
    the job starts, the job is skipped.
    """

    def __init__(self, name: str = "compute", threads: int | None = None, light_threads: int | None = None) -> None:
        self.threads, self.light_threads = threads, light_threads  # None: torch's setting as it is
        self._queue: queue.PriorityQueue[_Job] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._stopped = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    async def run(self, priority: Priority, fn: Callable[..., T], *args: Any, light: bool = False,
                  **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` on the worker; `light`: on `light_threads` threads."""
        if self._stopped:
            raise RuntimeStopped("the compute runtime is shut down")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put(_Job(int(priority), next(self._seq), fn, args, kwargs, light, future, loop))
        return await future

    @property
    def pending(self) -> int:
        """Jobs waiting (not counting the one running); approximate, for Info and logs."""
        return self._queue.qsize()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stops the worker after the jobs already queued; waits up to `timeout` seconds."""
        if self._stopped:
            return
        self._stopped = True
        # Lowest priority and last in order: everything submitted before runs first.
        self._queue.put(_Job(len(Priority), next(self._seq), None))
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("compute worker still busy after %.1f s; leaving it (daemon thread)", timeout)

    def _work(self) -> None:
        import torch  # here, not at import: `swarm peer --help` must stay instant

        default = self.threads or torch.get_num_threads()
        trim_when_idle = False
        while True:
            try:
                job = self._queue.get(timeout=IDLE_TRIM_SECONDS if trim_when_idle else None)
            except queue.Empty:
                # Heavy work is over for now: a training call's activations are freed but glibc
                # keeps them (measured: a peer held 1.9x its weights + cache after one step
                # instead of 1.1x). Not after every call: the next call of a training run would
                # fault all those pages back in.
                release_freed_memory()
                trim_when_idle = False
                continue
            if job.fn is None:
                return
            want = (self.light_threads or default) if job.light else default
            if torch.get_num_threads() != want:
                torch.set_num_threads(want)  # ~microseconds; changes only between jobs
            self._run(job)
            trim_when_idle = trim_when_idle or not job.light
            # Let go now, not when the next job arrives: an idle worker must not keep the last
            # request's tensors (a training batch, a closed session's KV cache) alive.
            del job

    @staticmethod
    def _run(job: _Job) -> None:
        assert job.future is not None and job.loop is not None
        if job.future.cancelled():  # read across threads: at worst we run a job nobody awaits
            return
        run_into(job.loop, job.future, job.fn, *job.args, **job.kwargs)
