"""An inference session: KV caches held by a chain of peers, fed one step at a time.

Streams open lazily on the first step (when the batch size is known), one per hop of a
chain chosen for low latency. Each step sends only the new tokens' hidden states; the
answer of one peer is forwarded to the next without being decoded on the client.
"""

from __future__ import annotations

import logging
import uuid

import torch

from swarm.wire import deserialize_tensor, serialize_tensor, swarm_pb2

from .remote import RemoteSwarm
from .routing import Hop
from .transport import InferenceStream, PeerConnection
from .tuning import TuningPayload

logger = logging.getLogger(__name__)


class SessionError(RuntimeError):
    pass


class InferenceSession:
    """Use as a context manager; `position` is how many tokens the peers hold."""

    def __init__(self, swarm: RemoteSwarm, max_length: int, tuning: TuningPayload | None = None):
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.swarm, self.max_length = swarm, max_length
        self.tuning = tuning or TuningPayload()
        self.session_id = uuid.uuid4().hex
        self.position = 0
        self.batch_size: int | None = None
        self._chain: list[Hop] = []
        self._streams: list[InferenceStream] = []
        self._step_id = 0
        # The last token generate chose in the previous turn: it was never sent to the peers.
        self.pending_tokens: torch.Tensor | None = None
        self.closed = False

    def __enter__(self) -> "InferenceSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _open(self, batch_size: int) -> None:
        self._chain = self.swarm.find_chain()
        settings = self.swarm.settings
        for hop in self._chain:
            open_msg = swarm_pb2.InferenceOpen(
                model_id=self.swarm.model_id, session_id=self.session_id, start=hop.start, end=hop.end,
                max_length=self.max_length, batch_size=batch_size, dtype="float32",
                response_codec=settings.codec,
            )
            deep_prompts, adapters = self.tuning.span_messages(hop.start, hop.end)
            if deep_prompts is not None:
                open_msg.deep_prompts.CopyFrom(deep_prompts)
            open_msg.adapters.extend(adapters)
            self._streams.append(PeerConnection.to(hop.endpoint).open_inference(open_msg, settings.request_timeout))
        self.batch_size = batch_size
        logger.debug("session %s opened through %s", self.session_id,
                     " -> ".join(f"{h.endpoint}[{h.start}:{h.end})" for h in self._chain))

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
        if not self._streams:
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
        for stream in self._streams:
            response = stream.step(step)
            step.hidden_states.CopyFrom(response.hidden_states)
        self.position += new
        return deserialize_tensor(step.hidden_states).to(hidden_states.dtype)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for stream in self._streams:
                stream.close()
