"""Choosing a chain of peers whose spans cover the whole model, from the DHT records.

A chain is a path from block 0 to block N over peer spans; each span contributes its
expected cost. For inference the cost of a hop is one round trip plus the span's compute
time per token (span length / the peer's announced throughput); the cheapest path wins,
which also prefers fewer hops. Peers that failed recently are left out for a while.
"""

from __future__ import annotations

import heapq
import logging
import random
import time
from dataclasses import dataclass

from swarm.registry import PeerRecord, PeerState

logger = logging.getLogger(__name__)

# Assumed round trip when we have not measured one (loopback is ~0.3 ms, a LAN ~1 ms).
DEFAULT_HOP_SECONDS = 0.002


class MissingBlocksError(RuntimeError):
    """No online peer serves some blocks; the message names them."""

    def __init__(self, model_id: str, missing: list[int], num_blocks: int):
        self.missing = missing
        super().__init__(
            f"no peer serves blocks {format_blocks(missing)} of {model_id} ({num_blocks} blocks); "
            "start a peer for them with `swarm peer --blocks START:END`, or check `swarm status`"
        )


def format_blocks(blocks: list[int]) -> str:
    """[0, 1, 2, 7, 9, 10] -> '0-2, 7, 9-10'."""
    runs, start = [], None
    for i, b in enumerate(blocks):
        if start is None:
            start = b
        if i + 1 == len(blocks) or blocks[i + 1] != b + 1:
            runs.append(f"{start}-{b}" if b != start else str(b))
            start = None
    return ", ".join(runs)


@dataclass(frozen=True)
class Hop:
    """One step of a chain: blocks [start, end) served by `peer`."""

    start: int
    end: int
    peer: PeerRecord

    @property
    def endpoint(self) -> str:
        return self.peer.endpoint


class RouteFinder:
    """Builds chains from block records; remembers peers to avoid after failures."""

    def __init__(self, model_id: str, num_blocks: int, ban_seconds: float = 30.0):
        self.model_id, self.num_blocks, self.ban_seconds = model_id, num_blocks, ban_seconds
        self._banned_until: dict[str, float] = {}
        self.rtt: dict[str, float] = {}  # endpoint -> measured seconds

    def ban(self, peer_id: str) -> None:
        self._banned_until[peer_id] = time.monotonic() + self.ban_seconds

    def usable(self, record: PeerRecord) -> bool:
        return record.state == PeerState.online and self._banned_until.get(record.peer_id, 0) < time.monotonic()

    def candidates(self, records: dict[int, list[PeerRecord]]) -> list[PeerRecord]:
        peers = {r.peer_id: r for rs in records.values() for r in rs if self.usable(r)}
        return list(peers.values())

    def missing_blocks(self, records: dict[int, list[PeerRecord]], start: int = 0, end: int | None = None) -> list[int]:
        end = self.num_blocks if end is None else end
        return [i for i in range(start, end) if not any(self.usable(r) for r in records.get(i, []))]

    def hop_cost(self, record: PeerRecord, start: int, end: int) -> float:
        rtt = self.rtt.get(record.endpoint, DEFAULT_HOP_SECONDS)
        compute = (end - start) / max(record.throughput, 1e-3)
        return rtt + compute

    def find_chain(self, records: dict[int, list[PeerRecord]], start: int = 0, end: int | None = None,
                   randomize: bool = False) -> list[Hop]:
        """The cheapest chain over [start, end). A peer may serve part of a chain only on
        its exact span boundaries (peers serve their whole span). `randomize` jitters costs
        so that training requests spread over replicas."""
        end = self.num_blocks if end is None else end
        missing = self.missing_blocks(records, start, end)
        if missing:
            raise MissingBlocksError(self.model_id, missing, self.num_blocks)
        peers = self.candidates(records)
        # Dijkstra over block boundaries: an edge start -> end for every peer span.
        edges: dict[int, list[tuple[int, float, PeerRecord]]] = {}
        for p in peers:
            if start <= p.start and p.end <= end:
                cost = self.hop_cost(p, p.start, p.end) * (random.uniform(0.5, 1.5) if randomize else 1.0)
                edges.setdefault(p.start, []).append((p.end, cost, p))
        best: dict[int, float] = {start: 0.0}
        came_from: dict[int, Hop] = {}
        heap = [(0.0, start)]
        while heap:
            cost, node = heapq.heappop(heap)
            if node == end:
                break
            if cost > best.get(node, float("inf")):
                continue
            for nxt, edge_cost, peer in edges.get(node, []):
                if cost + edge_cost < best.get(nxt, float("inf")):
                    best[nxt] = cost + edge_cost
                    came_from[nxt] = Hop(node, nxt, peer)
                    heapq.heappush(heap, (best[nxt], nxt))
        if end not in came_from and start != end:
            raise MissingBlocksError(self.model_id, _unreachable(edges, start, end), self.num_blocks)
        chain, node = [], end
        while node != start:
            chain.append(came_from[node])
            node = came_from[node].start
        return chain[::-1]


def _unreachable(edges: dict[int, list], start: int, end: int) -> list[int]:
    """Blocks that are served, but only by spans that don't line up into a chain."""
    reach, frontier = {start}, [start]
    while frontier:
        node = frontier.pop()
        for nxt, _, _ in edges.get(node, []):
            if nxt not in reach:
                reach.add(nxt)
                frontier.append(nxt)
    furthest = max(b for b in reach if b <= end)
    return list(range(furthest, end))
