"""Fakes for the client's unit tests: DHT records, a RemoteSwarm over given records (no DHT,
pings answered at once), and peers that answer in-process instead of over gRPC.

A fake peer's blocks add (end - start) to the hidden states, so an output says which blocks
ran: through blocks [0, 30) the hidden states grow by 30, whatever the chain. A lying one
(`FakePeers.liars`) adds LIE more."""

from __future__ import annotations

import time
from concurrent.futures import Future
from types import SimpleNamespace

import grpc
import torch

from client import remote_swarm
from client.remote_swarm import RemoteSwarm, SwarmSettings
from client.transport import PeerCallError
from swarm.registry import PeerRecord, PeerState
from swarm.wire import deserialize_tensor, serialize_tensor, swarm_pb2

MODEL_ID = "m-ab12cd34"
LIE = 1000.0  # what a lying fake peer adds to its answers


def peer(name: str, start: int, end: int, throughput: float = 100.0, port: int | None = None) -> PeerRecord:
    return PeerRecord(model_id=MODEL_ID, peer_id=name, endpoint=f"127.0.0.1:{port or 2000 + sum(map(ord, name))}",
                      start=start, end=end, state=PeerState.online, throughput=throughput, cache_tokens_free=0,
                      dtype="float32", version="0", fingerprint="")


def by_block(*peers: PeerRecord, num_blocks: int = 30) -> dict[int, list[PeerRecord]]:
    return {i: [p for p in peers if i in p.span] for i in range(num_blocks)}


class FlagsDHT:
    """A DHT that holds only the flags clients store (swarm/flags.py): records come from elsewhere."""

    def __init__(self) -> None:
        self.flags: dict[str, dict] = {}  # subkey -> value

    def get(self, key: str, latest: bool = False, return_future: bool = False):
        entry = SimpleNamespace(value={k: SimpleNamespace(value=v, expiration_time=float("inf"))
                                       for k, v in self.flags.items()}) if self.flags else None
        if not return_future:
            return entry
        future = Future()
        future.set_result(entry)
        return future

    def store(self, key: str, value, expiration_time: float, subkey=None, return_future: bool = False):
        self.flags[subkey] = value


def swarm_of(monkeypatch, *peers: PeerRecord, **settings) -> RemoteSwarm:
    """A RemoteSwarm whose DHT records are `peers` and whose pings all take 1 ms."""
    monkeypatch.setattr(remote_swarm, "ping", lambda endpoint, timeout: 0.001)
    swarm = RemoteSwarm([], MODEL_ID, 30, SwarmSettings(records_ttl=1e9, wait_for_peers=0.0, **settings),
                        dht=FlagsDHT())
    swarm._records, swarm._records_time = by_block(*peers), time.monotonic()
    return swarm


def unavailable(endpoint: str) -> PeerCallError:
    return PeerCallError(endpoint, "UNAVAILABLE: connection refused", grpc.StatusCode.UNAVAILABLE)


class FakePeers:
    """Stands in for PeerConnection.to(endpoint): every endpoint is a fake peer that serves
    the span its request names. `dead` endpoints fail every call; `pushes_fail` ones report
    a push_error for every push they were asked to make; `opens_fail` ones refuse to open
    sessions (and serve the rest)."""

    def __init__(self, supports_push: bool = True):
        self.supports_push = supports_push
        self.dead: set[str] = set()
        self.liars: set[str] = set()  # endpoints whose every answer is off by LIE
        self.pushes_fail: set[str] = set()
        self.opens_fail: set[str] = set()
        self.opens_tried: list[str] = []  # endpoints asked to open a session, in order
        self.streams: dict[str, list[FakeStream]] = {}  # endpoint -> streams opened, oldest first
        self.calls: list[tuple[str, str, object]] = []  # (endpoint, "forward"/"backward", request)

    def to(self, endpoint: str, trust=None) -> "FakeConnection":
        return FakeConnection(self, endpoint)

    def stream(self, endpoint: str) -> "FakeStream":
        return self.streams[endpoint][-1]


class FakeConnection:
    def __init__(self, peers: FakePeers, endpoint: str):
        self.peers, self.endpoint = peers, endpoint

    def _check(self) -> None:
        if self.endpoint in self.peers.dead:
            raise unavailable(self.endpoint)

    def forward(self, request: swarm_pb2.ForwardRequest, timeout: float) -> swarm_pb2.ForwardResponse:
        """Blocks double the hidden states here (so gradients double too)."""
        self._check()
        self.peers.calls.append((self.endpoint, "forward", request))
        out = deserialize_tensor(request.inputs.hidden_states) * 2 + self._lie()
        return swarm_pb2.ForwardResponse(hidden_states=serialize_tensor(out))

    def _lie(self) -> float:
        return LIE if self.endpoint in self.peers.liars else 0.0

    def backward(self, request: swarm_pb2.BackwardRequest, timeout: float) -> swarm_pb2.BackwardResponse:
        self._check()
        self.peers.calls.append((self.endpoint, "backward", request))
        grad = deserialize_tensor(request.grad_outputs) * 2 + self._lie()
        return swarm_pb2.BackwardResponse(grad_hidden_states=serialize_tensor(grad))

    def open_inference(self, open_msg: swarm_pb2.InferenceOpen, timeout: float) -> "FakeStream":
        self.peers.opens_tried.append(self.endpoint)
        self._check()
        if self.endpoint in self.peers.opens_fail:
            raise unavailable(self.endpoint)
        stream = FakeStream(self.peers, self.endpoint, open_msg)
        self.peers.streams.setdefault(self.endpoint, []).append(stream)
        return stream

    start_inference = open_inference  # a fake peer answers `open` at once


class FakeStream:
    """One fake peer's inference session; answers are kept until the client takes them."""

    timeout = 1.0

    def __init__(self, peers: FakePeers, endpoint: str, open_msg: swarm_pb2.InferenceOpen):
        self.peers, self.endpoint, self.open = peers, endpoint, open_msg
        self.supports_push = peers.supports_push
        self.received: list[tuple[str, swarm_pb2.InferenceStep]] = []  # ("client" or "push", step)
        self._answers: list[swarm_pb2.InferenceResponse] = []
        self.closed = False

    def wait_open(self) -> None:
        pass

    def send(self, step: swarm_pb2.InferenceStep) -> None:
        if self.endpoint in self.peers.dead:
            raise unavailable(self.endpoint)
        self.receive(step, "client")

    def receive(self, step: swarm_pb2.InferenceStep, via: str) -> None:
        if any(seen.step_id == step.step_id for _, seen in self.received):
            return  # a second copy of a step (pushed and sent by the client): dropped
        self.received.append((via, step))
        out = deserialize_tensor(step.hidden_states) + (self.open.end - self.open.start)
        out += LIE if self.endpoint in self.peers.liars else 0.0
        self._answers.append(swarm_pb2.InferenceResponse(step_id=step.step_id, hidden_states=serialize_tensor(out)))
        if not step.push_to:
            return
        if self.endpoint in self.peers.pushes_fail:
            self._answers.append(swarm_pb2.InferenceResponse(step_id=step.step_id, push_error="push refused"))
            return
        pushed = swarm_pb2.InferenceStep()
        pushed.CopyFrom(step)
        pushed.hidden_states.CopyFrom(serialize_tensor(out))
        del pushed.push_to[0]
        self.peers.stream(step.push_to[0].endpoint).receive(pushed, "push")

    def answer(self, step_id: int, wait: float | None = None) -> swarm_pb2.InferenceResponse | None:
        for answer in self._answers:
            if answer.step_id == step_id and not answer.push_error:
                self._answers.remove(answer)
                return answer
        if wait is not None:
            return None
        raise self.timed_out()

    def push_problem(self, step_id: int) -> str | None:
        for answer in self._answers:
            if answer.step_id == step_id and answer.push_error:
                self._answers.remove(answer)
                return answer.push_error
        return None

    def timed_out(self) -> PeerCallError:
        self.close()
        return PeerCallError(self.endpoint, "no answer", grpc.StatusCode.DEADLINE_EXCEEDED)

    def step(self, step: swarm_pb2.InferenceStep) -> swarm_pb2.InferenceResponse:
        self.send(step)
        return self.answer(step.step_id)

    def close(self) -> None:
        self.closed = True


def hidden(batch: int = 1, new: int = 2, width: int = 4, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.arange(batch * new * width, dtype=torch.float32).reshape(batch, new, width).to(dtype)
