"""Pushes on one long-lived stream per next peer (the `PushStream` RPC), both ends.

A unary Push per decode step costs a call's setup on both peers: on loopback, 2 cores, a
traced step spent 1.4 ms from one peer's output to the next peer's input this way, against
0.6 ms for the client's step on its open Inference stream (benchmarks/decode_trace.py). A
`PushLink` keeps one stream open to each next peer, shared by every session pushing there;
pushes are written one at a time and answered in the order written, so the k-th answer is
the k-th push's. A refused push is answered with its reason and the stream goes on; a broken
stream fails every push waiting on it, and the next push opens a new one.

The receiving end (`serve_push_stream`) queues each push exactly as a unary Push would and
answers it (a queued one a moment later, see `_write_acks`). It ends when the pusher does, or when its service closes (shutdown, or
a move to other blocks: pushes for the new span's sessions then come on a new stream).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Callable

import grpc

from swarm.wire import swarm_pb2, swarm_pb2_grpc

from .status import end_call

logger = logging.getLogger(__name__)

# Seconds a queued push's acknowledgement is held back (see `_write_acks`); the pusher's
# timeout (push.PUSH_TIMEOUT) is thousands of times longer.
ACK_DELAY = 0.002


class PushLinkBroken(ConnectionError):
    """The stream to the next peer ended or failed; every push waiting on it failed."""


class PushLink:
    """One open PushStream call to one next peer."""

    def __init__(self, stub: swarm_pb2_grpc.BlockServiceStub) -> None:
        self._call = stub.PushStream()
        self._answers: collections.deque[asyncio.Future] = collections.deque()  # in the order written
        self._writing = asyncio.Lock()  # gRPC takes one write at a time per call
        self.broken: BaseException | None = None
        self._reader = asyncio.ensure_future(self._read_answers())

    async def push(self, request: swarm_pb2.PushRequest, timeout: float) -> str:
        """Sends `request`; returns "" once the next peer queued it, or its refusal ("CODE: reason").
        Raises PushLinkBroken, or the stream's AioRpcError, when the stream fails; TimeoutError
        when it is not answered within `timeout` s, which also ends the stream (it hangs)."""
        if self.broken is not None:
            raise PushLinkBroken(f"push stream is closed: {self.broken}")
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        # A timer, not asyncio.wait_for: that would start a task of its own per push.
        timer = loop.call_later(timeout, self._time_out, answer, timeout)
        try:
            async with self._writing:
                self._answers.append(answer)
                try:
                    await self._call.write(request)
                except BaseException:
                    if answer.done() and not answer.cancelled() and answer.exception() is not None:
                        raise answer.exception() from None  # timed out while writing
                    answer.cancel()  # skipped when answers are matched: it was never written
                    raise
            return await answer
        finally:
            timer.cancel()

    def _time_out(self, answer: asyncio.Future, timeout: float) -> None:
        if not answer.done():
            answer.set_exception(asyncio.TimeoutError(f"push not acknowledged within {timeout:g} s"))
        self._call.cancel()  # every other push waiting here fails too; the next push opens a new stream

    async def _read_answers(self) -> None:
        try:
            while True:
                response = await self._call.read()
                if response is grpc.aio.EOF:
                    raise PushLinkBroken("the next peer ended the push stream")
                if not self._answers:
                    raise PushLinkBroken("the next peer answered a push that was not sent")
                answer = self._answers.popleft()
                if not answer.done():  # done: its pusher gave up waiting (timed out)
                    answer.set_result(response.error)
        except asyncio.CancelledError:
            self._fail(PushLinkBroken("push stream closed by this peer"))
            raise
        except BaseException as e:  # noqa: BLE001 - every waiting push gets it
            self._fail(e)

    def _fail(self, error: BaseException) -> None:
        self.broken = error
        while self._answers:
            answer = self._answers.popleft()
            if not answer.done():
                answer.set_exception(error)

    async def close(self) -> None:
        if self.broken is None:
            self.broken = PushLinkBroken("push stream closed by this peer")
        self._call.cancel()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)


async def serve_push_stream(context: grpc.aio.ServicerContext, answer: Callable[[swarm_pb2.PushRequest], str],
                            closed: asyncio.Future) -> None:
    """Reads pushes until the pusher ends the stream or `closed` is resolved; answers each with
    `answer(request)` ("" or the refusal). Raises what reading raised (an unparsable request)."""
    acks: asyncio.Queue[tuple[float, str] | None] = asyncio.Queue()
    writing = asyncio.ensure_future(_write_acks(context, acks))
    try:
        while True:
            reading = asyncio.ensure_future(context.read())
            await asyncio.wait([reading, closed], return_when=asyncio.FIRST_COMPLETED)
            if not reading.done():
                reading.add_done_callback(_discard_result)
                # The service is closing: the pusher opens a new stream for its next push.
                end_call(context, grpc.StatusCode.UNAVAILABLE, "this peer's service closed the push stream")
                return
            request = reading.result()
            if request is grpc.aio.EOF:
                return
            acks.put_nowait((time.monotonic(), answer(request)))
    finally:
        acks.put_nowait(None)  # the acks queued so far are written first
        await asyncio.gather(writing, return_exceptions=True)


async def _write_acks(context: grpc.aio.ServicerContext, acks: asyncio.Queue) -> None:
    """Answers the pushes in order. A queued step's answer waits until ACK_DELAY after it
    arrived: by then its session has it on the compute thread, and the write no longer
    competes with taking it (written at once, it held the step back ~0.1 ms on each side of
    the hand-off; the pusher only waits for it to answer its own client)."""
    while (item := await acks.get()) is not None:
        arrived, error = item
        wait = arrived + ACK_DELAY - time.monotonic()
        if not error and wait > 0:
            await asyncio.sleep(wait)
        await context.write(swarm_pb2.PushResponse(error=error))


def _discard_result(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()
