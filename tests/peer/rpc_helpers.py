"""Building BlockService requests and driving inference streams from a test, over real gRPC.

Shared by the in-process service tests (tests/peer) and the tests against real peer
processes (tests/integration/test_peer_*.py).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Callable

import grpc
import torch

from peer.runtime import ComputeRuntime
from swarm.blocks import BlockSpan
from swarm.tuning import AdapterSet, LoRA
from swarm.wire import serialize_tensor, swarm_pb2, swarm_pb2_grpc

pb = swarm_pb2


class BackgroundServer:
    """A grpc.aio server on 127.0.0.1 whose event loop runs on a background thread, with the
    compute runtime its servicers share and a blocking stub for the test to call."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runtime = ComputeRuntime()

    def start(self, register: Callable[[grpc.aio.Server], None]) -> None:
        """Starts the server with what `register` adds to it and connects `self.stub`."""
        async def serve():
            server = grpc.aio.server()
            register(server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            return server, port

        self.server, port = self.call(serve())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = swarm_pb2_grpc.BlockServiceStub(self.channel)

    def call(self, coro, timeout: float = 30.0):
        """Runs `coro` on the server's loop and returns its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.channel.close()
        self.call(self.server.stop(0))
        self.runtime.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def span_inputs(model_id: str, start: int, end: int, hidden: torch.Tensor | None, *,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                deep_prompts: torch.Tensor | None = None, adapters: list[pb.AdapterTensors] = (),
                codec: str = "raw", response_codec: str = "") -> pb.SpanInputs:
    inputs = pb.SpanInputs(model_id=model_id, start=start, end=end, response_codec=response_codec,
                           adapters=list(adapters))
    if hidden is not None:
        inputs.hidden_states.CopyFrom(serialize_tensor(hidden, codec))
    for name, tensor in (("attention_mask", attention_mask), ("position_ids", position_ids),
                         ("deep_prompts", deep_prompts)):
        if tensor is not None:
            getattr(inputs, name).CopyFrom(serialize_tensor(tensor))
    return inputs


def lora_for(span: BlockSpan, rank: int = 4, seed: int = 0) -> tuple[AdapterSet, pb.AdapterTensors]:
    """Random LoRA tensors for every block of `span` (B non-zero, so the adapter changes outputs),
    as an AdapterSet for the local reference and as the wire message."""
    method = LoRA(rank=rank, alpha=8.0)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, layer in enumerate(span.layers):
        for name, shape in method.tensor_shapes(layer).items():
            tensors[f"{span.start + i}.{name}"] = torch.randn(shape, generator=generator) * 0.05
    message = pb.AdapterTensors(method=method.name, config_json=method.to_json(),
                                tensors={name: serialize_tensor(t) for name, t in tensors.items()})
    return AdapterSet(method, tensors), message


def open_request(model_id: str, start: int, end: int, *, batch_size: int = 1, max_length: int = 64,
                 session_id: str = "test", dtype: str = "", deep_prompts: torch.Tensor | None = None,
                 adapters: list[pb.AdapterTensors] = (), response_codec: str = "") -> pb.InferenceRequest:
    msg = pb.InferenceOpen(model_id=model_id, session_id=session_id, start=start, end=end, max_length=max_length,
                           batch_size=batch_size, dtype=dtype, adapters=list(adapters), response_codec=response_codec)
    if deep_prompts is not None:
        msg.deep_prompts.CopyFrom(serialize_tensor(deep_prompts))
    return pb.InferenceRequest(open=msg)


def step_request(step_id: int, position: int, hidden: torch.Tensor, *, hypo_ids: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None) -> pb.InferenceRequest:
    msg = pb.InferenceStep(step_id=step_id, position=position, hidden_states=serialize_tensor(hidden))
    if hypo_ids is not None:
        msg.hypo_ids.CopyFrom(serialize_tensor(hypo_ids))
    if attention_mask is not None:
        msg.attention_mask.CopyFrom(serialize_tensor(attention_mask))
    return pb.InferenceRequest(step=msg)


class SessionStream:
    """One Inference stream on a blocking stub: `send` a request, get the peer's answer."""

    def __init__(self, stub, timeout: float = 30.0) -> None:
        self._requests: queue.Queue = queue.Queue()
        self.call = stub.Inference(iter(self._requests.get, None), timeout=timeout)

    def send(self, request: pb.InferenceRequest) -> pb.InferenceResponse:
        self._requests.put(request)
        return next(self.call)

    def close(self) -> None:
        self._requests.put(None)
        for _ in self.call:  # drain until the peer ends the stream
            pass

    def __enter__(self) -> SessionStream:
        return self

    def __exit__(self, *exc) -> None:
        self._requests.put(None)
        self.call.cancel()


def rpc_error(fn, *args, **kwargs) -> grpc.RpcError:
    """The RpcError `fn` raises (fails the test if it does not)."""
    try:
        fn(*args, **kwargs)
    except grpc.RpcError as e:
        return e
    raise AssertionError("the call succeeded; an RpcError was expected")
