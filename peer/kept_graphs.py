"""Forward graphs a peer keeps for the Backward calls that follow them.

A training step sends Forward through the chain, then Backward in reverse. Without state the
peer must recompute the forward pass inside Backward (forward + forward + backward, ~4 forward
costs); keeping each Forward's autograd graph until its Backward arrives makes it ~3, what
training the model locally costs. The client asks for it by naming a `backward_id`.

What is kept is bounded, so a client that never sends Backward (an evaluation pass, a crash)
costs nothing lasting: graphs beyond `max_bytes` are not kept, the oldest are dropped to make
room, and any graph older than `ttl` is dropped. A Backward whose graph is gone recomputes
from the inputs it carries, so dropping a graph only costs time, never a wrong answer.

Touched from the event loop (take) and the compute thread (put); a lock keeps it whole.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from swarm.span_graph import SpanGraph

DEFAULT_TTL_SECONDS = 120.0
DEFAULT_BACKWARD_MEMORY = 1024 * 2**20  # bytes; `swarm peer --backward-memory`


class KeptGraphs:
    def __init__(self, max_bytes: int, ttl: float = DEFAULT_TTL_SECONDS, clock=time.monotonic) -> None:
        if max_bytes < 0 or ttl <= 0:
            raise ValueError(f"max_bytes must be >= 0 and ttl > 0, got {max_bytes} and {ttl}")
        self.max_bytes, self.ttl, self._clock = max_bytes, ttl, clock
        self._graphs: OrderedDict[str, tuple[float, SpanGraph]] = OrderedDict()  # oldest first
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._graphs)

    def put(self, backward_id: str, graph: SpanGraph) -> bool:
        """Keep `graph` for the Backward naming `backward_id`; False when it alone exceeds the limit."""
        if graph.nbytes > self.max_bytes:
            return False
        with self._lock:
            self._drop_expired()
            if backward_id in self._graphs:  # an id sent twice: the newer forward is what Backward follows
                self._bytes -= self._graphs.pop(backward_id)[1].nbytes
            while self._bytes + graph.nbytes > self.max_bytes:
                self._bytes -= self._graphs.popitem(last=False)[1][1].nbytes
            self._graphs[backward_id] = (self._clock(), graph)
            self._bytes += graph.nbytes
        return True

    def take(self, backward_id: str) -> SpanGraph | None:
        """The graph kept for `backward_id`, no longer kept; None if there is none."""
        with self._lock:
            self._drop_expired()
            entry = self._graphs.pop(backward_id, None)
            if entry is None:
                return None
            self._bytes -= entry[1].nbytes
            return entry[1]

    def clear(self) -> None:
        with self._lock:
            self._graphs.clear()
            self._bytes = 0

    def _drop_expired(self) -> None:
        deadline = self._clock() - self.ttl
        while self._graphs:
            kept_at, graph = next(iter(self._graphs.values()))
            if kept_at > deadline:
                break
            self._graphs.popitem(last=False)
            self._bytes -= graph.nbytes
