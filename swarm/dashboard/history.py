"""Samples over the last minutes, per model, for the dashboard's plot: live inference
sessions, and a running count of tokens through the whole model (the page derives tokens/s
from its differences).

Both come from the peers' records (PeerRecord.sessions and the tokens_served counter):
- a client's session opens on one peer per span of its chain, so every block it passes has
  it once: live sessions are those of the busiest block;
- a peer serving k of n blocks has done k/n of the work of each token it served, so the
  model's count grows by k/n of that peer's counter's growth. A counter that went back (the
  peer restarted under its id) counts from zero.
"""

from __future__ import annotations

import time
from collections import deque
from swarm.registry import PeerRecord, peers_by_id

HISTORY_SECONDS = 600.0
FORGET_PEER_SECONDS = 600.0  # a peer gone this long starts again from zero if it comes back


class ModelHistory:
    """One model's samples: [time (s since the epoch), live sessions, tokens so far]."""

    def __init__(self, period: float, seconds: float = HISTORY_SECONDS) -> None:
        self.samples: deque[list[float]] = deque(maxlen=max(2, int(seconds / period) + 1))
        self.tokens = 0.0
        self._counters: dict[str, tuple[int, float]] = {}  # peer id -> (tokens_served, when last seen)

    def add(self, num_blocks: int, records: dict[int, list[PeerRecord]], now: float | None = None) -> None:
        now = time.time() if now is None else now
        sessions = max((sum(r.sessions for r in here) for here in records.values()), default=0)
        for peer_id, record in peers_by_id(records).items():
            before, _ = self._counters.get(peer_id, (record.tokens_served, now))  # new: counted from here
            grown = record.tokens_served - before if record.tokens_served >= before else record.tokens_served
            self.tokens += grown * (record.end - record.start) / num_blocks
            self._counters[peer_id] = (record.tokens_served, now)
        self._counters = {p: seen for p, seen in self._counters.items() if now - seen[1] < FORGET_PEER_SECONDS}
        self.samples.append([round(now, 3), sessions, round(self.tokens, 3)])

    def view(self) -> list[list[float]]:
        return list(self.samples)
