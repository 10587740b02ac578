"""The client's view of the swarm: the DHT, the model's records, routing, and stateless
Forward/Backward through a chain of peers with autograd."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

import grpc
import hivemind
import torch

from swarm.registry import PeerRecord, fetch_span_records
from swarm.wire import deserialize_tensor, serialize_tensor, swarm_pb2

from .routing import Hop, MissingBlocksError, RouteFinder
from .transport import CLIENT_ERRORS, PeerCallError, PeerConnection
from .tuning import TuningPayload

logger = logging.getLogger(__name__)


@dataclass
class SwarmSettings:
    """How the client talks to peers."""

    codec: str = "raw"  # activations on the wire: raw | float16 | bfloat16 | int8 | int8_blockwise
    request_timeout: float = 60.0  # a peer silent this long (per request or inference step) counts as failed
    wait_for_peers: float = 5.0  # how long a missing block may take to appear before we give up
    records_ttl: float = 2.0  # reuse DHT records this long before fetching again
    max_failures: int = 3  # peer failures one step survives (each moves to other peers)
    allow_quantized: bool = True  # False: never route through peers serving quantized weights (--quant)
    push: bool = True  # inference steps go peer to peer where peers support it (False: via the client)


class RemoteSwarm:
    """The peers serving one model, as found in the DHT."""

    def __init__(self, initial_peers: list[str], model_id: str, num_blocks: int,
                 settings: SwarmSettings | None = None, dht: hivemind.DHT | None = None):
        if not initial_peers and dht is None:
            raise ValueError("initial_peers is empty: pass the multiaddr printed by `swarm dht`")
        self.model_id, self.num_blocks = model_id, num_blocks
        self.settings = settings or SwarmSettings()
        self.dht = dht or hivemind.DHT(initial_peers=list(initial_peers), client_mode=True, start=True)
        self.routes = RouteFinder(model_id, num_blocks, allow_quantized=self.settings.allow_quantized)
        self._records: dict[int, list[PeerRecord]] | None = None
        self._records_time = 0.0

    def records(self, refresh: bool = False) -> dict[int, list[PeerRecord]]:
        if refresh or self._records is None or time.monotonic() - self._records_time > self.settings.records_ttl:
            self._records = fetch_span_records(self.dht, self.model_id, self.num_blocks)
            self._records_time = time.monotonic()
        return self._records

    def find_chain(self, start: int = 0, end: int | None = None, randomize: bool = False) -> list[Hop]:
        """A chain covering [start, end); waits up to `wait_for_peers` for missing blocks
        (peers that just started may not be in the DHT yet), then names them."""
        deadline = time.monotonic() + self.settings.wait_for_peers
        refresh = False
        while True:
            try:
                records = self.records(refresh=refresh)
                self.measure_rtts(records, start, self.num_blocks if end is None else end)
                return self.routes.find_chain(records, start, end, randomize)
            except MissingBlocksError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
                refresh = True

    def measure_rtts(self, records: dict[int, list[PeerRecord]], start: int, end: int) -> None:
        """Pings the peers that could serve part of [start, end) and have no fresh round-trip
        time, in parallel; a peer that does not answer is avoided like a failed one."""
        peers = [p for p in self.routes.candidates(records) if start <= p.start and p.end <= end]
        unreachable = set(self.routes.rtt.measure([p.endpoint for p in peers], ping))
        for peer in peers:
            if peer.endpoint in unreachable:
                self.routes.ban(peer.peer_id)

    def ban_endpoint(self, endpoint: str) -> None:
        """Avoid the peer at `endpoint` for a while (it failed)."""
        for records in self.records().values():
            for record in records:
                if record.endpoint == endpoint:
                    self.routes.ban(record.peer_id)

    def retry_after(self, error: PeerCallError, failures: int) -> bool:
        """After the `failures`-th failure of one request: False to give up (too many, or the
        request itself is wrong); True once the failed peer is avoided, to try other peers."""
        if failures > self.settings.max_failures or error.code in CLIENT_ERRORS:
            return False
        self.ban_endpoint(error.endpoint)
        logger.warning("%s; retrying on other peers", error)
        return True

    def shutdown(self) -> None:
        self.dht.shutdown()


def ping(endpoint: str, timeout: float) -> float:
    """Seconds for an Info call to the peer at `endpoint`; raises PeerCallError if the peer
    cannot be reached. One that answers no faster than `timeout` counts as that slow: busy
    is not dead, and it may be the only peer of its blocks. A first call opens the connection
    (reused by every later call), so the second measures a round trip without handshakes."""
    connection = PeerConnection.to(endpoint)
    try:
        connection.info(timeout)
        started = time.perf_counter()
        connection.info(timeout)
    except PeerCallError as e:
        if e.code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return timeout
        raise
    return time.perf_counter() - started


def _span_inputs(hop: Hop, model_id: str, hidden: swarm_pb2.Tensor, attention_mask: torch.Tensor | None,
                 position_ids: torch.Tensor | None, tuning: TuningPayload, codec: str) -> swarm_pb2.SpanInputs:
    inputs = swarm_pb2.SpanInputs(model_id=model_id, start=hop.start, end=hop.end, response_codec=codec)
    inputs.hidden_states.CopyFrom(hidden)
    if attention_mask is not None:
        inputs.attention_mask.CopyFrom(serialize_tensor(attention_mask.long()))
    if position_ids is not None:
        inputs.position_ids.CopyFrom(serialize_tensor(position_ids.long()))
    deep_prompts, adapters = tuning.span_messages(hop.start, hop.end)
    if deep_prompts is not None:
        inputs.deep_prompts.CopyFrom(deep_prompts)
    inputs.adapters.extend(adapters)
    return inputs


@dataclass
class _Call:
    """What every hop of one Forward/Backward pass shares."""

    swarm: RemoteSwarm
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    tuning: TuningPayload
    backward_follows: bool = False  # ask each peer to keep its forward graph for our Backward

    def forward_request(self, inputs: swarm_pb2.SpanInputs) -> swarm_pb2.ForwardRequest:
        # A fresh random id per hop and pass: a Backward names it to use the peer's kept graph.
        return swarm_pb2.ForwardRequest(inputs=inputs, backward_id=uuid.uuid4().hex if self.backward_follows else "")

    def inputs(self, hop: Hop, hidden: swarm_pb2.Tensor) -> swarm_pb2.SpanInputs:
        return _span_inputs(hop, self.swarm.model_id, hidden, self.attention_mask, self.position_ids, self.tuning,
                            self.swarm.settings.codec)

    def give_up(self, error: PeerCallError, failures: int) -> bool:
        return not self.swarm.retry_after(error, failures)


def _forward_range(call: _Call, start: int, end: int, hidden: swarm_pb2.Tensor, chain: list[Hop] | None = None,
                   failures: int = 0) -> tuple[swarm_pb2.Tensor, list[tuple[str, swarm_pb2.ForwardRequest]]]:
    """Blocks [start, end) on a chain of peers; a failed hop is redone on other peers.
    Returns the output and the requests that succeeded with their peers (what Backward
    will send again, naming the graph each peer kept)."""
    chain = call.swarm.find_chain(start, end, randomize=True) if chain is None else chain
    sent = []
    for hop in chain:
        request = call.forward_request(call.inputs(hop, hidden))
        try:
            hidden = PeerConnection.to(hop.endpoint).forward(request, call.swarm.settings.request_timeout).hidden_states
        except PeerCallError as e:
            if call.give_up(e, failures + 1):
                raise
            hidden, redone = _forward_range(call, hop.start, hop.end, request.inputs.hidden_states,
                                            failures=failures + 1)
            sent += redone
            continue
        sent.append((hop.endpoint, request))
    return hidden, sent


class _GradSink:
    """Collects the tuning tensors' gradients that each hop returns."""

    def __init__(self, tuning: TuningPayload):
        self.tuning = tuning
        self.deep = torch.zeros_like(tuning.deep_prompts) if tuning.deep_prompts is not None else None
        self.adapters = [{name: None for name in named} for _, named in tuning.adapters]

    def add(self, inputs: swarm_pb2.SpanInputs, response: swarm_pb2.BackwardResponse) -> None:
        if self.deep is not None:
            self.deep[inputs.start:inputs.end] = deserialize_tensor(response.grad_deep_prompts).to(self.deep.dtype)
        for grads, msg in zip(self.adapters, response.grad_adapters):
            for name, tensor in msg.tensors.items():
                grads[name] = deserialize_tensor(tensor)

    def flat(self) -> list[torch.Tensor]:
        flat = [self.deep] if self.deep is not None else []
        for (_, named), grads in zip(self.tuning.adapters, self.adapters):
            flat += [grads[n].to(named[n].dtype) if grads[n] is not None else torch.zeros_like(named[n]) for n in named]
        return flat


def _backward_requests(call: _Call, sent: list[tuple[str, swarm_pb2.ForwardRequest]], grad: swarm_pb2.Tensor,
                       sink: _GradSink, failures: int = 0) -> swarm_pb2.Tensor:
    """Backward through the hops that served `sent`, in reverse. A failed hop's blocks are
    recomputed on other peers (forward to rebuild their inputs, then backward)."""
    for endpoint, forward in reversed(sent):
        inputs = forward.inputs
        try:
            response = PeerConnection.to(endpoint).backward(
                swarm_pb2.BackwardRequest(inputs=inputs, grad_outputs=grad, backward_id=forward.backward_id),
                call.swarm.settings.request_timeout)
        except PeerCallError as e:
            if call.give_up(e, failures + 1):
                raise
            _, redone = _forward_range(call, inputs.start, inputs.end, inputs.hidden_states, failures=failures + 1)
            grad = _backward_requests(call, redone, grad, sink, failures + 1)
            continue
        sink.add(inputs, response)
        grad = response.grad_hidden_states
    return grad


class _ChainCall(torch.autograd.Function):
    """Forward through a chain of peers; backward through the same hops in reverse.

    Activations go from one peer's answer straight into the next peer's request without
    being decoded on the client; only the chain's output is decoded. The client's tuning
    tensors are inputs too, so their gradients (summed over hops) reach the parameters.
    """

    @staticmethod
    def forward(ctx, call: _Call, start: int, end: int, hidden, *tuning_tensors):
        output, sent = _forward_range(call, start, end, serialize_tensor(hidden.detach(), call.swarm.settings.codec))
        ctx.call, ctx.sent, ctx.dtype = call, sent, hidden.dtype
        return deserialize_tensor(output).to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        call = ctx.call
        sink = _GradSink(call.tuning)
        grad = _backward_requests(call, ctx.sent, serialize_tensor(grad_output.contiguous(), call.swarm.settings.codec),
                                  sink)
        return (None, None, None, deserialize_tensor(grad).to(ctx.dtype), *sink.flat())


def remote_forward(swarm: RemoteSwarm, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   position_ids: torch.Tensor | None = None, tuning: TuningPayload | None = None,
                   start: int = 0, end: int | None = None) -> torch.Tensor:
    """Hidden states through blocks [start, end) (default: all), differentiable w.r.t.
    `hidden` and the tuning tensors."""
    tuning = tuning or TuningPayload()
    end = swarm.num_blocks if end is None else end
    flat = tuning.flat()
    backward_follows = torch.is_grad_enabled() and (hidden.requires_grad or any(t.requires_grad for t in flat))
    call = _Call(swarm, attention_mask, position_ids, tuning, backward_follows)
    return _ChainCall.apply(call, start, end, hidden, *flat)
