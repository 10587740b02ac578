"""The server side of inference sessions: each is one bidirectional stream, run from its
`open` to its end.

A stream's first message must be `open` (checked, its cache tokens reserved, the span's
inference state started; answered with step 0); every later one must be a `step`, run in
order and answered with its output. A session also takes steps pushed by the previous peer
of its client's chain, and pushes its own output on when a step asks for it (server-to-server
push, see peer/push.py).

A session ends when the client closes it, on an error, when it stays idle longer than the
session timeout, or when the peer shuts down; its cache tokens are released in every case.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc

from swarm.blocks import BlockSpan, InferenceState
from swarm.joined_prompts import MAX_TOKENS as JOINED_PROMPT_TOKENS
from swarm.wire import swarm_pb2

from .compute import SpanCompute
from .memory import CacheBudget, CacheReservation
from .push import ANSWER_AFTER_PUSH_MAX_WAIT, PushFailed, Pushed, PushRouter, SessionInbox, check_targets, is_stale
from .requests import BadRequest, InferenceOpen, InferenceStep, RequestDecoder, decode, tensor_bytes
from .runtime import ComputeRuntime, Priority
from .status import end_call, refuse

logger = logging.getLogger(__name__)

Code = grpc.StatusCode


class SessionClosed(Exception):
    """The peer ends a session itself (idle too long, shutting down); carries the status to send."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(eq=False)
class InferenceSession:
    """One open stream's state."""

    # Resolved with a SessionClosed when the peer ends the session from outside (shutdown).
    closed: asyncio.Future
    reservation: CacheReservation | None = None
    reading: asyncio.Task | None = None  # the pending context.read()
    response_codec: str = "raw"
    steps: int = 0
    opened: InferenceOpen | None = None
    state: InferenceState | None = None
    tokens_received: int = 0
    inbox: SessionInbox | None = None  # pushed steps and failed pushes, once the session is open
    taking: asyncio.Task | None = None  # the pending inbox.get()
    last_step_id: int = 0  # the newest step run: older ids are duplicates (pushed and resent)
    steps_pushed_in: int = 0
    # Seconds the last step spent in each stage on the compute thread (for the debug log).
    compute_s: float = 0.0
    encode_s: float = 0.0


class InferenceSessions:
    """The open inference sessions on one span: runs each stream (`serve`), reports them
    (`statuses`), and ends them all when the span stops serving (`close_all`)."""

    def __init__(self, span: BlockSpan, decoder: RequestDecoder, compute: SpanCompute, runtime: ComputeRuntime,
                 budget: CacheBudget, pushes: PushRouter, session_timeout: float) -> None:
        self.span, self.decoder, self.compute, self.runtime = span, decoder, compute, runtime
        self.budget, self.pushes, self.session_timeout = budget, pushes, session_timeout
        self._sessions: set[InferenceSession] = set()
        self.tokens_served = 0  # every step's tokens (rows x length), for the DHT record's counter
        self._idle_message = (f"inference session idle for more than {session_timeout:g} s; closed to free its "
                              "cache (open a new session to go on)")

    def __len__(self) -> int:
        return len(self._sessions)

    def statuses(self) -> list[swarm_pb2.SessionStatus]:
        """The sessions that are open (past their `open`), as Info lists them."""
        return [swarm_pb2.SessionStatus(session_id=s.opened.session_id, position=s.state.position,
                                        tokens_received=s.tokens_received, max_length=s.opened.max_length,
                                        batch_size=s.opened.batch_size, steps_pushed_in=s.steps_pushed_in)
                for s in self._sessions if s.state is not None]

    async def serve(self, context: grpc.aio.ServicerContext) -> None:
        """Runs one Inference stream to its end, and sets the status it ends with."""
        # Reads and writes go through `context` (not a response generator). The session is
        # never ended by cancelling a pending gRPC operation (grpc then fails to send the
        # status): `_read` waits for the next message *or* the session being closed.
        session = InferenceSession(asyncio.get_running_loop().create_future())
        self._sessions.add(session)
        try:
            await self._run(session, context)
        except SessionClosed as e:
            end_call(context, e.code, str(e))
        except Exception as e:
            await refuse(context, e, "Inference")
        finally:
            self._sessions.discard(session)
            self.runtime.forget(self.compute, session)  # its steps are not waited for any more
            if session.reading is not None:  # ends with the call; nobody wants its result
                session.reading.add_done_callback(_discard_result)
            self._close_inbox(session)
            if session.reservation is not None:
                self.budget.release(session.reservation)
                logger.debug("session %s closed after %d steps; %d cache tokens free", session.reservation.session_id,
                             session.steps, self.budget.free_tokens)

    async def close_all(self, message: str, timeout: float) -> None:
        """Ends every open session with UNAVAILABLE and `message`: at once if it waits for the
        client, after its current step otherwise. Waits up to `timeout` s for them to end."""
        for session in self._sessions:
            if not session.closed.done():
                session.closed.set_result(SessionClosed(Code.UNAVAILABLE, message))
        deadline = time.monotonic() + timeout
        while self._sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def _run(self, session: InferenceSession, context: grpc.aio.ServicerContext) -> None:
        first = await self._read(session, context)
        if first is None:
            return
        if first.WhichOneof("kind") != "open":
            raise BadRequest(f"the first message of an inference stream must be 'open', got "
                             f"{first.WhichOneof('kind') or 'an empty message'!r}")
        opened = await decode(tensor_bytes(first.open), self.decoder.inference_open, first.open)
        session.reservation = self.budget.reserve(opened.session_id, opened.batch_size, opened.max_length)
        session.response_codec = opened.response_codec
        # On the compute thread: checking adapters attaches their hooks for a moment, which
        # must not overlap another request's compute.
        state = await self.runtime.run(Priority.INFERENCE, self.span.start_inference, opened.batch_size,
                                       opened.max_length, opened.deep_prompts, opened.adapters)
        if state.prefix_length:  # prefix keys/values sit in the cache ahead of the prompt: they count too
            self.budget.release(session.reservation)
            session.reservation = self.budget.reserve(opened.session_id, opened.batch_size,
                                                      opened.max_length + state.prefix_length)
        session.opened, session.state = opened, state
        session.inbox = self.pushes.open_inbox(opened.session_id)
        await context.write(swarm_pb2.InferenceResponse(step_id=0, position=0, supports_push=True))

        debug = logger.isEnabledFor(logging.DEBUG)
        while (request := await self._next_request(session, context)) is not None:
            received = time.perf_counter()
            if request.WhichOneof("kind") != "step":
                raise BadRequest(f"after 'open', every message of an inference stream must be 'step', got "
                                 f"{request.WhichOneof('kind') or 'an empty message'!r}")
            step = await decode(len(request.step.hidden_states.data), self.decoder.inference_step,
                                request.step, opened)
            decoded = time.perf_counter()
            hidden, session.compute_s, session.encode_s = await self._compute(session, step)
            computed = time.perf_counter()
            session.steps += 1
            session.tokens_received += step.hidden_states.shape[1]
            self.tokens_served += step.hidden_states.shape[0] * step.hidden_states.shape[1]
            session.last_step_id = max(session.last_step_id, step.step_id)
            pushing = self.pushes.push_on(request.step, hidden, session.inbox)
            if pushing is not None:
                # The next peer waits on the push; our client only keeps this answer for recovery.
                # Answering once the push is acknowledged keeps the client's receive off the cores
                # the push needs: on 2 cores, peer -> peer took 1.6-1.8 ms this way, 2.1 ms with
                # both at once (benchmarks/decode_trace.py). Bounded: a hung target must not make
                # this healthy peer look hung to its client.
                await asyncio.wait({pushing}, timeout=ANSWER_AFTER_PUSH_MAX_WAIT)
            await context.write(swarm_pb2.InferenceResponse(step_id=step.step_id, position=state.position,
                                                            hidden_states=hidden))
            if debug:
                queued = computed - decoded - session.compute_s - session.encode_s
                # perf_counter is the system's monotonic clock: the same in every process of a
                # machine, so `received at` lines up with other peers' and the client's traces.
                logger.debug("session %s step %d (%d tokens): decode %.3f ms, queue %.3f ms, compute %.3f ms, "
                             "encode %.3f ms, write %.3f ms, received at %.6f", opened.session_id, step.step_id,
                             step.hidden_states.shape[1], 1e3 * (decoded - received), 1e3 * queued,
                             1e3 * session.compute_s, 1e3 * session.encode_s, 1e3 * (time.perf_counter() - computed),
                             received)

    async def _compute(self, session: InferenceSession, step: InferenceStep):
        """The step on the compute thread. A decode step, or a short prompt (the session's first
        step), of a session that may join others runs in one forward pass with the joinable
        steps waiting then (peer/runtime.py, swarm/step_batch.py). A long prompt runs by itself:
        steps taken with it would wait for it."""
        state, codec = session.state, session.response_codec
        tokens = step.hidden_states.shape[1]
        decoding = tokens == 1
        if state.joinable and (decoding or (state.position == 0 and tokens <= JOINED_PROMPT_TOKENS)):
            rows = step.hidden_states.shape[0]
            return await self.runtime.run_together(Priority.INFERENCE, self.compute, self.compute.inference_steps,
                                                   (state, step, codec), rows=rows, light=decoding, member=session,
                                                   merge=self.span.start == 0)
        return await self.runtime.run(Priority.INFERENCE, self.compute.inference_step, state, step, codec,
                                      light=decoding)

    async def _next_request(self, session: InferenceSession,
                            context: grpc.aio.ServicerContext) -> swarm_pb2.InferenceRequest | None:
        """The next step to run, from the client or pushed by the previous peer, or None at
        the end of the stream. Tells the client about our failed pushes on the way, and drops
        steps that were already run (a push and the client's own copy of one step)."""
        while True:
            item = await self._read(session, context)
            if isinstance(item, PushFailed):
                await context.write(swarm_pb2.InferenceResponse(step_id=item.step_id, position=session.state.position,
                                                                push_error=item.error))
                continue
            pushed = isinstance(item, Pushed)
            if pushed:
                item = swarm_pb2.InferenceRequest(step=item.step)
            if item is not None and item.WhichOneof("kind") == "step":
                check_targets(item.step)
                if is_stale(item.step, session.last_step_id):
                    logger.debug("session %s: step %d arrived again; already run", session.opened.session_id,
                                 item.step.step_id)
                    continue
            session.steps_pushed_in += pushed
            return item

    async def _read(self, session: InferenceSession,
                    context: grpc.aio.ServicerContext) -> swarm_pb2.InferenceRequest | Pushed | PushFailed | None:
        """The next message from the client or the session's inbox, or None at the end of the
        stream. Raises SessionClosed when neither has anything for longer than the session
        timeout, or when the peer closes the session."""
        if session.reading is None:
            session.reading = asyncio.ensure_future(context.read())
        if session.taking is None and session.inbox is not None:
            session.taking = session.inbox.next_item()
        waiting = [session.reading, session.closed] + ([session.taking] if session.taking is not None else [])
        await asyncio.wait(waiting, timeout=self.session_timeout, return_when=asyncio.FIRST_COMPLETED)
        if session.closed.done():
            raise session.closed.result()
        if session.taking is not None and session.taking.done():
            item, session.taking = session.taking.result(), None
            return item
        if not session.reading.done():
            raise SessionClosed(Code.DEADLINE_EXCEEDED, self._idle_message)
        request, session.reading = session.reading.result(), None
        return None if request is grpc.aio.EOF else request

    def _close_inbox(self, session: InferenceSession) -> None:
        if session.taking is not None:
            session.taking.cancel()  # our own wait on the inbox; nothing is lost
        if session.inbox is not None:
            self.pushes.close_inbox(session.opened.session_id, session.inbox)


def _discard_result(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log it as never retrieved
