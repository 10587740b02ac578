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

Decode steps of different sessions that wait at the same time run as one forward pass
(`run_together`): when the worker comes free it takes the first job, and with it every queued
job of the same batch key, and hands them to one function. A lone client's step runs the
moment the worker is free; while other sessions are generating too, a step may wait for
theirs (peer/join_rule.py says for whom, and how long).

A long training call does not hold the worker for its whole length: it calls `make_way()`
between pieces of its work (per block), which runs the inference jobs waiting by then, on
this same thread, before the call goes on.

Light jobs (a decode step: one token per sequence) may run on fewer threads than the rest
(`light_threads`). On CPU a decode step is a chain of small memory-bound ops where threads add
synchronisation and little speed, and several peers sharing a machine (`LocalSwarm`) would
otherwise spin OpenMP workers on each other's cores: measured on 2 cores, 3 peers, a 10-block
decode step took 17.6 ms on one thread vs 19.3 ms on two, while a training Forward+Backward
(4 x 64 tokens) took 0.25 s on two vs 0.44 s on one.

That holds while sessions step out of turn: their steps keep every peer busy. A pass that
holds the step of every session active on the peer gets every thread anyway: no session has a
step anywhere else, so the other peers on the machine wait for this one and nothing competes
for the cores. Measured 2026-12-03, 3 peers on 2 cores, with the short OpenMP spin swarm/cli.py
sets: a lone client's generate 1.10x faster (5 of 6 alternating rounds); a joined pass of 8
sessions over 10 blocks 30.9 ms on two threads vs 48.6 ms on one.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence, TypeVar

from swarm.heap import release_freed_memory

from .join_rule import ACTIVE_GAP, Member, wait_for_members
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
    # Jobs with the same key (not None) may run together: fn takes the list of their items.
    batch_key: Hashable | None = field(compare=False, default=None)
    item: Any = field(compare=False, default=None)
    rows: int = field(compare=False, default=1)
    member: Hashable | None = field(compare=False, default=None)  # who submitted it (a session)
    merge: bool = field(compare=False, default=False)  # also waits for members ahead of it
    queued_at: float = field(compare=False, default=0.0)


class RuntimeStopped(RuntimeError):
    """Work was submitted after `ComputeRuntime.shutdown`."""


class ComputeRuntime:
    """Runs functions on a single worker thread, highest priority first.

    `await runtime.run(priority, fn, *args)` returns fn's result (or raises its exception)
    in the caller's event loop. If the caller is cancelled (e.g. the client hung up) before
    the job starts, the job is skipped.
    """

    def __init__(self, name: str = "compute", threads: int | None = None, light_threads: int | None = None,
                 max_rows: int = 64, join_wait: float = 0.0) -> None:
        self.threads, self.light_threads = threads, light_threads  # None: torch's setting as it is
        self.max_rows = max_rows  # rows (sequences) one merged run may hold
        self.join_wait = join_wait  # s a joinable job may wait for the other active members of its key
        self._active: dict[Hashable, dict[Hashable, Member]] = {}  # batch key -> member -> what it did last
        self._heap: list[_Job] = []
        self._ready = threading.Condition()
        self._seq = itertools.count()
        self._stopped = False
        self._running_priority: int | None = None  # the worker's current job, for make_way
        self._default_threads: int | None = None
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    async def run(self, priority: Priority, fn: Callable[..., T], *args: Any, light: bool = False,
                  **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` on the worker; `light`: on `light_threads` threads."""
        return await self._submit(_Job(int(priority), next(self._seq), fn, args, kwargs, light))

    async def run_together(self, priority: Priority, key: Hashable, fn: Callable[[list], Sequence], item: Any,
                           rows: int = 1, light: bool = False, member: Hashable | None = None,
                           merge: bool = False) -> Any:
        """`fn([item, ...])[i]` for this item, run in one call with the other items of `key`
        waiting when the worker takes it (up to `max_rows` rows in all). `fn` returns one
        result per item, in order; an item whose result is an exception gets it raised.

        `member` names who submits (a session): while other members of the key are active
        (their last job ran with others', less than ACTIVE_GAP s ago), the worker waits up to
        `join_wait` s from this job's arrival for their next jobs, so that they run together.
        `merge`: it waits also for members that ran here since `member` last did
        (peer/join_rule.py). A lone member never waits; `forget` it when it leaves."""
        return await self._submit(_Job(int(priority), next(self._seq), fn, light=light, batch_key=key, item=item,
                                       rows=rows, member=member, merge=merge, queued_at=time.monotonic()))

    def forget(self, key: Hashable, member: Hashable) -> None:
        """`member` submits no more jobs of `key`: nobody waits for it."""
        with self._ready:
            self._active.get(key, {}).pop(member, None)

    async def _submit(self, job: _Job):
        if self._stopped:
            raise RuntimeStopped("the compute runtime is shut down")
        job.loop = asyncio.get_running_loop()
        job.future = job.loop.create_future()
        self._put(job)
        return await job.future

    def _put(self, job: _Job) -> None:
        with self._ready:
            heapq.heappush(self._heap, job)
            self._ready.notify()

    @property
    def pending(self) -> int:
        """Jobs waiting (not counting the one running); approximate, for Info and logs."""
        return len(self._heap)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stops the worker after the jobs already queued; waits up to `timeout` seconds."""
        if self._stopped:
            return
        self._stopped = True
        # Lowest priority and last in order: everything submitted before runs first.
        self._put(_Job(len(Priority), next(self._seq), None))
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("compute worker still busy after %.1f s; leaving it (daemon thread)", timeout)

    def make_way(self) -> int:
        """Called by a job on the worker thread between pieces of its work: runs the jobs of
        higher priority waiting now (and those arriving meanwhile), then returns how many ran.
        Anywhere else it does nothing."""
        if threading.current_thread() is not self._thread or self._running_priority is None:
            return 0
        mine, ran = self._running_priority, 0
        threads_before = self._torch().get_num_threads()
        while (taken := self._take(below=mine)) is not None:
            self._run(taken)
            ran += len(taken)
        if ran and self._torch().get_num_threads() != threads_before:
            self._torch().set_num_threads(threads_before)
        return ran

    # --- the worker ---------------------------------------------------------------------------

    @staticmethod
    def _torch():
        import torch  # here, not at import: `swarm peer --help` must stay instant

        return torch

    def _take(self, below: int | None = None, timeout: float | None = None) -> list[_Job] | None:
        """The next job, with the queued jobs that run together with it; None if nothing is
        queued (of priority below `below`, when given) within `timeout` s (None: wait forever,
        unless `below` is given: then no wait)."""
        with self._ready:
            if below is None and not self._heap:
                self._ready.wait(timeout)
            if not self._heap or (below is not None and self._heap[0].priority >= below):
                return None
            first = heapq.heappop(self._heap)
            if first.batch_key is None:
                return [first]
            if below is None and self.join_wait > 0:
                wait_for_members(self._ready, self._heap, self._active.get(first.batch_key, {}), first,
                                 self.join_wait)
            jobs, rows, rest = [first], first.rows, []
            for job in sorted(self._heap):  # arrival order within a priority
                if (job.batch_key == first.batch_key and job.priority == first.priority
                        and rows + job.rows <= self.max_rows):
                    jobs.append(job)
                    rows += job.rows
                else:
                    rest.append(job)
            if len(jobs) > 1:
                self._heap = rest
                heapq.heapify(self._heap)
            now, together = time.monotonic(), len(jobs) > 1
            active = self._active.setdefault(first.batch_key, {})
            active.update((job.member, Member(now, together)) for job in jobs if job.member is not None)
            return jobs

    def _work(self) -> None:
        torch = self._torch()
        default = self._default_threads = self.threads or torch.get_num_threads()
        trim_when_idle = False
        while True:
            jobs = self._take(timeout=IDLE_TRIM_SECONDS if trim_when_idle else None)
            if jobs is None:
                # Heavy work is over for now: a training call's activations are freed but glibc
                # keeps them (measured: a peer held 1.9x its weights + cache after one step
                # instead of 1.1x). Not after every call: the next call of a training run would
                # fault all those pages back in.
                release_freed_memory()
                trim_when_idle = False
                continue
            if jobs[0].fn is None:
                return
            self._running_priority = jobs[0].priority
            self._run(jobs)
            self._running_priority = None
            trim_when_idle = trim_when_idle or not all(job.light for job in jobs)
            # Let go now, not when the next job arrives: an idle worker must not keep the last
            # request's tensors (a training batch, a closed session's KV cache) alive.
            del jobs

    def _run(self, jobs: list[_Job]) -> None:
        torch = self._torch()
        default = self._default_threads or torch.get_num_threads()
        light = all(job.light for job in jobs) and not self._everyone(jobs)
        want = (self.light_threads or default) if light else default
        if torch.get_num_threads() != want:
            torch.set_num_threads(want)  # ~microseconds; changes only between jobs
        # Read across threads: at worst we run a job nobody awaits.
        jobs = [job for job in jobs if not job.future.cancelled()]
        if not jobs:
            return
        first = jobs[0]
        if first.batch_key is None:
            run_into(first.loop, first.future, first.fn, *first.args, **first.kwargs)
            return
        try:
            results = first.fn([job.item for job in jobs])
            if len(results) != len(jobs):
                raise RuntimeError(f"a batch function returned {len(results)} results for {len(jobs)} items")
        except BaseException as e:  # noqa: BLE001 - every job of the batch gets it
            results = [e] * len(jobs)
        for job, result in zip(jobs, results):
            run_into(job.loop, job.future, _given, result)

    def _everyone(self, jobs: list[_Job]) -> bool:
        """Whether `jobs` hold a step of every member active on this peer (of any key), one
        member at least: then no other session's step competes for the cores (on a shared
        machine the other peers are idle too, waiting for this pass), so even a light pass
        gets every thread."""
        members = {job.member for job in jobs}
        if None in members:
            return False
        now = time.monotonic()
        with self._ready:
            return not any(now - seen.last < ACTIVE_GAP and m not in members
                           for active in self._active.values() for m, seen in active.items())


def _given(result):
    if isinstance(result, BaseException):
        raise result
    return result
