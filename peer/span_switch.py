"""The servicer the gRPC server holds: forwards every RPC to the BlockService of the span
the peer serves now, so that a peer can move to other blocks without closing its port.

Between spans (loading) every call is answered UNAVAILABLE; while draining, new inference
sessions are; clients take either as "try another peer". Calls already running finish on
the service they started on.
"""

from __future__ import annotations

import inspect

import grpc

from swarm.wire import swarm_pb2

from .service import BlockService


class SpanSwitch:
    """Stands in for a BlockService (see `serve`); registered once, with `add_to_server`."""

    def __init__(self) -> None:
        self.service: BlockService | None = None
        self._unavailable = "peer is loading its blocks; try another peer"
        self._refusing_sessions: str | None = None

    def serve(self, service: BlockService | None, unavailable: str = "") -> None:
        """Sends calls to `service` from now on; None answers them UNAVAILABLE with `unavailable`."""
        self.service, self._refusing_sessions = service, None
        if unavailable:
            self._unavailable = unavailable

    def refuse_sessions(self, message: str | None) -> None:
        """Answers new inference sessions UNAVAILABLE with `message` (None: take them again)."""
        self._refusing_sessions = message

    async def _target(self, method: str, context: grpc.aio.ServicerContext) -> BlockService:
        service = self.service
        if service is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, self._unavailable)
        if method == "Inference" and self._refusing_sessions:
            await context.abort(grpc.StatusCode.UNAVAILABLE, self._refusing_sessions)
        return service


def _forwarder(name: str):
    if inspect.isasyncgenfunction(getattr(BlockService, name)):
        async def forward_stream(self: SpanSwitch, request, context):
            service = await self._target(name, context)
            async for answer in getattr(service, name)(request, context):
                yield answer
        return forward_stream

    async def forward(self: SpanSwitch, request, context):
        service = await self._target(name, context)
        return await getattr(service, name)(request, context)
    return forward


# Every RPC BlockService implements, so an RPC added to the proto and the service is
# forwarded too; the generated placeholders (not coroutines) stay unimplemented.
for _method in swarm_pb2.DESCRIPTOR.services_by_name["BlockService"].methods:
    _behaviour = getattr(BlockService, _method.name, None)
    if inspect.iscoroutinefunction(_behaviour) or inspect.isasyncgenfunction(_behaviour):
        setattr(SpanSwitch, _method.name, _forwarder(_method.name))
