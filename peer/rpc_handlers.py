"""Registering a BlockService on a gRPC server so that request bytes that do not parse get
INVALID_ARGUMENT with the reason, instead of gRPC's own UNKNOWN before any handler runs."""

from __future__ import annotations

import inspect

import grpc

from swarm.wire import swarm_pb2

from .requests import UnparsableRequest, request_parser
from .status import refuse


def add_to_server(service, server: grpc.aio.Server) -> None:
    """Registers `service` (a BlockService or a stand-in with its methods) like the generated
    `add_BlockServiceServicer_to_server`, except that a request whose bytes do not parse is
    answered INVALID_ARGUMENT with the reason (gRPC itself answers UNKNOWN, before any handler
    runs). Covers every RPC of protos/swarm.proto that `service` implements."""
    descriptor = swarm_pb2.DESCRIPTOR.services_by_name["BlockService"]
    handlers = {}
    for method in descriptor.methods:
        parse = request_parser(getattr(swarm_pb2, method.input_type.name))
        behaviour = getattr(service, method.name)
        if not (inspect.iscoroutinefunction(behaviour) or inspect.isasyncgenfunction(behaviour)):
            continue  # the generated placeholder: left out, gRPC answers UNIMPLEMENTED
        if not method.client_streaming:  # parsed before the handler runs: hand it the error instead
            parse = _returning_errors(parse)
            behaviour = _refusing_unparsable(behaviour, method.name, method.server_streaming)
        # A streaming request is parsed by context.read() inside the handler, which refuses the error.
        make = _HANDLER_KINDS[method.client_streaming, method.server_streaming]
        response_type = getattr(swarm_pb2, method.output_type.name)
        handlers[method.name] = make(behaviour, request_deserializer=parse,
                                     response_serializer=response_type.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(descriptor.full_name, handlers),))
    server.add_registered_method_handlers(descriptor.full_name, handlers)


# (client streaming, server streaming) -> how grpc wraps the handler
_HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler,
}


def _returning_errors(parse):
    def parse_or_error(data: bytes):
        try:
            return parse(data)
        except UnparsableRequest as e:
            return e
    return parse_or_error


def _refusing_unparsable(behaviour, rpc: str, server_streaming: bool):
    if server_streaming:
        async def handle_stream(request, context):
            if isinstance(request, UnparsableRequest):
                await refuse(context, request, rpc)
                return
            async for answer in behaviour(request, context):
                yield answer
        return handle_stream

    async def handle(request, context):
        if isinstance(request, UnparsableRequest):
            await refuse(context, request, rpc)
            return None
        return await behaviour(request, context)
    return handle
