"""gRPC connections to peers: one channel per endpoint, reused by every call.

The client side is synchronous (it runs inside torch modules and transformers' generate
loop), so it uses grpc's blocking API. A bidirectional Inference stream is driven by a
queue: each step puts one request and blocks on the next response, one round trip per
step per peer (~0.2 ms on loopback). With server-to-server push (peer/push.py) a peer may
get its steps from the previous peer instead; its answers still come on its own stream.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import grpc

from swarm.membership import Trust
from swarm.membership.grpc_auth import channel
from swarm.wire import swarm_pb2, swarm_pb2_grpc

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


# The request itself was wrong, or (a private swarm) its caller is not or no longer a member:
# another peer would refuse it too, so retrying elsewhere is pointless.
CLIENT_ERRORS = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


class PeerCallError(RuntimeError):
    """A peer failed or refused a call; `code` is the gRPC status code (or None)."""

    def __init__(self, endpoint: str, message: str, code: grpc.StatusCode | None = None):
        super().__init__(f"peer {endpoint}: {message}")
        self.endpoint, self.code = endpoint, code


class PeerConnection:
    """Stubs for one peer's BlockService over a shared channel: plaintext in an open swarm, TLS
    and member tokens in a private one (`trust`, swarm/membership/grpc_auth.py)."""

    _pool: dict[str, "PeerConnection"] = {}
    _pool_lock = threading.Lock()

    def __init__(self, endpoint: str, trust: Trust | None = None):
        self.endpoint, self.trust = endpoint, trust
        self.channel = channel(endpoint, trust, options=_CHANNEL_OPTIONS)
        self.stub = swarm_pb2_grpc.BlockServiceStub(self.channel)

    @classmethod
    def to(cls, endpoint: str, trust: Trust | None = None) -> "PeerConnection":
        """The pooled connection to `endpoint`, of the kind `trust` asks for (TLS and member
        tokens in a private swarm). Callers that pass no trust get whichever is open, or a
        plaintext one if none is."""
        with cls._pool_lock:
            found = cls._pool.get(endpoint)
            if found is None or (trust is not None and found.trust is not trust):
                found = cls._pool[endpoint] = cls(endpoint, trust)
            return found

    def _unary(self, method, request, timeout: float):
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as e:
            raise PeerCallError(self.endpoint, f"{e.code().name}: {e.details()}", e.code()) from None

    def forward(self, request: swarm_pb2.ForwardRequest, timeout: float) -> swarm_pb2.ForwardResponse:
        return self._unary(self.stub.Forward, request, timeout)

    def backward(self, request: swarm_pb2.BackwardRequest, timeout: float) -> swarm_pb2.BackwardResponse:
        return self._unary(self.stub.Backward, request, timeout)

    def info(self, timeout: float = 5.0) -> swarm_pb2.PeerInfo:
        return self._unary(self.stub.Info, swarm_pb2.InfoRequest(), timeout)

    def open_inference(self, open_msg: swarm_pb2.InferenceOpen, timeout: float) -> "InferenceStream":
        """A stream whose `open` the peer has answered."""
        stream = self.start_inference(open_msg, timeout)
        stream.wait_open()
        return stream

    def start_inference(self, open_msg: swarm_pb2.InferenceOpen, timeout: float) -> "InferenceStream":
        """A stream with `open` sent; `wait_open()` takes the answer (several peers open at once)."""
        return InferenceStream(self, open_msg, timeout)


class InferenceStream:
    """One open Inference stream to one peer: send a step, wait for its answer.

    A reader thread moves answers into a queue, so a step can wait with a timeout: a peer
    that hangs (alive but not answering) is detected like one that died. Answers are matched
    to steps by step id: what is left over from an earlier step (a late push_error) is skipped.
    """

    def __init__(self, connection: PeerConnection, open_msg: swarm_pb2.InferenceOpen, timeout: float):
        self.connection, self.timeout = connection, timeout
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._requests.put(swarm_pb2.InferenceRequest(open=open_msg))
        self._responses = connection.stub.Inference(iter(self._requests.get, None))
        self._answers: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._read_answers, daemon=True, name=f"answers-{connection.endpoint}").start()
        self.closed = False
        self.supports_push: bool | None = None  # known once `open` is answered

    def wait_open(self) -> None:
        """Waits for the answer to `open`: the peer sends it once the cache is reserved, and
        says whether it takes pushes. Raises PeerCallError if the peer refused or is silent."""
        if self.supports_push is None:
            self.supports_push = self._next().supports_push

    def _read_answers(self) -> None:
        try:
            for answer in self._responses:
                self._answers.put(answer)
            self._answers.put(PeerCallError(self.connection.endpoint, "closed the inference stream"))
        except grpc.RpcError as e:
            self._answers.put(PeerCallError(self.connection.endpoint, f"{e.code().name}: {e.details()}", e.code()))

    def _next(self, wait: float | None = None) -> swarm_pb2.InferenceResponse | None:
        """The next answer. Waits up to `wait` s and returns None; by default up to the
        stream's timeout, after which the peer counts as failed."""
        try:
            answer = self._answers.get(timeout=self.timeout if wait is None else wait)
        except queue.Empty:
            if wait is not None:
                return None
            raise self.timed_out() from None
        if isinstance(answer, PeerCallError):
            self.closed = True
            self._answers.put(answer)  # the stream is over: every later wait fails the same way
            raise answer
        return answer

    def timed_out(self) -> PeerCallError:
        """Closes the stream of a peer that did not answer in time; the error to raise."""
        self.close()
        return PeerCallError(self.connection.endpoint, f"no answer within {self.timeout:g} s",
                             grpc.StatusCode.DEADLINE_EXCEEDED)

    def send(self, step: swarm_pb2.InferenceStep) -> None:
        if self.closed:
            raise PeerCallError(self.connection.endpoint, "inference stream is closed")
        self._requests.put(swarm_pb2.InferenceRequest(step=step))

    def answer(self, step_id: int, wait: float | None = None) -> swarm_pb2.InferenceResponse | None:
        """The answer to step `step_id`, skipping leftovers of earlier steps. Waits up to
        `wait` s in all and returns None; by default as long as the peer keeps answering
        within the stream's timeout."""
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            answer = self._next(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if answer is None or (answer.step_id == step_id and not answer.push_error):
                return answer
            # Else left over from an earlier step (a late push_error): skipped. A peer answers
            # a step before it reports that the step's push failed, never after.

    def push_problem(self, step_id: int) -> str | None:
        """Without waiting: why this peer's push of step `step_id` (answered already) may not
        have reached the next peer — its push_error, or its stream having failed; else None."""
        while True:
            try:
                answer = self._answers.get_nowait()
            except queue.Empty:
                return None
            if isinstance(answer, PeerCallError):
                self._answers.put(answer)  # kept for the next wait on this stream, which fails with it
                return str(answer)
            if answer.step_id == step_id and answer.push_error:
                return answer.push_error

    def step(self, step: swarm_pb2.InferenceStep) -> swarm_pb2.InferenceResponse:
        self.send(step)
        return self.answer(step.step_id)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._requests.put(None)  # ends the request iterator: the peer sees a clean half-close
            self._responses.cancel()
