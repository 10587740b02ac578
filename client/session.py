"""An inference session: KV caches held by a chain of peers, fed one step at a time.

Streams open lazily on the first step (when the batch size is known), one per hop of a
chain chosen for low latency. Each step sends only the new tokens' hidden states; the
answer of one peer is forwarded to the next without being decoded on the client.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field

import torch

from swarm.wire import deserialize_tensor, serialize_tensor, swarm_pb2

from .remote import RemoteSwarm
from .routing import Hop
from .transport import InferenceStream, PeerCallError, PeerConnection
from .tuning import TuningPayload

logger = logging.getLogger(__name__)


class SessionError(RuntimeError):
    pass


@dataclass
class _OpenHop:
    """One peer of the session's chain, with every step it was sent (to rebuild its cache
    on a replacement peer if it fails)."""

    hop: Hop
    stream: InferenceStream
    history: list[swarm_pb2.InferenceStep] = field(default_factory=list)


class InferenceSession:
    """Use as a context manager; `position` is how many tokens the peers hold.

    Survives peer failures: when a peer fails (connection lost, error status), it is avoided
    for a while, another chain is found for its blocks, the steps it was sent are replayed
    there to rebuild the cache, and the step goes on; the tokens are the same.
    """

    def __init__(self, swarm: RemoteSwarm, max_length: int, tuning: TuningPayload | None = None):
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.swarm, self.max_length = swarm, max_length
        self.tuning = tuning or TuningPayload()
        self.session_id = uuid.uuid4().hex
        self.position = 0
        self.batch_size: int | None = None
        self._hops: list[_OpenHop] = []
        self._step_id = 0
        # The last token generate chose in the previous turn: it was never sent to the peers.
        self.pending_tokens: torch.Tensor | None = None
        self.closed = False

    def __enter__(self) -> "InferenceSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def endpoints(self) -> list[str]:
        return [h.hop.endpoint for h in self._hops]

    def _open_hop(self, hop: Hop) -> _OpenHop:
        settings = self.swarm.settings
        open_msg = swarm_pb2.InferenceOpen(
            model_id=self.swarm.model_id, session_id=self.session_id, start=hop.start, end=hop.end,
            max_length=self.max_length, batch_size=self.batch_size, dtype="float32",
            response_codec=settings.codec,
        )
        deep_prompts, adapters = self.tuning.span_messages(hop.start, hop.end)
        if deep_prompts is not None:
            open_msg.deep_prompts.CopyFrom(deep_prompts)
        open_msg.adapters.extend(adapters)
        stream = PeerConnection.to(hop.endpoint).open_inference(open_msg, settings.request_timeout)
        return _OpenHop(hop, stream)

    def _open(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self._hops = self._with_retries(lambda: [self._open_hop(hop) for hop in self.swarm.find_chain()])
        logger.debug("session %s opened through %s", self.session_id,
                     " -> ".join(f"{h.hop.endpoint}[{h.hop.start}:{h.hop.end})" for h in self._hops))

    def _with_retries(self, action):
        failures = 0
        while True:
            try:
                return action()
            except PeerCallError as e:
                failures += 1
                if not self.swarm.retry_after(e, failures):
                    raise

    def step(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
             position_ids: torch.Tensor | None = None, hypo_ids: torch.Tensor | None = None) -> torch.Tensor:
        """New tokens' hidden states through every block; `attention_mask` holds only the new
        tokens' columns of the padding mask."""
        if self.closed:
            raise SessionError("this inference session is closed")
        batch, new = hidden_states.shape[:2]
        if self.position + new > self.max_length:
            raise SessionError(
                f"session holds {self.position} tokens and max_length is {self.max_length}: {new} more do not fit; "
                "open a session with a larger max_length"
            )
        if not self._hops:
            self._open(batch)
        elif batch != self.batch_size:
            raise SessionError(f"session was opened for batch {self.batch_size}, got batch {batch}")
        self._step_id += 1
        step = swarm_pb2.InferenceStep(step_id=self._step_id, position=self.position)
        step.hidden_states.CopyFrom(serialize_tensor(hidden_states.detach(), self.swarm.settings.codec))
        if attention_mask is not None:
            step.attention_mask.CopyFrom(serialize_tensor(attention_mask.long()))
        if position_ids is not None:
            step.position_ids.CopyFrom(serialize_tensor(position_ids.long()))
        if hypo_ids is not None:
            step.hypo_ids.CopyFrom(serialize_tensor(hypo_ids.long()))
        index, failures = 0, 0
        while index < len(self._hops):
            try:
                output = self._send(self._hops[index], step)
            except PeerCallError as e:
                failures += 1
                if not self.swarm.retry_after(e, failures):
                    raise
                logger.warning("rebuilding blocks [%d, %d) of session %s on other peers",
                               self._hops[index].hop.start, self._hops[index].hop.end, self.session_id)
                self._replace(index)
                continue
            step.hidden_states.CopyFrom(output)
            index += 1
        self.position += new
        return deserialize_tensor(step.hidden_states).to(hidden_states.dtype)

    @staticmethod
    def _send(open_hop: _OpenHop, step: swarm_pb2.InferenceStep) -> swarm_pb2.Tensor:
        response = open_hop.stream.step(step)
        sent = swarm_pb2.InferenceStep()
        sent.CopyFrom(step)  # `step` travels on to the next hop, rewritten
        open_hop.history.append(sent)
        return response.hidden_states

    def _replace(self, index: int) -> None:
        """Rebuilds the failed hop's blocks on another chain: replays every step it was sent."""
        failed = self._hops[index]
        failed.stream.close()
        chain = self.swarm.find_chain(failed.hop.start, failed.hop.end)
        replacement = [self._open_hop(hop) for hop in chain]
        for past in failed.history:
            step = swarm_pb2.InferenceStep()
            step.CopyFrom(past)
            for open_hop in replacement:
                step.hidden_states.CopyFrom(self._send(open_hop, step))
        self._hops[index:index + 1] = replacement

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for open_hop in self._hops:
                open_hop.stream.close()
