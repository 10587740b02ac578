"""Checking an inference session's hops on replicas (client/verify.py says when and why).

A peer's answer to a step depends on the session's cache, so a replica can only recompute it
in a session of its own that has run the same steps. That session (`Mirror`) is fed late and
in bulk: when a check of the hop is due, the mirror gets every step the hop ran since the last
check, sent back to back (one round trip's wait for all of them), and all those answers are
compared. A peer that lied on any step since the last check is caught at the next one.
(`session` below is the InferenceSession, `open_hop` one of its hops: client/session.py.)
"""

from __future__ import annotations

import uuid
import torch

from swarm.wire import deserialize_tensor, swarm_pb2

from .replay import replay
from .routing import Hop
from .transport import PeerCallError
from .verify import Verdict, redo_if_lied



class Mirror:
    """A session of its own on a replica chain of one hop's blocks; `synced` steps of the hop's
    history have run on it."""

    def __init__(self, session, chain: list[Hop]):
        self.chain = chain
        self.hops = session._open_hops(chain, session_id=uuid.uuid4().hex)
        self.synced = 0

    def run(self, steps: list[swarm_pb2.InferenceStep]) -> list[swarm_pb2.Tensor]:
        """The chain's outputs for `steps` (as the checked hop got them)."""
        outputs = replay(self.hops, steps, record=False)
        self.synced += len(steps)
        return outputs

    def close(self) -> None:
        for open_hop in self.hops:
            open_hop.stream.close()


def _decoded(outputs: list[swarm_pb2.Tensor]) -> list[torch.Tensor]:
    return [deserialize_tensor(t) for t in outputs]


def check_hop(session, open_hop, answer: swarm_pb2.Tensor) -> None:
    """Records the hop's answer to the step it just ran and, when a check is due, compares its
    answers since the last check with a replica's. Raises WrongOutputs if the hop lied."""
    verifier = session.swarm.verifier
    open_hop.unchecked.append(answer)
    if not verifier.due(open_hop.hop.peer.peer_id, "inference"):
        return
    ours = _decoded(open_hop.unchecked)

    def recompute(chain: list[Hop]) -> list[torch.Tensor]:
        # The hop's own mirror if `chain` is its checker's; else a new replica, which runs every
        # step the hop ever ran: it becomes the hop's checker if it has none, or is a referee,
        # asked once.
        mirror = open_hop.mirror
        if mirror is None or chain is not mirror.chain:
            mirror = Mirror(session, chain)
            open_hop.mirror = open_hop.mirror or mirror
        try:
            theirs = mirror.run(open_hop.history[mirror.synced:])
        except PeerCallError:
            if mirror is open_hop.mirror:
                open_hop.mirror = None  # closed below, and a new one opened at the next check
            raise
        finally:
            if mirror is not open_hop.mirror:
                mirror.close()
        return _decoded(theirs[len(theirs) - len(ours):])

    checker = open_hop.mirror.chain if open_hop.mirror is not None else None
    verdict = verifier.judge("inference", open_hop.hop, ours, recompute, checker)
    if verdict is Verdict.checker_lied and open_hop.mirror is not None:
        open_hop.mirror.close()
        open_hop.mirror = None
    redo_if_lied(verdict, open_hop.hop)
    open_hop.unchecked.clear()
