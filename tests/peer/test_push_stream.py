"""Pushes between two PushRouters over real gRPC (peer/push.py, peer/push_stream.py): one
stream per next peer carries every push, refusals come back on it, a next peer without
PushStream (an older peer) gets unary Pushes, and a closed service ends its streams."""

from __future__ import annotations

import asyncio

import grpc
import torch

from peer.push import PushFailed, Pushed, PushRejected, PushRouter, SessionInbox
from peer.rpc_handlers import add_to_server
from peer.status import end_call
from swarm.wire import deserialize_tensor, serialize_tensor, swarm_pb2, swarm_pb2_grpc

pb = swarm_pb2


class NextPeer(swarm_pb2_grpc.BlockServiceServicer):
    """A stand-in BlockService with only the push RPCs; `pushes` can be swapped (a move)."""

    def __init__(self) -> None:
        self.pushes = PushRouter()
        self.unary_pushes = self.streams = 0

    async def Push(self, request, context):
        self.unary_pushes += 1
        try:
            self.pushes.deliver(request)
        except PushRejected as e:
            end_call(context, e.code, str(e))
            return None
        return pb.PushResponse()

    async def PushStream(self, request_iterator, context):
        self.streams += 1
        await self.pushes.serve_stream(context)


class OlderPeer(swarm_pb2_grpc.BlockServiceServicer):
    """A next peer from before PushStream: Push only (PushStream answers UNIMPLEMENTED)."""

    def __init__(self) -> None:
        self.pushes = PushRouter()
        self.unary_pushes = 0

    Push = NextPeer.Push


async def serving(servicer) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    add_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def step_to(endpoint: str, session_id: str, step_id: int) -> pb.InferenceStep:
    step = pb.InferenceStep(step_id=step_id, position=step_id - 1)
    step.hidden_states.CopyFrom(serialize_tensor(torch.zeros(1, 1, 4)))
    step.push_to.add(endpoint=endpoint, session_id=session_id)
    return step


async def push(sender: PushRouter, endpoint: str, session_id: str, step_id: int, inbox: SessionInbox) -> None:
    output = serialize_tensor(torch.full((1, 1, 4), float(step_id)))
    await sender.push_on(step_to(endpoint, session_id, step_id), output, inbox)


async def taken(inbox: SessionInbox):
    return await asyncio.wait_for(inbox.get(), 5)


async def nothing_in(inbox: SessionInbox) -> bool:
    try:
        await asyncio.wait_for(inbox.get(), 0.2)
    except asyncio.TimeoutError:
        return True
    return False


async def shut(*routers: PushRouter, server: grpc.aio.Server) -> None:
    for router in routers:
        await router.close()
    await server.stop(0)


def test_pushes_share_one_stream_and_a_refusal_is_answered_on_it():
    async def scenario():
        target = NextPeer()
        server, endpoint = await serving(target)
        sender, own = PushRouter(), SessionInbox()
        inbox = target.pushes.open_inbox("s1")
        for step_id in (1, 2, 3):
            await push(sender, endpoint, "s1", step_id, own)
        got = [await taken(inbox) for _ in range(3)]
        await push(sender, endpoint, "nobody", 4, own)  # refused, and the stream goes on
        failed = await taken(own)
        await push(sender, endpoint, "s1", 5, own)
        last = await taken(inbox)
        await shut(sender, target.pushes, server=server)
        return target, sender, got, failed, last

    target, sender, got, failed, last = asyncio.run(scenario())
    assert [item.step.step_id for item in got] == [1, 2, 3] and isinstance(got[0], Pushed)
    assert deserialize_tensor(got[2].step.hidden_states).eq(3.0).all() and not got[0].step.push_to
    assert isinstance(failed, PushFailed) and failed.step_id == 4 and "NOT_FOUND" in failed.error
    assert last.step.step_id == 5
    assert (target.streams, target.unary_pushes, sender.sent, target.pushes.received) == (1, 0, 4, 4)


def test_a_next_peer_without_push_stream_gets_unary_pushes():
    async def scenario():
        target = OlderPeer()
        server, endpoint = await serving(target)
        sender, own = PushRouter(), SessionInbox()
        inbox = target.pushes.open_inbox("s1")
        for step_id in (1, 2):
            await push(sender, endpoint, "s1", step_id, own)
        got = [await taken(inbox) for _ in range(2)]
        quiet = await nothing_in(own)  # no failure reported
        await shut(sender, server=server)
        return target, quiet, got

    target, quiet, got = asyncio.run(scenario())
    assert [item.step.step_id for item in got] == [1, 2]
    assert target.unary_pushes == 2 and quiet


def test_a_closed_service_ends_its_streams_and_the_next_push_opens_a_new_one():
    async def scenario():
        target = NextPeer()
        server, endpoint = await serving(target)
        sender, own = PushRouter(), SessionInbox()
        target.pushes.open_inbox("s1")
        await push(sender, endpoint, "s1", 1, own)
        old = target.pushes
        target.pushes = PushRouter()  # the peer moved: a new service serves the port
        inbox = target.pushes.open_inbox("s1")
        await old.close()
        await asyncio.sleep(0.2)  # the sender sees its stream end
        await push(sender, endpoint, "s1", 2, own)
        got = await taken(inbox)
        quiet = await nothing_in(own)
        await shut(sender, target.pushes, server=server)
        return target, quiet, got

    target, quiet, got = asyncio.run(scenario())
    assert got.step.step_id == 2 and quiet
    assert target.streams == 2
