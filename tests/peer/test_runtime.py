"""peer.runtime: one compute thread, inference before training, results in the caller's loop."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref

import pytest

from peer.runtime import ComputeRuntime, Priority, RuntimeStopped


@pytest.fixture
def runtime():
    runtime = ComputeRuntime()
    yield runtime
    runtime.shutdown()


async def _wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.001)


async def occupy_worker(runtime: ComputeRuntime, gate: threading.Event) -> asyncio.Task:
    """A job that holds the worker until `gate` is set; returns once the worker runs it."""
    started = threading.Event()

    def hold() -> None:
        started.set()
        gate.wait(5.0)

    blocker = asyncio.create_task(runtime.run(Priority.TRAINING, hold))
    # The worker imports torch before its first job: seconds on a slow machine.
    assert await asyncio.to_thread(started.wait, 60.0), "the worker never started the job"
    return blocker


def test_inference_runs_before_training_and_fifo_within_a_priority(runtime):
    ran: list[str] = []
    gate = threading.Event()

    async def main():
        blocker = await occupy_worker(runtime, gate)  # everything below queues up behind it
        order = [("train-1", Priority.TRAINING), ("infer-1", Priority.INFERENCE), ("train-2", Priority.TRAINING),
                 ("infer-2", Priority.INFERENCE), ("infer-3", Priority.INFERENCE)]
        tasks = []
        for label, priority in order:
            tasks.append(asyncio.create_task(runtime.run(priority, ran.append, label)))
            await asyncio.sleep(0)  # let it enqueue, so arrival order is the list's order
        await _wait_until(lambda: runtime.pending == len(order))
        gate.set()
        await asyncio.gather(blocker, *tasks)

    asyncio.run(main())
    assert ran == ["infer-1", "infer-2", "infer-3", "train-1", "train-2"]


def test_result_and_exception_arrive_in_the_callers_loop(runtime):
    loop_thread = threading.get_ident()

    def where(x):
        return threading.get_ident(), x * 2

    def fail():
        raise ValueError("bad shape (1, 2)")

    async def main():
        worker_thread, doubled = await runtime.run(Priority.INFERENCE, where, 21)
        with pytest.raises(ValueError, match=r"bad shape \(1, 2\)"):
            await runtime.run(Priority.TRAINING, fail)
        # The worker survives a failing job.
        return worker_thread, doubled, await runtime.run(Priority.TRAINING, lambda: "still alive")

    worker_thread, doubled, after = asyncio.run(main())
    assert worker_thread != loop_thread and doubled == 42 and after == "still alive"


def test_event_loop_is_free_while_compute_runs(runtime):
    async def main():
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        ticker = asyncio.create_task(tick())
        await runtime.run(Priority.TRAINING, time.sleep, 0.3)
        ticker.cancel()
        return ticks

    assert asyncio.run(main()) >= 10  # ~60 if the loop never waited for the job


def test_cancelled_job_is_skipped(runtime):
    gate = threading.Event()
    ran: list[str] = []

    async def main():
        blocker = await occupy_worker(runtime, gate)
        doomed = asyncio.create_task(runtime.run(Priority.INFERENCE, ran.append, "doomed"))
        await _wait_until(lambda: runtime.pending == 1)
        doomed.cancel()
        gate.set()
        await blocker
        await runtime.run(Priority.INFERENCE, ran.append, "after")
        with pytest.raises(asyncio.CancelledError):
            await doomed

    asyncio.run(main())
    assert ran == ["after"]


def test_shutdown_finishes_queued_work_then_refuses_more():
    runtime = ComputeRuntime()
    ran: list[int] = []

    async def main():
        tasks = [asyncio.create_task(runtime.run(Priority.TRAINING, ran.append, i)) for i in range(3)]
        await asyncio.sleep(0)
        await asyncio.to_thread(runtime.shutdown)
        await asyncio.gather(*tasks)
        with pytest.raises(RuntimeStopped):
            await runtime.run(Priority.INFERENCE, ran.append, 99)

    asyncio.run(main())
    assert ran == [0, 1, 2]


def test_an_idle_worker_keeps_nothing_of_the_last_job(runtime):
    """The job's arguments and result are let go once it is delivered, not when the next job
    comes: an idle peer must not hold the last request's tensors or a closed session's cache."""
    class Payload:
        pass

    async def main():
        payload = Payload()
        gone = weakref.ref(payload)
        result = await runtime.run(Priority.INFERENCE, lambda p: Payload(), payload)
        result_gone = weakref.ref(result)
        del payload, result
        await _wait_until(lambda: gone() is None and result_gone() is None, timeout=2.0)

    gc.disable()  # freed by reference counting, not by a collection that may never come
    try:
        asyncio.run(main())
    finally:
        gc.enable()


def test_light_jobs_run_on_their_own_thread_count():
    import torch

    before = torch.get_num_threads()
    runtime = ComputeRuntime(threads=2, light_threads=1)

    async def counts() -> list[int]:
        return [await runtime.run(Priority.INFERENCE, torch.get_num_threads, light=light)
                for light in (True, False, True)]

    try:
        assert asyncio.run(counts()) == [1, 2, 1]
    finally:
        runtime.shutdown()
        torch.set_num_threads(before)


def test_a_pass_holding_every_active_sessions_step_gets_every_thread_and_others_the_light_count():
    """When a pass holds the step of every session active on the peer (a lone session's, or
    every session's at once), nothing else competes for the cores: it runs on all of them. A
    pass that leaves an active session out goes back to `light_threads`."""
    import torch

    before = torch.get_num_threads()
    runtime = ComputeRuntime(threads=2, light_threads=1)

    def counts(items: list) -> list[int]:
        return [torch.get_num_threads()] * len(items)

    def step(member: str):
        return runtime.run_together(Priority.INFERENCE, "span", counts, None, light=True, member=member)

    async def main() -> list:
        seen = [await step("a"), await step("a")]
        seen.append(await step("b"))  # a ran just now: b's pass leaves a out
        gate = threading.Event()
        blocker = await occupy_worker(runtime, gate)
        both = [asyncio.create_task(step("a")), asyncio.create_task(step("b"))]
        await _wait_until(lambda: runtime.pending == 2)
        gate.set()
        await blocker
        seen.append(await asyncio.gather(*both))  # one pass with both: everyone's
        seen.append(await step("a"))  # b is still active
        runtime.forget("span", "b")
        seen.append(await step("a"))  # b left: a is alone again
        seen.append(await runtime.run(Priority.INFERENCE, torch.get_num_threads, light=True))  # nobody's
        return seen

    try:
        assert asyncio.run(main()) == [2, 2, 1, [2, 2], 1, 2, 1]
    finally:
        runtime.shutdown()
        torch.set_num_threads(before)


# --- jobs that run together -----------------------------------------------------------------


def batches_of(runs: list[list]):
    """A batch function recording each call's items; every item's result is itself doubled."""
    def fn(items: list) -> list:
        runs.append(list(items))
        return [item * 2 for item in items]
    return fn


def test_jobs_of_one_key_waiting_together_run_in_one_call(runtime):
    runs: list[list] = []
    gate = threading.Event()

    async def main():
        blocker = await occupy_worker(runtime, gate)
        fn = batches_of(runs)
        tasks = [asyncio.create_task(runtime.run_together(Priority.INFERENCE, "span", fn, i)) for i in range(3)]
        other = asyncio.create_task(runtime.run_together(Priority.INFERENCE, "other span", fn, 10))
        await _wait_until(lambda: runtime.pending == 4)
        gate.set()
        return await asyncio.gather(*tasks, other), blocker

    results, _ = asyncio.run(main())
    assert results == [0, 2, 4, 20]
    assert sorted(runs, key=len) == [[10], [0, 1, 2]]


def test_an_item_error_reaches_only_its_caller(runtime):
    gate = threading.Event()

    def fn(items):
        return [ValueError(f"bad {item}") if item == "bad" else item for item in items]

    async def main():
        blocker = await occupy_worker(runtime, gate)
        good = asyncio.create_task(runtime.run_together(Priority.INFERENCE, "k", fn, "good"))
        bad = asyncio.create_task(runtime.run_together(Priority.INFERENCE, "k", fn, "bad"))
        await _wait_until(lambda: runtime.pending == 2)
        gate.set()
        await blocker
        return await asyncio.gather(good, bad, return_exceptions=True)

    good, bad = asyncio.run(main())
    assert good == "good" and isinstance(bad, ValueError) and str(bad) == "bad bad"


def test_members_that_ran_together_wait_for_each_other_and_a_lone_one_never_waits():
    runtime = ComputeRuntime(join_wait=0.5)
    runs: list[list] = []
    fn = batches_of(runs)
    gate = threading.Event()

    async def step(member: str, item: int) -> float:
        started = time.monotonic()
        await runtime.run_together(Priority.INFERENCE, "span", fn, item, member=member)
        return time.monotonic() - started

    async def main():
        alone = await step("a", 1)  # nobody else: no wait
        blocker = await occupy_worker(runtime, gate)
        first = [asyncio.create_task(step(m, i)) for m, i in (("a", 2), ("b", 3))]
        await _wait_until(lambda: runtime.pending == 2)
        gate.set()
        await asyncio.gather(blocker, *first)  # a and b ran together: now they wait for each other
        a = asyncio.create_task(step("a", 4))
        await asyncio.sleep(0.1)  # b's step comes 0.1 s later, within a's wait
        b = await step("b", 5)
        waited = await a
        runtime.forget("span", "b")  # b is gone: a runs at once again
        after_forget = await step("a", 6)
        return alone, waited, b, after_forget

    try:
        alone, waited, b, after_forget = asyncio.run(main())
    finally:
        runtime.shutdown()
    assert runs == [[1], [2, 3], [4, 5], [6]]
    assert alone < 0.25 and after_forget < 0.25
    assert 0.09 < waited < 0.45


def test_members_that_never_ran_together_are_not_waited_for():
    """One client stepping two sessions in turn: each waits behind the other, so waiting for
    the other would cost every step the whole join wait."""
    runtime = ComputeRuntime(join_wait=0.5)
    fn = batches_of([])

    async def main():
        took = []
        for i in range(4):
            started = time.monotonic()
            await runtime.run_together(Priority.INFERENCE, "span", fn, i, member="ab"[i % 2])
            took.append(time.monotonic() - started)
        return took

    try:
        took = asyncio.run(main())
    finally:
        runtime.shutdown()
    assert max(took) < 0.25, took


def test_two_pairs_a_stage_apart_do_not_wait_for_each_other_at_two_peers():
    """Four sessions stepping in two pairs through two peers, the pair b a stage behind the pair
    a. If a peer waited for every member that ran with others lately, a would wait at the first
    peer for b while b waits at the second for a, at every pass, each for the whole join wait
    (measured: 4 clients through 3 peers at 10 tok/s, half the rate of 2). b has run at the
    first peer since a last did, so a goes on; at the second, b waits for a, which comes
    next: the pairs join."""
    join_wait, work, rounds = 0.3, 0.02, 8
    peers = [ComputeRuntime(join_wait=join_wait), ComputeRuntime(join_wait=join_wait)]
    runs: list[list] = []

    def compute(items):
        time.sleep(work)
        runs.append(sorted(items))
        return items

    async def steps(name: str, route: list) -> None:
        for peer in route:
            await peer.run_together(Priority.INFERENCE, "span", compute, name, member=name)

    async def pair(names: tuple, route: list) -> None:
        await asyncio.gather(*(steps(name, route) for name in names))

    async def session(name: str, first_round: list) -> None:
        await steps(name, first_round)
        for _ in range(rounds - 1):
            await asyncio.sleep(0.005)  # the client picks its token
            await steps(name, peers)
        for peer in peers:
            peer.forget("span", name)

    async def main() -> float:
        for names in (("a1", "a2"), ("b1", "b2")):  # each pair steps together through both peers
            await pair(names, peers)
        runs.clear()
        started = time.monotonic()
        await asyncio.gather(*(session(name, peers if name[0] == "a" else peers[1:])
                               for name in ("a1", "a2", "b1", "b2")))
        return time.monotonic() - started

    try:
        took = asyncio.run(main())
    finally:
        for peer in peers:
            peer.shutdown()
    assert took < rounds * join_wait / 2, (took, runs)
    assert runs[-1] == ["a1", "a2", "b1", "b2"], runs  # waiting still pulls the pairs into one pass


@pytest.mark.parametrize("merge", [False, True])
def test_groups_a_part_of_a_round_apart_merge_only_where_jobs_merge(merge):
    """Two pairs of sessions, b half a round behind a, stepping through one peer in turn. Each
    pair is ahead of the other at the peer, so the join rule alone keeps them apart for good; a
    `merge` peer (the one serving block 0) waits for the pair ahead too: one pass from then on."""
    join_wait, work, think, rounds = 0.3, 0.01, 0.06, 8
    peer = ComputeRuntime(join_wait=join_wait)
    runs: list[list] = []

    def compute(items):
        time.sleep(work)
        runs.append(sorted(items))
        return items

    async def step(name: str) -> None:
        await peer.run_together(Priority.INFERENCE, "span", compute, name, member=name, merge=merge)

    async def session(name: str) -> None:
        for _ in range(rounds):
            await asyncio.sleep(think)  # the rest of the chain, and the client picking its token
            await step(name)
        peer.forget("span", name)

    async def pair(names: tuple, delay: float) -> None:
        await asyncio.sleep(delay)
        await asyncio.gather(*(step(name) for name in names))  # the pair runs together first
        await asyncio.gather(*(session(name) for name in names))

    async def main() -> float:
        await peer.run(Priority.INFERENCE, lambda: None)  # the worker is up (it imports torch first)
        started = time.monotonic()
        await asyncio.gather(pair(("a1", "a2"), 0), pair(("b1", "b2"), work + think / 2))
        return time.monotonic() - started

    try:
        took = asyncio.run(main())
    finally:
        peer.shutdown()
    together = runs.count(["a1", "a2", "b1", "b2"])
    if merge:
        assert together >= rounds - 2, runs  # from the second round on, but a's last, a round ahead
        assert took < (rounds + 2) * (work + think), (took, runs)
    else:
        assert together == 0, runs
