"""Choosing a chain of peers whose spans cover the whole model, from the DHT records.

A chain is a path from block 0 to block N over peer spans; each span contributes its
expected cost. The cost of a hop is one round trip to the peer (measured, see `RttTable`)
plus the span's compute time per token: 1 / the peer's announced throughput, which is
measured through its whole span.

- Inference takes the cheapest chain (Dijkstra over block boundaries): least expected
  latency per step, which also prefers fewer hops.
- Training spreads its batches over replicas: each call draws a chain by an exponential
  race, every hop's cost multiplied by an Exp(1) draw, so of two replicas of a span the
  one twice as fast is drawn twice as often and the slower one still gets its share. A
  draw expected to take more than TRAINING_SLACK x the cheapest chain is replaced by the
  cheapest (a far-away or overloaded replica never slows a training step much).

Peers that failed recently, or did not answer a ping, are left out for a while; peers caught
lying (client/verify.py), for good. Peers other clients flagged in the DHT cost more.
"""

from __future__ import annotations

import heapq
import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable

from swarm.reach.tunnels import dial_target
from swarm.registry import PeerRecord, PeerState

logger = logging.getLogger(__name__)

# Assumed round trip when we have not measured one (loopback is ~0.3 ms, a LAN ~1 ms).
DEFAULT_HOP_SECONDS = 0.002
# A measured round trip is trusted this long, then measured again when next needed.
RTT_TTL_SECONDS = 60.0
# A ping waits this long. A peer that cannot be reached is left out like a failed one; one
# that answers later counts as that slow (busy is not dead: it may be all a block has).
PING_TIMEOUT_SECONDS = 2.0
# Training never draws a chain expected to take more than this many times the cheapest one.
TRAINING_SLACK = 3.0


class MissingBlocksError(RuntimeError):
    """No online peer serves some blocks; the message names them."""

    def __init__(self, model_id: str, missing: list[int], num_blocks: int, hint: str = ""):
        self.missing = missing
        super().__init__(
            f"no peer serves blocks {format_blocks(missing)} of {model_id} ({num_blocks} blocks); "
            "start a peer for them with `swarm peer --blocks START:END` (or `--num-blocks N`, which fills "
            "gaps first), or check `swarm status`" + hint
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
        """What gRPC dials: the peer's endpoint, or a local tunnel through its relays."""
        return dial_target(self.peer)


class RttTable:
    """Round-trip times to peers' endpoints, in seconds, each trusted for `ttl` seconds.

    `table[endpoint] = seconds` records a measurement; `measure` pings, in parallel, the
    endpoints that have none or an expired one.
    """

    def __init__(self, ttl: float = RTT_TTL_SECONDS, clock: Callable[[], float] = time.monotonic):
        self.ttl, self.clock = ttl, clock
        self._measured: dict[str, tuple[float, float]] = {}  # endpoint -> (seconds, when)
        self._lock = threading.Lock()

    def __setitem__(self, endpoint: str, seconds: float) -> None:
        with self._lock:
            self._measured[endpoint] = (seconds, self.clock())

    def get(self, endpoint: str, default: float | None = None) -> float | None:
        """The last measurement, even an expired one (better than a guess)."""
        with self._lock:
            found = self._measured.get(endpoint)
        return found[0] if found is not None else default

    def __getitem__(self, endpoint: str) -> float:
        seconds = self.get(endpoint)
        if seconds is None:
            raise KeyError(endpoint)
        return seconds

    def __contains__(self, endpoint: str) -> bool:
        return self.get(endpoint) is not None

    def stale(self, endpoints: Iterable[str]) -> list[str]:
        """The endpoints without a measurement younger than `ttl`, without duplicates."""
        now = self.clock()
        with self._lock:
            return [e for e in dict.fromkeys(endpoints)
                    if e not in self._measured or now - self._measured[e][1] > self.ttl]

    def measure(self, endpoints: Iterable[str], ping: Callable[[str, float], float],
                timeout: float = PING_TIMEOUT_SECONDS) -> list[str]:
        """Pings the stale ones of `endpoints` in parallel; returns those that did not answer.
        `ping(endpoint, timeout)` returns the round trip in seconds or raises."""
        stale = self.stale(endpoints)
        if not stale:
            return []

        def one(endpoint: str) -> float | None:
            try:
                return ping(endpoint, timeout)
            except Exception as e:  # any failure means: not usable now
                logger.info("peer %s did not answer a ping: %s", endpoint, e)
                return None

        with ThreadPoolExecutor(max_workers=min(16, len(stale)), thread_name_prefix="ping") as pool:
            results = list(pool.map(one, stale))
        unreachable = []
        for endpoint, seconds in zip(stale, results):
            if seconds is None:
                unreachable.append(endpoint)
            else:
                self[endpoint] = seconds
        logger.debug("measured round trips: %s", {e: f"{1e3 * s:.2f} ms" for e, s in zip(stale, results) if s})
        return unreachable


class RouteFinder:
    """Builds chains from block records; remembers peers to avoid after failures."""

    def __init__(self, model_id: str, num_blocks: int, ban_seconds: float = 30.0,
                 rng: random.Random | None = None, allow_quantized: bool = True):
        self.model_id, self.num_blocks, self.ban_seconds = model_id, num_blocks, ban_seconds
        self.allow_quantized = allow_quantized  # False: only peers announcing quant "none"
        self._banned_until: dict[str, float] = {}
        self.rtt = RttTable()
        self.rng = rng or random.Random()

        self.flags: dict[str, int] = {}  # peer id -> clients that flagged it in the DHT (swarm/flags.py)

    def ban(self, peer_id: str, seconds: float | None = None) -> None:
        """Leave the peer out for `seconds` (default: ban_seconds; inf: for good)."""
        self._banned_until[peer_id] = time.monotonic() + (self.ban_seconds if seconds is None else seconds)

    def usable(self, record: PeerRecord) -> bool:
        return (record.state == PeerState.online and self._banned_until.get(record.peer_id, 0) < time.monotonic()
                and (self.allow_quantized or record.quant == "none"))

    def quantized_only_hint(self, records: dict[int, list[PeerRecord]], blocks: list[int]) -> str:
        """Says which of `blocks` only quantized peers serve, when this client refuses those."""
        if self.allow_quantized:
            return ""
        refused = [i for i in blocks if any(r.state == PeerState.online and r.quant != "none"
                                            for r in records.get(i, []))]
        if not refused:
            return ""
        return (f"; blocks {format_blocks(refused)} are served only by quantized peers (swarm peer --quant), "
                "which this client refuses: allow them with SwarmSettings(allow_quantized=True)")

    def _banned_hint(self, records: dict[int, list[PeerRecord]], blocks: list[int]) -> str:
        now = time.monotonic()
        left_out = {r.peer_id for i in blocks for r in records.get(i, [])
                    if r.state == PeerState.online and self._banned_until.get(r.peer_id, 0) >= now}
        if not left_out:
            return ""
        return (f"; {len(left_out)} peer(s) serving them are left out for now: they failed, or returned outputs "
                "that other peers disagreed with")

    def candidates(self, records: dict[int, list[PeerRecord]]) -> list[PeerRecord]:
        peers = {r.peer_id: r for rs in records.values() for r in rs if self.usable(r)}
        return list(peers.values())

    def missing_blocks(self, records: dict[int, list[PeerRecord]], start: int = 0, end: int | None = None) -> list[int]:
        end = self.num_blocks if end is None else end
        return [i for i in range(start, end) if not any(self.usable(r) for r in records.get(i, []))]

    def hop_cost(self, record: PeerRecord, start: int, end: int) -> float:
        """Expected seconds per step for blocks [start, end) on `record`'s peer: a round trip
        plus compute. The announced throughput is tokens/s through the peer's whole span, so
        the span's share [start, end) takes that share of 1 / throughput."""
        rtt = self.rtt.get(dial_target(record), DEFAULT_HOP_SECONDS)
        compute = (end - start) / (record.end - record.start) / max(record.throughput, 1e-3)
        return (rtt + compute) * (1 + self.flags.get(record.peer_id, 0))

    def find_chain(self, records: dict[int, list[PeerRecord]], start: int = 0, end: int | None = None,
                   randomize: bool = False, exclude: frozenset[str] = frozenset(), quant: str | None = None
                   ) -> list[Hop]:
        """The cheapest chain over [start, end), or with `randomize` one drawn for a training
        call (see the module's doc). A peer may serve part of a chain only on its exact span
        boundaries (peers serve their whole span). `exclude`: peer ids to leave out; `quant`:
        only peers of that kind (a verifier's replica of a peer, client/verify.py)."""
        end = self.num_blocks if end is None else end
        if exclude or quant is not None:
            records = {i: [r for r in rs if r.peer_id not in exclude and quant in (None, r.quant)]
                       for i, rs in records.items()}
        missing = self.missing_blocks(records, start, end)
        if missing:
            raise MissingBlocksError(self.model_id, missing, self.num_blocks,
                                     self.quantized_only_hint(records, missing) + self._banned_hint(records, missing))
        edges = [(p.start, p.end, self.hop_cost(p, p.start, p.end), p) for p in self.candidates(records)
                 if start <= p.start and p.end <= end]
        best = _cheapest(edges, start, end)
        if best is None:
            raise MissingBlocksError(self.model_id, _unreachable(edges, start, end), self.num_blocks)
        if not randomize:
            return best
        drawn = _cheapest([(s, e, cost * self.rng.expovariate(1.0), p) for s, e, cost, p in edges], start, end)
        return drawn if self.chain_cost(drawn) <= TRAINING_SLACK * self.chain_cost(best) else best

    def chain_cost(self, chain: list[Hop]) -> float:
        """Expected seconds per step through `chain`."""
        return sum(self.hop_cost(hop.peer, hop.start, hop.end) for hop in chain)


Edge = tuple[int, int, float, PeerRecord]  # start, end, cost, peer


def _cheapest(edges: list[Edge], start: int, end: int) -> list[Hop] | None:
    """Dijkstra over block boundaries: the cheapest chain of edges from start to end, or None."""
    by_start: dict[int, list[Edge]] = {}
    for edge in edges:
        by_start.setdefault(edge[0], []).append(edge)
    best: dict[int, float] = {start: 0.0}
    came_from: dict[int, Hop] = {}
    heap = [(0.0, start)]
    while heap:
        cost, node = heapq.heappop(heap)
        if node == end:
            break
        if cost > best.get(node, float("inf")):
            continue
        for _, nxt, edge_cost, peer in by_start.get(node, []):
            if cost + edge_cost < best.get(nxt, float("inf")):
                best[nxt] = cost + edge_cost
                came_from[nxt] = Hop(node, nxt, peer)
                heapq.heappush(heap, (best[nxt], nxt))
    if end not in came_from and start != end:
        return None
    chain, node = [], end
    while node != start:
        chain.append(came_from[node])
        node = came_from[node].start
    return chain[::-1]


def _unreachable(edges: list[Edge], start: int, end: int) -> list[int]:
    """Blocks that are served, but only by spans that don't line up into a chain."""
    reach, frontier = {start}, [start]
    while frontier:
        node = frontier.pop()
        for _, nxt, _, _ in (edge for edge in edges if edge[0] == node):
            if nxt not in reach:
                reach.add(nxt)
                frontier.append(nxt)
    furthest = max(b for b in reach if b <= end)
    return list(range(furthest, end))
