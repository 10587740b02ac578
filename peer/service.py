"""The gRPC servicer: BlockService's handlers on one span of blocks.

Each RPC runs in three steps, in this order:

1. decode and check the request (`RequestDecoder`, peer/requests.py), with no compute and no
   allocation beyond the request's own tensors;
2. run the span on the compute runtime (inference steps before Forward/Backward), which
   also encodes the answer (peer/compute.py) with the codec the client asked for, in the
   dtype it sent;
3. answer, or end the call with the status its error deserves (peer/status.py).

Inference streams are run by `InferenceSessions` (peer/sessions.py); `Push` and `PushStream`
take the steps a previous peer pushes to one of them (peer/push.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc
import torch

import swarm
from swarm.blocks import BlockSpan
from swarm.dtypes import dtype_name
from swarm.membership.trust import Trust
from swarm.wire import swarm_pb2, swarm_pb2_grpc

from .compute import SpanCompute
from .config import PeerLimits
from .kept_graphs import DEFAULT_BACKWARD_MEMORY, KeptGraphs
from .lying import Liar
from .memory import CacheBudget
from .push import PUSH_CAPABILITY, PushRejected, PushRouter
from .requests import RequestDecoder, SpanCall, decode, tensor_bytes
from .runtime import ComputeRuntime, Priority
from .sessions import InferenceSessions
from .status import end_call, refuse

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class ServedModel:
    """What this peer serves, as Info and the DHT records describe it."""

    model_id: str
    model_name: str
    num_blocks: int
    throughput: float  # tokens/s measured at start-up
    quant: str = "none"


class BlockService(swarm_pb2_grpc.BlockServiceServicer):
    def __init__(self, span: BlockSpan, served: ServedModel, runtime: ComputeRuntime, budget: CacheBudget,
                 limits: PeerLimits, session_timeout: float, kept: KeptGraphs | None = None,
                 liar: Liar | None = None, trust: Trust | None = None) -> None:
        self.span, self.served, self.runtime, self.budget = span, served, runtime, budget
        self.kept = KeptGraphs(DEFAULT_BACKWARD_MEMORY) if kept is None else kept
        self.limits, self.session_timeout = limits, session_timeout
        self.decoder = RequestDecoder(span, served.model_id, limits)
        self.compute = SpanCompute(span, self.kept, runtime.make_way, liar)
        self.pushes = PushRouter(trust=trust)
        self.sessions = InferenceSessions(span, self.decoder, self.compute, runtime, budget, self.pushes,
                                          session_timeout)

    # --- stateless ---------------------------------------------------------------------------

    async def Forward(self, request: swarm_pb2.ForwardRequest, context: grpc.aio.ServicerContext):
        try:
            call = await decode(tensor_bytes(request.inputs), self.decoder.span_call, request.inputs,
                                request.backward_id)
            hidden = await self.runtime.run(Priority.TRAINING, self.compute.forward, call)
            return swarm_pb2.ForwardResponse(hidden_states=hidden)
        except Exception as e:
            await refuse(context, e, "Forward")

    async def Backward(self, request: swarm_pb2.BackwardRequest, context: grpc.aio.ServicerContext):
        try:
            call, grad_outputs = await decode(tensor_bytes(request.inputs), self._decode_backward, request)
            graph = self.kept.take(call.backward_id) if call.backward_id else None
            return await self.runtime.run(Priority.TRAINING, self.compute.backward, call, grad_outputs,
                                          request.inputs.adapters, graph)
        except Exception as e:
            await refuse(context, e, "Backward")

    def _decode_backward(self, request: swarm_pb2.BackwardRequest) -> tuple[SpanCall, torch.Tensor]:
        call = self.decoder.span_call(request.inputs, request.backward_id)
        return call, self.decoder.grad_outputs(request, call)

    async def Info(self, request: swarm_pb2.InfoRequest, context: grpc.aio.ServicerContext) -> swarm_pb2.PeerInfo:
        span, served, budget, limits, compute = self.span, self.served, self.budget, self.limits, self.compute
        return swarm_pb2.PeerInfo(
            model_id=served.model_id, model_name=served.model_name, start=span.start, end=span.end,
            num_blocks=served.num_blocks, dtype=dtype_name(span.dtype), quant=served.quant,
            version=swarm.__version__, throughput=served.throughput,
            cache_tokens_total=budget.total_tokens, cache_tokens_free=budget.free_tokens,
            active_sessions=budget.active_sessions, max_batch_size=limits.max_batch_size,
            max_seq_length=limits.max_seq_length, max_message_bytes=limits.max_message_bytes,
            sessions=self.sessions.statuses(),
            capabilities=[PUSH_CAPABILITY], pushes_sent=self.pushes.sent, pushes_received=self.pushes.received,
            backwards_kept=compute.backwards_kept, backwards_recomputed=compute.backwards_recomputed,
            kept_graph_bytes=self.kept.nbytes, step_batches=dict(compute.step_batches),
            training_pieces=compute.training_pieces,
        )

    # --- inference sessions (peer/sessions.py) -----------------------------------------------

    async def Inference(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        await self.sessions.serve(context)

    async def close_sessions(self, message: str = "peer is shutting down", timeout: float = 2.0) -> None:
        """Ends every open session with UNAVAILABLE and `message`: at once if it waits for the
        client, after its current step otherwise. Waits up to `timeout` s for them to end."""
        await self.sessions.close_all(message, timeout)
        await self.pushes.close()  # no session is left to push for

    @property
    def open_sessions(self) -> int:
        return len(self.sessions)

    # --- server-to-server push (peer/push.py) ----------------------------------------------

    async def Push(self, request: swarm_pb2.PushRequest, context: grpc.aio.ServicerContext) -> swarm_pb2.PushResponse:
        """A step pushed by the previous peer of a chain: queued for its session, which runs it
        like a step from its own client. Answered as soon as it is queued."""
        try:
            self.pushes.deliver(request)
        except PushRejected as e:
            logger.debug("Push refused with %s: %s", e.code.name, e)
            end_call(context, e.code, str(e))  # not abort(): see end_call
            return None
        return swarm_pb2.PushResponse()

    async def PushStream(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        """Pushes from one previous peer, for all its sessions here, on one stream: each queued
        like a Push and answered in order (peer/push_stream.py)."""
        try:
            await self.pushes.serve_stream(context)
        except Exception as e:
            await refuse(context, e, "PushStream")
