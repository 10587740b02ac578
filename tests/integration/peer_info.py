"""What the peers of a running swarm say about themselves: their Info, over real gRPC."""

from __future__ import annotations

import grpc

from swarm.wire import swarm_pb2, swarm_pb2_grpc


def peer_infos(swarm) -> list[swarm_pb2.PeerInfo]:
    """The Info of every peer of `swarm` (a LocalSwarm), in the order of its endpoints."""
    infos = []
    for endpoint in swarm.endpoints:
        with grpc.insecure_channel(endpoint) as channel:
            infos.append(swarm_pb2_grpc.BlockServiceStub(channel).Info(swarm_pb2.InfoRequest(), timeout=10))
    return infos


def step_batches(swarm) -> list[dict[int, int]]:
    """Per peer: {sessions in one forward pass: passes run so far}."""
    return [dict(info.step_batches) for info in peer_infos(swarm)]
