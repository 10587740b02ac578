"""Server-to-server push: a peer hands its output for an inference step straight to the
next peer of the client's chain, instead of sending it back for the client to forward.

Without push, a decode step through three spans costs three client round trips, each of
two one-way trips on the critical path:

    client -> A -> client -> B -> client -> C -> client          6 one-way trips

With push, the client sends the step to the first peer only; every peer, once it has
computed, sends its output on to the next peer and also answers its client as before:

    client -> A -> B -> C -> client                                4 one-way trips

so a token costs about one network hop per span instead of one round trip per span (on a
WAN link of 20 ms one-way, 3 spans: ~80 ms instead of ~120 ms of wire time per token; on
loopback, where a round trip is ~0.2 ms, it changes nothing measurable).

The protocol, all source-routed by the client:

- The answer to `InferenceOpen` says `supports_push`. A client that wants push sends each
  step to the first peer of a run of push-capable peers with `push_to`: the (endpoint,
  session id) of every later peer of that run, in order.
- A peer that ran a step with `push_to` sends `(session_id, step)` to `push_to[0]`, the
  step carrying its output as hidden states (in the session's response codec, exactly what
  the client would have forwarded) and `push_to[1:]` as its own targets: on the one
  PushStream it keeps open to that peer (peer/push_stream.py), or as a unary `Push` where
  that peer does not implement PushStream. It answers its client once the push is
  acknowledged, or after ANSWER_AFTER_PUSH_MAX_WAIT at most, so a slow or dead next peer
  barely delays this peer's own answer.
- The target peer puts the pushed step in the session's inbox; the session takes it as if
  its client had sent it on the session's stream: same decoding and checks, same position
  and rollback rules, same answer to the client, and it pushes on in turn. Pushes also keep
  a session from idling out (the next peers of a chain get nothing else).
- A step whose id the session has already run is dropped unanswered, so a push and a copy
  the client sent itself (after a failure) never run a step twice.
- When a push fails (the target is gone, refuses, or does not acknowledge within
  `PUSH_TIMEOUT`), the pushing peer tells its client with an extra answer carrying only
  `push_error`; the client then sends the step to the next peer itself, and stops asking
  this peer to push for the rest of the session. A target that died or hangs is found by
  the client as before: its stream breaks or its answer is late, and the client replaces it
  and replays its steps; the next steps push along the new chain.

Trust: a pushed step gets exactly the checks of a client's step, and reaches only the
session named by its id (a random 128-bit token the client chose, known to the client and
the peers of its chain). A peer pushes only where a client asked it to, one small message
per step to a peer's BlockService.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from dataclasses import dataclass

import grpc

from swarm.membership.grpc_auth import aio_channel
from swarm.membership.trust import Trust
from swarm.wire import swarm_pb2, swarm_pb2_grpc

from .push_stream import PushLink, serve_push_stream
from .requests import BadRequest

logger = logging.getLogger(__name__)

PUSH_CAPABILITY = "push"  # what Info lists in `capabilities`
# Seconds a push may take to be acknowledged. The ack only says the step is queued (no
# compute), so this bounds a hung or unreachable target, never a slow span.
PUSH_TIMEOUT = 5.0
# Pushed steps waiting in one session. The client sends a step only after the last one came
# back, so a well-behaved chain has at most one in flight; this bounds a misbehaving pusher.
MAX_QUEUED_PUSHES = 4
# Seconds a peer holds its own answer back while its push is acknowledged (~1 ms on loopback),
# so the two do not compete for the cores; past it the answer goes anyway.
ANSWER_AFTER_PUSH_MAX_WAIT = 0.05
MAX_TARGETS = 256  # hops after this one; more than any chain of distinct spans needs
MAX_ENDPOINT_CHARS = 300
MAX_SESSION_ID_CHARS = 256


@dataclass(frozen=True)
class Pushed:
    """Inbox item: a step the previous peer pushed into the session."""

    step: swarm_pb2.InferenceStep


@dataclass(frozen=True)
class PushFailed:
    """Inbox item: this peer's push of step `step_id` failed; the session tells its client."""

    step_id: int
    error: str


class SessionInbox:
    """What reaches a session besides its client's messages: pushed steps, and the outcome
    of its own failed pushes. Read by the session's loop only."""

    def __init__(self) -> None:
        self._items: collections.deque[Pushed | PushFailed] = collections.deque()
        self._reader: asyncio.Future | None = None  # the session's wait for the next item
        self.waiting_pushes = 0  # pushed steps put and not yet taken

    def put(self, item: Pushed | PushFailed) -> None:
        if isinstance(item, Pushed):
            self.waiting_pushes += 1
        reader, self._reader = self._reader, None
        if reader is not None and not reader.done():
            self._hand(reader, item)
        else:
            self._items.append(item)

    def next_item(self) -> asyncio.Future:
        """A future of the next item, for the session to wait on beside its client's stream (a
        plain future: a task around `get()` would cost an event-loop turn more per pushed step)."""
        future = asyncio.get_running_loop().create_future()
        if self._items:
            self._hand(future, self._items.popleft())
        else:
            self._reader = future
        return future

    async def get(self) -> Pushed | PushFailed:
        return await self.next_item()

    def _hand(self, future: asyncio.Future, item: Pushed | PushFailed) -> None:
        if isinstance(item, Pushed):
            self.waiting_pushes -= 1
        future.set_result(item)


class PushRejected(Exception):
    """A Push this peer refuses; carries the status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def check_targets(step: swarm_pb2.InferenceStep) -> None:
    """Refuses a step whose push targets are malformed, before anything runs."""
    if len(step.push_to) > MAX_TARGETS:
        raise BadRequest(f"push_to names {len(step.push_to)} peers; at most {MAX_TARGETS} are allowed")
    for i, target in enumerate(step.push_to):
        if not target.endpoint or len(target.endpoint) > MAX_ENDPOINT_CHARS or ":" not in target.endpoint:
            raise BadRequest(f"push_to[{i}].endpoint {target.endpoint[:MAX_ENDPOINT_CHARS]!r} must be host:port")
        if not target.session_id or len(target.session_id) > MAX_SESSION_ID_CHARS:
            raise BadRequest(f"push_to[{i}].session_id must be 1 to {MAX_SESSION_ID_CHARS} characters")


def is_stale(step: swarm_pb2.InferenceStep, last_step_id: int) -> bool:
    """True for a step the session has already run (delivered twice: pushed and resent)."""
    return step.step_id != 0 and step.step_id <= last_step_id


class PushRouter:
    """This peer's end of push: the inboxes of its open sessions (by session id) and the
    channels it pushes on. Lives on the server's event loop."""

    def __init__(self, timeout: float = PUSH_TIMEOUT, trust: Trust | None = None) -> None:
        self.timeout, self.trust = timeout, trust  # trust: a private swarm's, for the channels to next peers
        self._inboxes: dict[str, SessionInbox] = {}
        self._channels: dict[str, tuple[grpc.aio.Channel, swarm_pb2_grpc.BlockServiceStub]] = {}
        self._links: dict[str, PushLink] = {}  # the open PushStream to each next peer
        self._unary_only: set[str] = set()  # next peers without PushStream: they get a Push per step
        self._tasks: set[asyncio.Task] = set()
        self._closing: asyncio.Future | None = None  # resolved when this service closes: ends incoming streams
        self.sent = 0
        self.received = 0

    # --- receiving -------------------------------------------------------------------------

    def open_inbox(self, session_id: str) -> SessionInbox:
        """The inbox of a session that just opened. A session id opened again (a client that
        reconnected) takes the id over: pushes go to the newest session."""
        inbox = SessionInbox()
        self._inboxes[session_id] = inbox
        return inbox

    def close_inbox(self, session_id: str, inbox: SessionInbox) -> None:
        if self._inboxes.get(session_id) is inbox:
            del self._inboxes[session_id]

    def deliver(self, request: swarm_pb2.PushRequest) -> None:
        """Queues a pushed step for its session; raises PushRejected with what was wrong."""
        inbox = self._inboxes.get(request.session_id)
        if inbox is None:
            raise PushRejected(grpc.StatusCode.NOT_FOUND,
                               f"no open inference session {request.session_id[:MAX_SESSION_ID_CHARS]!r} on this "
                               "peer (closed, timed out, or never opened here): the client must open it first")
        if not request.HasField("step"):
            raise PushRejected(grpc.StatusCode.INVALID_ARGUMENT, "push has no step")
        if inbox.waiting_pushes >= MAX_QUEUED_PUSHES:
            raise PushRejected(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"session {request.session_id!r} already has {MAX_QUEUED_PUSHES} pushed steps waiting")
        inbox.put(Pushed(request.step))
        self.received += 1

    def answer(self, request: swarm_pb2.PushRequest) -> str:
        """`deliver` for a push on a PushStream: "" once queued, or the refusal as "CODE: reason"."""
        try:
            self.deliver(request)
        except PushRejected as e:
            logger.debug("push refused with %s: %s", e.code.name, e)
            return f"{e.code.name}: {e}"
        return ""

    async def serve_stream(self, context: grpc.aio.ServicerContext) -> None:
        """Runs one incoming PushStream until the pusher ends it or this service closes."""
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_future()
        await serve_push_stream(context, self.answer, self._closing)

    # --- sending ---------------------------------------------------------------------------

    def push_on(self, step: swarm_pb2.InferenceStep, output: swarm_pb2.Tensor,
                inbox: SessionInbox) -> asyncio.Task | None:
        """If `step` asks for it, sends `output` on to the next peer as that peer's input for
        the same step; returns the sending task (None: no push). A failure ends up in `inbox`
        as PushFailed."""
        if not step.push_to:
            return None
        target = step.push_to[0]
        request = swarm_pb2.PushRequest(session_id=target.session_id)
        onward = request.step
        onward.CopyFrom(step)  # the same step for the next span: masks, positions, beam reordering
        onward.hidden_states.CopyFrom(output)
        del onward.push_to[0]
        task = asyncio.ensure_future(self._send(target.endpoint, request, inbox))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _send(self, endpoint: str, request: swarm_pb2.PushRequest, inbox: SessionInbox) -> None:
        try:
            error = await self._push(endpoint, request)
        except asyncio.CancelledError:
            raise
        except asyncio.TimeoutError:
            error = f"DEADLINE_EXCEEDED: not acknowledged within {self.timeout:g} s"
        except grpc.aio.AioRpcError as e:
            error = f"{e.code().name}: {e.details()}"
        except Exception as e:  # a bad endpoint string, a broken stream: the client relays instead
            error = f"{type(e).__name__}: {e}"
        if error:
            self._failed(endpoint, request, inbox, error)
        else:
            self.sent += 1

    async def _push(self, endpoint: str, request: swarm_pb2.PushRequest) -> str:
        """Sends one push: "" once the next peer queued it, or its refusal ("CODE: reason")."""
        if endpoint not in self._unary_only:
            link = self._link(endpoint)
            try:
                return await link.push(request, self.timeout)
            except asyncio.TimeoutError:
                await self._drop_link(endpoint, link)  # hung: the next push opens a new stream
                raise
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                logger.info("%s has no PushStream (an older peer); pushing there with one Push per step", endpoint)
                self._unary_only.add(endpoint)
                await self._drop_link(endpoint, link)
        try:
            await self._stub(endpoint).Push(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as e:
            return f"{e.code().name}: {e.details()}"
        return ""

    def _link(self, endpoint: str) -> PushLink:
        link = self._links.get(endpoint)
        if link is None or link.broken is not None:
            link = self._links[endpoint] = PushLink(self._stub(endpoint))
        return link

    async def _drop_link(self, endpoint: str, link: PushLink | None = None) -> None:
        """Closes the stream to `endpoint` (only if it is still `link`, when given)."""
        if link is None or self._links.get(endpoint) is link:
            link = self._links.pop(endpoint, None)
        if link is not None:
            await link.close()

    def _failed(self, endpoint: str, request: swarm_pb2.PushRequest, inbox: SessionInbox, reason: str) -> None:
        error = f"push of step {request.step.step_id} to {endpoint} failed: {reason}"
        logger.warning("%s", error)
        inbox.put(PushFailed(request.step.step_id, error))

    def _stub(self, endpoint: str) -> swarm_pb2_grpc.BlockServiceStub:
        """One channel per next peer, reused by every session that pushes there. (gRPC sets
        no limit on what it sends; the target enforces its own message size limit.)"""
        if endpoint not in self._channels:
            channel = aio_channel(endpoint, self.trust)
            self._channels[endpoint] = channel, swarm_pb2_grpc.BlockServiceStub(channel)
        return self._channels[endpoint][1]

    async def close(self) -> None:
        """Stops pushes in flight, ends the push streams both ways and closes the channels (the
        peer is shutting down, or moving to other blocks)."""
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_future()
        if not self._closing.done():
            self._closing.set_result(None)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for endpoint in list(self._links):
            await self._drop_link(endpoint)
        for channel, _ in self._channels.values():
            await channel.close()
        self._channels.clear()
