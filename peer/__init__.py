"""The peer: serves a span of a model's blocks to the swarm over gRPC.

Layers, each calling only downward: `cli` -> `server` (DHT, gRPC server, announcements;
`placement` and `balancer` choose and move the span for --num-blocks, `span_switch` keeps the
port while it moves) -> `service` (BlockService: decode, compute, encode; `registration` refuses unparsable bytes; `push` forwards decode
steps to the next peer) -> `runtime` (the compute thread) and `memory` (the KV-cache budget)
-> `swarm` (blocks, wire, registry, quant).
"""

from .config import PeerConfig, PeerLimits
from .memory import CacheBudget, CacheBudgetExceeded, CacheReservation
from .runtime import ComputeRuntime, Priority

__all__ = [
    "CacheBudget",
    "CacheBudgetExceeded",
    "CacheReservation",
    "ComputeRuntime",
    "PeerConfig",
    "PeerLimits",
    "Priority",
]
