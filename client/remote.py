"""The client's view of the swarm: the DHT, the model's records, routing, and stateless
Forward/Backward through a chain of peers with autograd."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import hivemind
import torch

from swarm.registry import PeerRecord, fetch_span_records
from swarm.wire import deserialize_tensor, serialize_tensor, swarm_pb2

from .routing import Hop, MissingBlocksError, RouteFinder
from .transport import PeerConnection
from .tuning import TuningPayload

logger = logging.getLogger(__name__)


@dataclass
class SwarmSettings:
    """How the client talks to peers."""

    codec: str = "raw"  # activations on the wire: raw | float16 | bfloat16 | int8_blockwise
    request_timeout: float = 60.0
    wait_for_peers: float = 5.0  # how long a missing block may take to appear before we give up
    records_ttl: float = 2.0  # reuse DHT records this long before fetching again


class RemoteSwarm:
    """The peers serving one model, as found in the DHT."""

    def __init__(self, initial_peers: list[str], model_id: str, num_blocks: int,
                 settings: SwarmSettings | None = None, dht: hivemind.DHT | None = None):
        if not initial_peers and dht is None:
            raise ValueError("initial_peers is empty: pass the multiaddr printed by `swarm dht`")
        self.model_id, self.num_blocks = model_id, num_blocks
        self.settings = settings or SwarmSettings()
        self.dht = dht or hivemind.DHT(initial_peers=list(initial_peers), client_mode=True, start=True)
        self.routes = RouteFinder(model_id, num_blocks)
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
                return self.routes.find_chain(self.records(refresh=refresh), start, end, randomize)
            except MissingBlocksError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
                refresh = True

    def shutdown(self) -> None:
        self.dht.shutdown()


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


class _ChainCall(torch.autograd.Function):
    """Forward through every hop of a chain; backward through the same hops in reverse.

    Activations go from one peer's answer straight into the next peer's request without
    being decoded on the client; only the chain's output is decoded. The client's tuning
    tensors are inputs too, so their gradients (summed over hops) reach the parameters.
    """

    @staticmethod
    def forward(ctx, swarm: RemoteSwarm, chain: list[Hop], attention_mask, position_ids, tuning: TuningPayload,
                hidden, *tuning_tensors):
        codec, timeout = swarm.settings.codec, swarm.settings.request_timeout
        message = serialize_tensor(hidden.detach(), codec)
        sent = []
        for hop in chain:
            inputs = _span_inputs(hop, swarm.model_id, message, attention_mask, position_ids, tuning, codec)
            sent.append(inputs)
            message = PeerConnection.to(hop.endpoint).forward(swarm_pb2.ForwardRequest(inputs=inputs), timeout)\
                .hidden_states
        ctx.swarm, ctx.chain, ctx.sent, ctx.dtype, ctx.tuning = swarm, chain, sent, hidden.dtype, tuning
        return deserialize_tensor(message).to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        swarm, tuning, timeout = ctx.swarm, ctx.tuning, ctx.swarm.settings.request_timeout
        grad = serialize_tensor(grad_output.contiguous(), swarm.settings.codec)
        deep_grad = torch.zeros_like(tuning.deep_prompts) if tuning.deep_prompts is not None else None
        adapter_grads = [{name: None for name in named} for _, named in tuning.adapters]
        for hop, inputs in zip(reversed(ctx.chain), reversed(ctx.sent)):
            request = swarm_pb2.BackwardRequest(inputs=inputs, grad_outputs=grad)
            response = PeerConnection.to(hop.endpoint).backward(request, timeout)
            grad = response.grad_hidden_states
            if deep_grad is not None:
                deep_grad[hop.start:hop.end] = deserialize_tensor(response.grad_deep_prompts).to(deep_grad.dtype)
            for grads, msg in zip(adapter_grads, response.grad_adapters):
                for name, tensor in msg.tensors.items():
                    grads[name] = deserialize_tensor(tensor)
        flat = [deep_grad] if deep_grad is not None else []
        for (_, named), grads in zip(tuning.adapters, adapter_grads):
            flat += [grads[name].to(named[name].dtype) if grads[name] is not None else torch.zeros_like(named[name])
                     for name in named]
        return (None, None, None, None, None, deserialize_tensor(grad).to(ctx.dtype), *flat)


def remote_forward(swarm: RemoteSwarm, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   position_ids: torch.Tensor | None = None, tuning: TuningPayload | None = None,
                   start: int = 0, end: int | None = None) -> torch.Tensor:
    """Hidden states through blocks [start, end) (default: all), differentiable w.r.t.
    `hidden` and the tuning tensors."""
    tuning = tuning or TuningPayload()
    chain = swarm.find_chain(start, end, randomize=True)
    return _ChainCall.apply(swarm, chain, attention_mask, position_ids, tuning, hidden, *tuning.flat())
