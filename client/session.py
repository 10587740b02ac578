"""An inference session: KV caches held by a chain of peers, fed one step at a time.

Streams open lazily on the first step (when the batch size is known), one per hop of a
chain chosen for low latency. Each step sends only the new tokens' hidden states.

With push (`SwarmSettings.push`, on by default, used between peers that say they support
it), the client sends a step to the first peer only, and each peer sends its output on to
the next peer itself (peer/push.py): a token costs about one network hop per span instead
of a client round trip per span. Every peer still answers the client with its output, so
the client keeps, per hop, the steps that hop ran. Without push, the client forwards each
peer's answer to the next peer, without decoding it.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field

import torch

from swarm.wire import deserialize_tensor, swarm_pb2

from . import messages
from .remote_swarm import RemoteSwarm
from .routing import Hop
from .replay import replay
from .session_check import Mirror, check_hop
from .transport import InferenceStream, PeerCallError, PeerConnection
from .tuning import TuningPayload
from .verify import WrongOutputs

logger = logging.getLogger(__name__)

# While a hop fed by a push is awaited, how often to check that the push did not fail
# upstream (a failed push is reported on the pushing peer's stream, not the awaited one).
_PUSH_CHECK_SECONDS = 0.05


class SessionError(RuntimeError):
    pass


@dataclass
class _OpenHop:
    """One peer of the session's chain, with every step it was sent (to rebuild its cache
    on a replacement peer if it fails)."""

    hop: Hop
    stream: InferenceStream
    history: list[swarm_pb2.InferenceStep] = field(default_factory=list)
    push_failed: bool = False  # one of its pushes failed: from then on the client feeds the next hop
    # With verification (client/verify.py): its answers since the last check, and the replica's
    # session that checks them (client/session_check.py).
    unchecked: list[swarm_pb2.Tensor] = field(default_factory=list)
    mirror: Mirror | None = None

    def close(self) -> None:
        self.stream.close()
        if self.mirror is not None:
            self.mirror.close()
            self.mirror = None


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
        self.dtype: torch.dtype | None = None  # of the hidden states: each peer is opened for it
        self._hops: list[_OpenHop] = []
        self._step_id = 0
        # The last token generate chose in the previous turn: it was never sent to the peers.
        self.pending_tokens: torch.Tensor | None = None
        self._masked = False  # a step sent a padding mask: the peers count positions from it since
        self.closed = False

    def __enter__(self) -> "InferenceSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def endpoints(self) -> list[str]:
        return [h.hop.endpoint for h in self._hops]

    @property
    def steps(self) -> int:
        """Steps sent so far (each peer of the chain ran every one of them)."""
        return self._step_id

    def _open_hops(self, chain: list[Hop], session_id: str | None = None) -> list[_OpenHop]:
        """The session (or another one, `session_id`) opened on every hop of `chain` at once:
        each peer reserves its cache while the others do, instead of one round trip after another."""
        settings, streams = self.swarm.settings, []
        try:
            for hop in chain:
                open_msg = messages.inference_open(self.swarm.model_id, session_id or self.session_id, hop,
                                                   self.max_length, self.batch_size, self.dtype, settings.codec,
                                                   self.tuning)
                connection = PeerConnection.to(hop.endpoint, self.swarm.trust)
                streams.append(connection.start_inference(open_msg, settings.request_timeout))
            for stream in streams:
                stream.wait_open()
        except PeerCallError:
            for stream in streams:
                stream.close()
            raise
        return [_OpenHop(hop, stream) for hop, stream in zip(chain, streams)]

    def _open(self, batch_size: int, dtype: torch.dtype) -> None:
        self.batch_size, self.dtype = batch_size, dtype
        self._hops, _ = self._with_retries(lambda: self._open_hops(self.swarm.find_chain()))
        logger.debug("session %s opened through %s", self.session_id,
                     " -> ".join(f"{h.hop.endpoint}[{h.hop.start}:{h.hop.end})" for h in self._hops))

    def _with_retries(self, action, failures: int = 0):
        """`action()`, tried again (on other peers: the failed one is avoided) after each
        PeerCallError while the swarm allows; its result, and the failures counted so far
        (`failures`: those of the step it serves, so retries share one bound)."""
        while True:
            try:
                return action(), failures
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
            self._open(batch, hidden_states.dtype)
        elif batch != self.batch_size:
            raise SessionError(f"session was opened for batch {self.batch_size}, got batch {batch}")
        self._masked = self._masked or attention_mask is not None
        if position_ids is not None and not self._masked and _counting_from(position_ids, self.position, new):
            # What every peer derives itself when no mask was sent: not sent, so no peer decodes
            # and checks it (~0.3 ms a peer per decode step, with cold caches).
            position_ids = None
        self._step_id += 1
        step = messages.inference_step(self._step_id, self.position, hidden_states, self.swarm.settings.codec,
                                       attention_mask, position_ids, hypo_ids)
        output = self._run(step)
        self.position += new
        return deserialize_tensor(output).to(hidden_states.dtype)

    def _run(self, step: swarm_pb2.InferenceStep) -> swarm_pb2.Tensor:
        """`step` through every hop; the last hop's output. Hops are awaited in chain order;
        a failed one is rebuilt on other peers and the step goes on there."""
        inputs = step.hidden_states  # of hop `index`: the answer of the hop before
        fed = [None] * len(self._hops)  # how each hop gets this step: "client", "push", or None (not yet)
        index, failures = 0, 0
        while index < len(self._hops):
            try:
                if fed[index] is None:
                    self._feed(index, step, inputs, fed)
                answer = self._answer(index, step, inputs, fed)
                self._hops[index].history.append(messages.step_as_sent(step, inputs))
                if self.swarm.verifier is not None:
                    check_hop(self, self._hops[index], answer.hidden_states)  # raises WrongOutputs
            except WrongOutputs as e:
                failures += 1
                if not self.swarm.retry_after(e, failures):
                    raise
                # Every hop after the liar has cached what its lies led to: all are rebuilt.
                self._restart()
                inputs, index, fed = step.hidden_states, 0, [None] * len(self._hops)
                continue
            except PeerCallError as e:
                failures += 1
                if not self.swarm.retry_after(e, failures):
                    raise
                logger.warning("rebuilding blocks [%d, %d) of session %s on other peers",
                               self._hops[index].hop.start, self._hops[index].hop.end, self.session_id)
                failures = self._replace(index, failures)
                # The hops after it may have run the step already (the failed hop pushed it
                # before failing): they drop a second copy, and their answers are waiting.
                fed = fed[:index] + [None] * (len(self._hops) - index)
                continue
            inputs = answer.hidden_states
            index += 1
        return inputs

    def _pushes_on(self, index: int) -> bool:
        """Whether hop `index` is to send its output to the next hop itself."""
        if not self.swarm.settings.push or index + 1 >= len(self._hops):
            return False
        here, there = self._hops[index], self._hops[index + 1]
        # A peer behind NAT is reached through this client's tunnel, which the peer before it
        # cannot use: the client carries that hop itself.
        return (here.stream.supports_push and not here.push_failed and there.stream.supports_push
                and not there.hop.peer.relayed)

    def _feed(self, index: int, step: swarm_pb2.InferenceStep, inputs: swarm_pb2.Tensor, fed: list) -> None:
        """Sends hop `index` its input for `step`, asking it to push the step on through as
        many of the next hops as support it."""
        message = messages.step_as_sent(step, inputs)
        last = index
        while self._pushes_on(last):
            last += 1
            message.push_to.add(endpoint=self._hops[last].hop.endpoint, session_id=self.session_id)
            fed[last] = "push"
        self._hops[index].stream.send(message)
        fed[index] = "client"

    def _answer(self, index: int, step: swarm_pb2.InferenceStep, inputs: swarm_pb2.Tensor,
                fed: list) -> swarm_pb2.InferenceResponse:
        """Hop `index`'s answer to `step`. If the hop before was to push the step here and
        reports that it could not, the client sends it itself (the hop drops a second copy)."""
        stream = self._hops[index].stream
        if fed[index] != "push":
            return stream.answer(step.step_id)
        upstream = self._hops[index - 1]
        deadline = time.monotonic() + stream.timeout
        while True:
            left = deadline - time.monotonic()
            answer = stream.answer(step.step_id, wait=min(_PUSH_CHECK_SECONDS, max(left, 0.0)))
            if answer is not None:
                return answer
            problem = upstream.stream.push_problem(step.step_id)
            if problem is not None:
                logger.warning("%s; the client sends step %d to %s itself", problem, step.step_id,
                               self._hops[index].hop.endpoint)
                upstream.push_failed = True
                self._feed(index, step, inputs, fed)
                return stream.answer(step.step_id)
            if left <= 0:
                raise stream.timed_out()

    def _replace(self, index: int, failures: int) -> int:
        """Rebuilds the failed hop's blocks on another chain: replays every step it was sent,
        from the client (the hops after it hold those steps already). A replacement that fails
        too, while opening or replaying, is one more failure of the step, and the next one is
        tried (a relayed peer's first reopen can hit the tunnel its dead relay left half
        closed). Returns the step's failure count."""
        failed = self._hops[index]
        failed.close()
        replacement, failures = self._with_retries(lambda: self._rebuilt(failed), failures)
        self._hops[index:index + 1] = replacement
        return failures

    def _rebuilt(self, failed: _OpenHop) -> list[_OpenHop]:
        """`failed`'s blocks opened on another chain, with every step it was sent replayed
        there; closed again if the replay fails."""
        hops = self._open_hops(self.swarm.find_chain(failed.hop.start, failed.hop.end))
        try:
            replay(hops, failed.history)
        except PeerCallError:
            for open_hop in hops:
                open_hop.close()
            raise
        return hops

    def _restart(self) -> None:
        """The whole chain rebuilt on other peers (the liar is banned by now) under a new session
        id, from the steps the client sent before the current one."""
        past = self._hops[0].history[:-1]  # the first hop has recorded the current step, the last one
        for open_hop in self._hops:
            open_hop.close()
        self.session_id = uuid.uuid4().hex
        logger.warning("rebuilding session %s (%d steps) on other peers", self.session_id, len(past))
        self._hops = self._open_hops(self.swarm.find_chain())
        replay(self._hops, past)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for open_hop in self._hops:
                open_hop.close()



def _counting_from(position_ids: torch.Tensor, start: int, new: int) -> bool:
    """Whether every row of `position_ids` is start, start + 1, ..., start + new - 1."""
    expected = list(range(start, start + new))
    return position_ids.ndim == 2 and all(row == expected for row in position_ids.tolist())
