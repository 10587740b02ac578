"""Remote autograd: stateless Forward/Backward through a chain of peers as one
torch.autograd.Function (`remote_forward`), a failed hop redone on other peers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from swarm.wire import deserialize_tensor, serialize_tensor, swarm_pb2

from . import messages
from .remote_swarm import RemoteSwarm
from .routing import Hop
from .call_check import check_backward, check_forward
from .transport import PeerCallError, PeerConnection
from .tuning import TuningPayload


@dataclass
class _Call:
    """What every hop of one Forward/Backward pass shares."""

    swarm: RemoteSwarm
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    tuning: TuningPayload
    backward_follows: bool = False  # ask each peer to keep its forward graph for our Backward

    def forward_request(self, hop: Hop, hidden: swarm_pb2.Tensor, keep_graph: bool | None = None
                        ) -> swarm_pb2.ForwardRequest:
        inputs = messages.span_inputs(self.swarm.model_id, hop, hidden, self.attention_mask, self.position_ids,
                                      self.tuning, self.swarm.settings.codec)
        return messages.forward_request(inputs, self.backward_follows if keep_graph is None else keep_graph)

    def give_up(self, error: PeerCallError, failures: int) -> bool:
        return not self.swarm.retry_after(error, failures)


def _forward_range(call: _Call, start: int, end: int, hidden: swarm_pb2.Tensor, chain: list[Hop] | None = None,
                   failures: int = 0) -> tuple[swarm_pb2.Tensor, list[tuple[Hop, swarm_pb2.ForwardRequest]]]:
    """Blocks [start, end) on a chain of peers; a failed hop is redone on other peers.
    Returns the output and the requests that succeeded with their peers (what Backward
    will send again, naming the graph each peer kept)."""
    chain = call.swarm.find_chain(start, end, randomize=True) if chain is None else chain
    sent = []
    for hop in chain:
        request = call.forward_request(hop, hidden)
        try:
            connection = PeerConnection.to(hop.endpoint, call.swarm.trust)
            hidden = connection.forward(request, call.swarm.settings.request_timeout).hidden_states
            if call.swarm.verifier is not None:
                check_forward(call, hop, request, hidden)  # raises WrongOutputs
        except PeerCallError as e:
            if call.give_up(e, failures + 1):
                raise
            hidden, redone = _forward_range(call, hop.start, hop.end, request.inputs.hidden_states,
                                            failures=failures + 1)
            sent += redone
            continue
        sent.append((hop, request))
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


def _backward_requests(call: _Call, sent: list[tuple[Hop, swarm_pb2.ForwardRequest]], grad: swarm_pb2.Tensor,
                       sink: _GradSink, failures: int = 0) -> swarm_pb2.Tensor:
    """Backward through the hops that served `sent`, in reverse. A failed hop's blocks are
    recomputed on other peers (forward to rebuild their inputs, then backward)."""
    for hop, forward in reversed(sent):
        inputs = forward.inputs
        try:
            response = PeerConnection.to(hop.endpoint, call.swarm.trust).backward(
                messages.backward_request(forward, grad), call.swarm.settings.request_timeout)
            if call.swarm.verifier is not None:
                check_backward(call, hop, forward, grad, response)  # raises WrongOutputs
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
