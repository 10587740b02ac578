"""Where a peer should serve: pure decisions over the swarm's DHT records, no I/O.

The swarm is as strong as its weakest block. A block's strength is the summed `throughput`
of the online and joining peers serving it; a block nobody serves is the weakest of all.
Spans are compared by the strength vector they leave behind, sorted weakest first
(leximin): fewer uncovered blocks first, then a higher minimum, then a higher second
minimum... so a window that lifts the weakest point wins, and among those, the one that
also helps the next-weakest. Ties go to the lowest start, which keeps concurrent peers
that saw the same swarm in agreement.

Concurrent decisions are ordered by peer id (see `others_while_joining`, `yields_to_draining`):
two peers that picked overlapping spans at the same moment do not both move away, and two
that want to leave one span at once do not both leave it.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Iterable

from swarm.registry import PeerRecord, PeerState

# A move must lift the weakest block's throughput by this fraction: measured throughputs are
# noisy, and a move costs a reload and every open session's cache on the old span.
MOVE_MARGIN = 0.2
# Before loading its blocks a peer does not know its own speed; it assumes this if the swarm
# has no measured peer to compare with (any positive value gives the same choice then).
UNKNOWN_THROUGHPUT = 1.0

_SERVING = (PeerState.online, PeerState.joining)


@dataclass(frozen=True)
class Strength:
    """How strong the swarm is per block: comparable, stronger is greater."""

    throughput: tuple[float, ...]  # per block; 0 where uncovered
    covered: tuple[bool, ...]

    @property
    def uncovered(self) -> int:
        return self.covered.count(False)

    @property
    def weakest(self) -> float:
        return min(self.throughput)

    def key(self) -> tuple:
        return (-self.uncovered, tuple(sorted(self.throughput)))

    def __lt__(self, other: Strength) -> bool:
        return self.key() < other.key()


def serving_peers(records: Iterable[PeerRecord], exclude: str | None = None) -> list[PeerRecord]:
    """One record per peer that counts as serving (online or joining), without `exclude`."""
    by_id = {r.peer_id: r for r in records if r.state in _SERVING and r.peer_id != exclude}
    return list(by_id.values())


def strength(peers: Iterable[PeerRecord], num_blocks: int, extra: tuple[int, int, float] | None = None) -> Strength:
    """The swarm's strength with `peers` serving, plus `extra` = (start, end, throughput) if given."""
    throughput, covered = [0.0] * num_blocks, [False] * num_blocks
    spans = [(p.start, p.end, p.throughput) for p in peers] + ([extra] if extra else [])
    for start, end, rate in spans:
        for i in range(max(start, 0), min(end, num_blocks)):
            throughput[i] += rate
            covered[i] = True
    return Strength(tuple(throughput), tuple(covered))


def assumed_throughput(peers: Iterable[PeerRecord]) -> float:
    """A not-yet-measured peer's guess of its own speed: the median of the measured peers."""
    measured = [p.throughput for p in peers if p.throughput > 0]
    return statistics.median(measured) if measured else UNKNOWN_THROUGHPUT


def with_assumed_throughput(peers: Iterable[PeerRecord]) -> list[PeerRecord]:
    """Joining peers announce 0 (not measured yet); count them as typical peers instead, or a
    span someone is already loading would look like the weakest place to go."""
    peers = list(peers)
    guess = assumed_throughput(peers)
    return [p.model_copy(update={"throughput": guess}) if p.state == PeerState.joining and p.throughput == 0 else p
            for p in peers]


def choose_span(records: Iterable[PeerRecord], num_blocks: int, length: int, throughput: float,
                exclude: str | None = None) -> tuple[int, int]:
    """The window of `length` blocks that leaves the swarm strongest if a peer with
    `throughput` serves it (ties: the lowest start); `exclude` is that peer's own id."""
    if not 0 < length <= num_blocks:
        raise ValueError(f"cannot place {length} blocks in a model of {num_blocks} blocks; use 1..{num_blocks}")
    peers = with_assumed_throughput(serving_peers(records, exclude))
    best, best_start = None, 0
    for start in range(num_blocks - length + 1):
        result = strength(peers, num_blocks, (start, start + length, throughput))
        if best is None or best < result:
            best, best_start = result, start
    return best_start, best_start + length


def better_span(records: Iterable[PeerRecord], num_blocks: int, current: tuple[int, int], throughput: float,
                exclude: str | None = None, margin: float = MOVE_MARGIN) -> tuple[int, int] | None:
    """Where a peer now serving `current` should move, or None to stay.

    The peer's own records (`exclude`) are left out, as if it had left its span. Moving pays off
    only when the swarm's weakest point after the move beats the weakest point now: fewer
    uncovered blocks, or, with every block covered, a minimum throughput higher by `margin`.
    A peer whose span only it serves never moves, since leaving uncovers that span.
    """
    peers = with_assumed_throughput(serving_peers(records, exclude))
    target = choose_span(peers, num_blocks, current[1] - current[0], throughput)
    if target == current:
        return None
    now = strength(peers, num_blocks, (*current, throughput))
    after = strength(peers, num_blocks, (*target, throughput))
    if after.uncovered < now.uncovered:
        return target
    if after.uncovered == now.uncovered == 0 and after.weakest > now.weakest * (1 + margin):
        return target
    return None


def settled(records: Iterable[PeerRecord], me: str) -> bool:
    """False while another peer is joining or moving: its records do not show where it will
    serve and how fast, so a decision to move now would rest on a swarm about to change."""
    return all(r.state == PeerState.online for r in records if r.peer_id != me)


def others_while_joining(me: PeerRecord, records: Iterable[PeerRecord]) -> list[PeerRecord]:
    """The peers a joining peer counts on when it checks its claim again: all others, except
    joining ones whose claims overlap its own and that go after it (larger id; they choose
    again, counting it). Of peers that chose overlapping spans before seeing each other, the
    smallest id keeps its span."""
    return [r for r in records if r.peer_id != me.peer_id
            and not (r.state == PeerState.joining and r.peer_id > me.peer_id and _overlap(r, me.start, me.end))]


def yields_to_draining(me: PeerRecord, records: Iterable[PeerRecord]) -> bool:
    """True if another peer announced it is leaving (draining) and goes first (smaller id):
    two peers deciding at once to leave one span must not both leave it."""
    return any(r.state == PeerState.draining and r.peer_id < me.peer_id for r in records if r.peer_id != me.peer_id)


def others_while_draining(me: PeerRecord, records: Iterable[PeerRecord]) -> list[PeerRecord]:
    """The peers a draining peer counts on when it re-checks its move: serving peers, and
    draining ones that yield to it (they will stay: they see it draining first)."""
    by_id = {r.peer_id: r for r in records if r.peer_id != me.peer_id}
    staying = [r.model_copy(update={"state": PeerState.online}) if r.state == PeerState.draining else r
               for r in by_id.values() if r.state != PeerState.draining or r.peer_id > me.peer_id]
    return serving_peers(staying)


def departed(old: tuple[int, int], new: tuple[int, int]) -> list[tuple[int, int]]:
    """The parts of span `old` that span `new` no longer covers (0, 1 or 2 ranges)."""
    parts = [(old[0], min(old[1], new[0])), (max(old[0], new[1]), old[1])]
    return [(s, e) for s, e in parts if s < e]


def _overlap(record: PeerRecord, start: int, end: int) -> bool:
    return record.start < end and start < record.end
