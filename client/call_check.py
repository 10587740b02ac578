"""Checking stateless calls (Forward, Backward) on replicas (client/verify.py says when and
why): the same request, sent to a chain of other peers for the same blocks, answers the same.
`call` is what the hops of one autograd pass share (client/autograd.py's `_Call`)."""

from __future__ import annotations

import torch

from swarm.wire import deserialize_tensor, swarm_pb2

from . import messages
from .routing import Hop
from .transport import PeerConnection
from .verify import redo_if_lied



def _forward_on(call, chain: list[Hop], hidden: swarm_pb2.Tensor) -> list[swarm_pb2.ForwardRequest]:
    """Forward through `chain`, keeping no graph; each hop's request, then the output appended
    as the last item's hidden states (so a Backward can follow hop by hop)."""
    requests = []
    for hop in chain:
        requests.append(call.forward_request(hop, hidden, keep_graph=False))
        connection = PeerConnection.to(hop.endpoint, call.swarm.trust)
        hidden = connection.forward(requests[-1], call.swarm.settings.request_timeout).hidden_states
    return requests + [hidden]


def check_forward(call, hop: Hop, request: swarm_pb2.ForwardRequest, output: swarm_pb2.Tensor) -> None:
    """Raises WrongOutputs if a due check finds the hop's Forward answer wrong."""
    verifier = call.swarm.verifier
    if not verifier.due(hop.peer.peer_id, "forward"):
        return

    def recompute(chain: list[Hop]) -> list[torch.Tensor]:
        return [deserialize_tensor(_forward_on(call, chain, request.inputs.hidden_states)[-1])]

    redo_if_lied(verifier.judge("forward", hop, [deserialize_tensor(output)], recompute), hop)


def _gradients(responses: list[swarm_pb2.BackwardResponse]) -> list[torch.Tensor]:
    """What a chain's Backward answers hold, comparable across chains of other splits: the input
    gradient (of the first hop, answered last; compared token by token), then deep prompts and
    adapter tensors in order, each flattened to one row: a parameter's gradient is compared as a
    whole (the rows of a LoRA matrix's gradient are of very unequal size, and in bfloat16 the
    small ones are mostly rounding)."""
    grads = [deserialize_tensor(responses[-1].grad_hidden_states)]
    deep = [deserialize_tensor(r.grad_deep_prompts) for r in reversed(responses) if r.HasField("grad_deep_prompts")]
    if deep:
        grads.append(torch.cat(deep).reshape(1, -1))
    named = {}
    for response in responses:
        for index, msg in enumerate(response.grad_adapters):
            named.update({(index, name): tensor for name, tensor in msg.tensors.items()})
    return grads + [deserialize_tensor(named[key]).reshape(1, -1) for key in sorted(named)]


def check_backward(call, hop: Hop, forward: swarm_pb2.ForwardRequest, grad: swarm_pb2.Tensor,
                   response: swarm_pb2.BackwardResponse) -> None:
    """Raises WrongOutputs if a due check finds the hop's Backward answer wrong."""
    verifier = call.swarm.verifier
    if not verifier.due(hop.peer.peer_id, "backward"):
        return

    def recompute(chain: list[Hop]) -> list[torch.Tensor]:
        # One peer recomputes its forward itself; a longer chain needs each hop's inputs first.
        requests = ([call.forward_request(chain[0], forward.inputs.hidden_states, keep_graph=False)]
                    if len(chain) == 1 else _forward_on(call, chain, forward.inputs.hidden_states)[:-1])
        responses, upstream = [], grad
        for chain_hop, request in zip(reversed(chain), reversed(requests)):
            responses.append(PeerConnection.to(chain_hop.endpoint, call.swarm.trust).backward(
                messages.backward_request(request, upstream), call.swarm.settings.request_timeout))
            upstream = responses[-1].grad_hidden_states
        return _gradients(responses)

    redo_if_lied(verifier.judge("backward", hop, _gradients([response]), recompute), hop)
