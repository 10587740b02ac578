"""Sending a run of inference steps through open hops, pipelined: each hop gets all of them
back to back, then its answers are read (one round trip's wait for the run, not one per
step). Rebuilding a session's cache on new peers and feeding a checker's mirror both do this."""

from __future__ import annotations

from typing import Sequence

from swarm.wire import swarm_pb2

from . import messages


def replay(hops: Sequence, steps: Sequence[swarm_pb2.InferenceStep], record: bool = True) -> list[swarm_pb2.Tensor]:
    """`steps` (as the first of `hops` is to get them) through `hops` (open session hops, each
    with a `stream`, and a `history` that gets the steps if `record`); the last hop's outputs."""
    outputs = [step.hidden_states for step in steps]
    for open_hop in hops:
        sent = [messages.step_as_sent(step, inputs) for step, inputs in zip(steps, outputs)]
        for step in sent:
            open_hop.stream.send(step)
        outputs = [open_hop.stream.answer(step.step_id).hidden_states for step in sent]
        if record:
            open_hop.history.extend(sent)
    return outputs
