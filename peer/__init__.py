"""The peer: serves a span of a model's blocks to the swarm over gRPC.

Modules, each calling only those below it:

- `cli`: `swarm peer`'s arguments -> `config` (PeerConfig, PeerLimits: the settings and
  their defaults; PeerStartError);
- `server`: the process main: DHT first, the gRPC server, start-up order, shutdown;
  - `dht`: the peer's hivemind DHT process (dies with the peer);
  - `reach`: how the peer is reached (dial-back probe; relays when behind NAT), said at start;
  - `balancer` (protocol) and `placement` (decisions): where --num-blocks serves and moves;
  - `span_host`: the span served: load, measure (`throughput`), announce (`announcer`:
    the DHT records), drain and move; `span_switch` keeps the port while it moves;
  - `rpc_handlers`: registers the service so unparsable bytes get INVALID_ARGUMENT;
- `service`: BlockService's handlers on one span;
  - `sessions`: the inference-stream state machine; `push`: steps forwarded peer to peer;
  - `requests`: untrusted messages -> checked tensors; `compute`: the span's work and the
    encoding of its answer; `status`: request error -> gRPC status;
- `runtime` (the compute thread; `threads`: results of other threads into the event
  loop), `memory` (the KV-cache budget), `kept_graphs` (Forward graphs kept for Backward)
- -> `swarm` (blocks, wire, registry, quant); never `client`.
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
