"""The gRPC servicer: BlockService on one span of blocks.

Each RPC runs in three steps, in this order:

1. decode and check the request (`RequestDecoder`), with no compute and no allocation
   beyond the request's own tensors;
2. run the span on the compute runtime (inference steps before Forward/Backward);
3. encode the answer with the codec the client asked for, in the dtype it sent.

Any error becomes a status code with a message that says what was wrong (table `_STATUS`);
an unexpected one is logged and answered INTERNAL. Either way only that request fails and
the peer goes on serving everyone else.

An inference session is one bidirectional stream. It ends when the client closes it, on
an error, when it stays idle longer than the session timeout, or when the peer shuts
down; its cache tokens are released in every case.

A session also takes steps pushed by the previous peer of its client's chain, and pushes
its own output on when a step asks for it (server-to-server push, see peer/push.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc
import torch

import swarm
from swarm.blocks import BlockSpan, InferenceState, SpanGraph, SpanInputError
from swarm.tuning import AdapterError
from swarm.wire import DTYPES, WireError, serialize_tensor, swarm_pb2, swarm_pb2_grpc

from .config import PeerLimits
from .kept_graphs import DEFAULT_BACKWARD_MEMORY, KeptGraphs
from .memory import CacheBudget, CacheBudgetExceeded, CacheReservation
from .push import (
    ANSWER_AFTER_PUSH_MAX_WAIT,
    PUSH_CAPABILITY,
    PushFailed,
    Pushed,
    PushRejected,
    PushRouter,
    SessionInbox,
    check_targets,
    is_stale,
)
from .requests import (
    BadRequest,
    NotServed,
    RequestDecoder,
    SessionOpen,
    SessionStep,
    SpanCall,
)
from .runtime import ComputeRuntime, Priority

logger = logging.getLogger(__name__)

Code = grpc.StatusCode
_STATUS: tuple[tuple[type[Exception] | tuple[type[Exception], ...], grpc.StatusCode], ...] = (
    ((BadRequest, WireError, SpanInputError, AdapterError), Code.INVALID_ARGUMENT),
    (NotServed, Code.FAILED_PRECONDITION),
    (CacheBudgetExceeded, Code.RESOURCE_EXHAUSTED),
)
# Requests bigger than this are decoded off the event loop, so that copying and checking a
# large training batch (up to --max-message-mb) does not delay other sessions' tokens.
_DECODE_INLINE_BYTES = 1 << 20
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class ServedModel:
    """What this peer serves, as Info and the DHT records describe it."""

    model_id: str
    model_name: str
    num_blocks: int
    throughput: float  # tokens/s measured at start-up
    quant: str = "none"


class SessionClosed(Exception):
    """The peer ends a session itself (idle too long, shutting down); carries the status to send."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(eq=False)
class _Session:
    # Resolved with a SessionClosed when the peer ends the session from outside (shutdown).
    closed: asyncio.Future
    reservation: CacheReservation | None = None
    reading: asyncio.Task | None = None  # the pending context.read()
    response_codec: str = "raw"
    steps: int = 0
    opened: SessionOpen | None = None
    state: InferenceState | None = None
    tokens_received: int = 0
    inbox: SessionInbox | None = None  # pushed steps and failed pushes, once the session is open
    taking: asyncio.Task | None = None  # the pending inbox.get()
    last_step_id: int = 0  # the newest step run: older ids are duplicates (pushed and resent)
    steps_pushed_in: int = 0
    # Seconds the last step spent in each stage on the compute thread (for the debug log).
    compute_s: float = 0.0
    encode_s: float = 0.0


class BlockService(swarm_pb2_grpc.BlockServiceServicer):
    def __init__(self, span: BlockSpan, served: ServedModel, runtime: ComputeRuntime, budget: CacheBudget,
                 limits: PeerLimits, session_timeout: float, kept: KeptGraphs | None = None) -> None:
        self.span, self.served, self.runtime, self.budget = span, served, runtime, budget
        self.kept = KeptGraphs(DEFAULT_BACKWARD_MEMORY) if kept is None else kept
        self.backwards_kept = self.backwards_recomputed = 0  # how Backward calls were answered
        self.limits, self.session_timeout = limits, session_timeout
        self.decoder = RequestDecoder(span, served.model_id, limits)
        self._sessions: set[_Session] = set()
        self.pushes = PushRouter()
        self._idle_message = (f"inference session idle for more than {session_timeout:g} s; closed to free its "
                              "cache (open a new session to go on)")

    # --- stateless ---------------------------------------------------------------------------

    async def Forward(self, request: swarm_pb2.ForwardRequest, context: grpc.aio.ServicerContext):
        try:
            call = await self._decode(_nbytes(request.inputs), self.decoder.span_call, request.inputs)
            hidden = await self.runtime.run(Priority.TRAINING, self._forward, call, request.backward_id)
            return swarm_pb2.ForwardResponse(hidden_states=hidden)
        except Exception as e:
            await _refuse(context, e, "Forward")

    async def Backward(self, request: swarm_pb2.BackwardRequest, context: grpc.aio.ServicerContext):
        try:
            call, grad_outputs = await self._decode(_nbytes(request.inputs), self._decode_backward, request)
            graph = self.kept.take(request.backward_id) if request.backward_id else None
            return await self.runtime.run(Priority.TRAINING, self._backward, call, grad_outputs,
                                          request.inputs.adapters, graph)
        except Exception as e:
            await _refuse(context, e, "Backward")

    async def Info(self, request: swarm_pb2.InfoRequest, context: grpc.aio.ServicerContext) -> swarm_pb2.PeerInfo:
        span, served, budget, limits = self.span, self.served, self.budget, self.limits
        return swarm_pb2.PeerInfo(
            model_id=served.model_id, model_name=served.model_name, start=span.start, end=span.end,
            num_blocks=served.num_blocks, dtype=_DTYPE_NAMES[span.dtype], quant=served.quant,
            version=swarm.__version__, throughput=served.throughput,
            cache_tokens_total=budget.total_tokens, cache_tokens_free=budget.free_tokens,
            active_sessions=budget.active_sessions, max_batch_size=limits.max_batch_size,
            max_seq_length=limits.max_seq_length, max_message_bytes=limits.max_message_bytes,
            sessions=[
                swarm_pb2.SessionStatus(session_id=s.opened.session_id, position=s.state.position,
                                        tokens_received=s.tokens_received, max_length=s.opened.max_length,
                                        batch_size=s.opened.batch_size, steps_pushed_in=s.steps_pushed_in)
                for s in self._sessions if s.state is not None
            ],
            capabilities=[PUSH_CAPABILITY], pushes_sent=self.pushes.sent, pushes_received=self.pushes.received,
            backwards_kept=self.backwards_kept, backwards_recomputed=self.backwards_recomputed,
            kept_graph_bytes=self.kept.nbytes,
        )

    # --- inference sessions ------------------------------------------------------------------

    async def Inference(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        # Reads and writes go through `context` (not a response generator). The session is
        # never ended by cancelling a pending gRPC operation (grpc then fails to send the
        # status): `_read` waits for the next message *or* the session being closed.
        session = _Session(asyncio.get_running_loop().create_future())
        self._sessions.add(session)
        try:
            await self._run_session(session, context)
        except SessionClosed as e:
            _end(context, e.code, str(e))
        except Exception as e:
            await _refuse(context, e, "Inference")
        finally:
            self._sessions.discard(session)
            if session.reading is not None:  # ends with the call; nobody wants its result
                session.reading.add_done_callback(_discard_result)
            self._close_inbox(session)
            if session.reservation is not None:
                self.budget.release(session.reservation)
                logger.debug("session %s closed after %d steps; %d cache tokens free", session.reservation.session_id,
                             session.steps, self.budget.free_tokens)

    async def _run_session(self, session: _Session, context: grpc.aio.ServicerContext) -> None:
        first = await self._read(session, context)
        if first is None:
            return
        if first.WhichOneof("kind") != "open":
            raise BadRequest(f"the first message of an inference stream must be 'open', got "
                             f"{first.WhichOneof('kind') or 'an empty message'!r}")
        opened = await self._decode(_nbytes(first.open), self.decoder.session_open, first.open)
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
            step = await self._decode(len(request.step.hidden_states.data), self.decoder.session_step,
                                      request.step, opened, state.position)
            decoded = time.perf_counter()
            hidden = await self.runtime.run(Priority.INFERENCE, self._inference_step, state, step, session,
                                            light=step.hidden_states.shape[1] == 1)
            computed = time.perf_counter()
            session.steps += 1
            session.tokens_received += step.hidden_states.shape[1]
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

    async def _read(self, session: _Session,
                    context: grpc.aio.ServicerContext) -> swarm_pb2.InferenceRequest | Pushed | PushFailed | None:
        """The next message from the client or the session's inbox, or None at the end of the
        stream. Raises SessionClosed when neither has anything for longer than the session
        timeout, or when the peer closes the session."""
        if session.reading is None:
            session.reading = asyncio.ensure_future(context.read())
        if session.taking is None and session.inbox is not None:
            session.taking = asyncio.ensure_future(session.inbox.get())
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

    async def close_sessions(self, message: str = "peer is shutting down", timeout: float = 2.0) -> None:
        """Ends every open session with UNAVAILABLE and `message`: at once if it waits for the
        client, after its current step otherwise. Waits up to `timeout` s for them to end."""
        for session in self._sessions:
            if not session.closed.done():
                session.closed.set_result(SessionClosed(Code.UNAVAILABLE, message))
        deadline = time.monotonic() + timeout
        while self._sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await self.pushes.close()  # no session is left to push for

    @property
    def open_sessions(self) -> int:
        return len(self._sessions)

    # --- server-to-server push (peer/push.py) ----------------------------------------------

    async def Push(self, request: swarm_pb2.PushRequest, context: grpc.aio.ServicerContext) -> swarm_pb2.PushResponse:
        """A step pushed by the previous peer of a chain: queued for its session, which runs it
        like a step from its own client. Answered as soon as it is queued."""
        try:
            self.pushes.deliver(request)
        except PushRejected as e:
            logger.debug("Push refused with %s: %s", e.code.name, e)
            _end(context, e.code, str(e))  # not abort(): see _end
            return None
        return swarm_pb2.PushResponse()

    async def _next_request(self, session: _Session,
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

    def _close_inbox(self, session: _Session) -> None:
        if session.taking is not None:
            session.taking.cancel()  # our own wait on the inbox; nothing is lost
        if session.inbox is not None:
            self.pushes.close_inbox(session.opened.session_id, session.inbox)

    # --- decoding and compute ----------------------------------------------------------------

    async def _decode(self, nbytes: int, decode, *args):
        if nbytes <= _DECODE_INLINE_BYTES:
            return decode(*args)
        return await asyncio.to_thread(decode, *args)

    def _decode_backward(self, request: swarm_pb2.BackwardRequest) -> tuple[SpanCall, torch.Tensor]:
        call = self.decoder.span_call(request.inputs)
        return call, self.decoder.grad_outputs(request, call)

    # The methods below run on the compute thread; they encode their answer there too, which
    # keeps a large answer's copy off the event loop.

    def _forward(self, call: SpanCall, backward_id: str) -> swarm_pb2.Tensor:
        inputs = (call.hidden_states, call.attention_mask, call.position_ids, call.deep_prompts, call.adapters)
        if backward_id and self.kept.max_bytes:
            hidden, graph = self.span.forward_with_graph(*inputs)
            self.kept.put(backward_id, graph)
        else:
            with torch.no_grad():
                hidden = self.span.forward(*inputs)
        return serialize_tensor(hidden.to(call.client_dtype), call.response_codec)

    def _backward(self, call: SpanCall, grad_outputs: torch.Tensor, adapter_msgs,
                  graph: SpanGraph | None) -> swarm_pb2.BackwardResponse:
        if graph is not None and graph.matches(call.hidden_states, call.deep_prompts, call.adapters):
            grads = graph.backward(grad_outputs)
            self.backwards_kept += 1
        else:
            self.backwards_recomputed += 1
            grads = self.span.backward(call.hidden_states, grad_outputs, call.attention_mask, call.position_ids,
                                       call.deep_prompts, call.adapters)
        codec = call.response_codec
        response = swarm_pb2.BackwardResponse(
            grad_hidden_states=serialize_tensor(grads.hidden_states.to(call.client_dtype), codec))
        if grads.deep_prompts is not None:
            response.grad_deep_prompts.CopyFrom(serialize_tensor(grads.deep_prompts, codec))
        for msg, tensors in zip(adapter_msgs, grads.adapters):
            response.grad_adapters.add(method=msg.method, config_json=msg.config_json,
                                       tensors={name: serialize_tensor(t, codec) for name, t in tensors.items()})
        return response

    def _inference_step(self, state: InferenceState, step: SessionStep, session: _Session) -> swarm_pb2.Tensor:
        started = time.perf_counter()
        hidden = self.span.inference_step(state, step.hidden_states, step.attention_mask, step.position_ids,
                                          step.hypo_ids, step.position)
        computed = time.perf_counter()
        encoded = serialize_tensor(hidden.to(step.client_dtype), session.response_codec)
        session.compute_s, session.encode_s = computed - started, time.perf_counter() - computed
        return encoded


def _discard_result(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log it as never retrieved


def _nbytes(msg) -> int:
    """Bytes of the tensors in a SpanInputs or InferenceOpen message (what decoding copies)."""
    fields = msg.DESCRIPTOR.fields_by_name
    total = sum(len(getattr(msg, name).data) for name in ("hidden_states", "deep_prompts")
                if name in fields and msg.HasField(name))
    return total + sum(len(t.data) for adapters in msg.adapters for t in adapters.tensors.values())


def status_of(error: BaseException) -> grpc.StatusCode | None:
    """The status a request error is answered with; None for an unexpected error (a bug)."""
    for kinds, code in _STATUS:
        if isinstance(error, kinds):
            return code
    return None


async def _refuse(context: grpc.aio.ServicerContext, error: Exception, rpc: str) -> None:
    """Sets the status `error` deserves; the handler returns right after (see `_end`)."""
    if isinstance(error, grpc.aio.AbortError):  # already aborted (e.g. by a nested abort)
        raise error
    code = status_of(error)
    if code is None:
        logger.exception("%s failed unexpectedly", rpc, exc_info=error)
        _end(context, Code.INTERNAL, f"peer failed: {type(error).__name__}: {error}")
        return
    logger.debug("%s refused with %s: %s", rpc, code.name, error)
    _end(context, code, str(error))


def _end(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    """Sets the status the RPC ends with when its handler returns. Not `context.abort()`: grpc
    keeps the AbortError, whose traceback holds the handler's frames (the request; a session
    and its KV cache) in a reference cycle that only a full garbage collection frees.
    Measured: 33 sessions ended by the idle timeout kept ~35 MB (caches and messages) alive
    that way (tests/integration/test_abandoned_sessions.py)."""
    context.set_code(code)
    context.set_details(message)
