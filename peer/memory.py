"""The peer's KV-cache budget, counted in tokens.

An inference session keeps keys and values for every token it may hold: ``batch_size x
max_length`` tokens per block, reserved in full when the session opens (a session that
fits at open must not fail halfway through generating). Counting tokens rather than bytes
keeps the number meaningful to users and to routing (the DHT record carries
`cache_tokens_free`); `bytes_per_token` converts for logs.

The budget is only touched from the event loop, but a lock keeps it correct if a
future caller is not.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # transformers is heavy; `swarm peer --help` must not wait for it
    from transformers import PretrainedConfig


class CacheBudgetExceeded(Exception):
    """A session does not fit in the free cache; the service answers RESOURCE_EXHAUSTED."""


@dataclass(eq=False)
class CacheReservation:
    """Cache tokens held by one inference session until released."""

    session_id: str
    batch_size: int
    max_length: int
    released: bool = False

    @property
    def tokens(self) -> int:
        return self.batch_size * self.max_length


class CacheBudget:
    """Reserves and releases cache tokens for sessions; never over-commits."""

    def __init__(self, total_tokens: int) -> None:
        if total_tokens < 0:
            raise ValueError(f"cache budget must be >= 0 tokens, got {total_tokens}")
        self.total_tokens = total_tokens
        self._used = 0
        self._sessions: set[CacheReservation] = set()
        self._lock = threading.Lock()

    @property
    def used_tokens(self) -> int:
        return self._used

    @property
    def free_tokens(self) -> int:
        return self.total_tokens - self._used

    @property
    def active_sessions(self) -> int:
        return len(self._sessions)

    def reserve(self, session_id: str, batch_size: int, max_length: int) -> CacheReservation:
        """Holds `batch_size x max_length` tokens, or raises CacheBudgetExceeded with the numbers."""
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"batch_size and max_length must be >= 1, got {batch_size} and {max_length}")
        reservation = CacheReservation(session_id, batch_size, max_length)
        with self._lock:
            free = self.total_tokens - self._used
            if reservation.tokens > free:
                raise CacheBudgetExceeded(
                    f"session needs {reservation.tokens} cache tokens (batch {batch_size} x max_length "
                    f"{max_length}) but this peer has {free} of {self.total_tokens} free; "
                    "retry later, use a shorter max_length or another peer"
                )
            self._used += reservation.tokens
            self._sessions.add(reservation)
        return reservation

    def release(self, reservation: CacheReservation) -> None:
        """Returns the session's tokens; releasing twice is harmless."""
        with self._lock:
            if reservation.released or reservation not in self._sessions:
                return
            reservation.released = True
            self._sessions.discard(reservation)
            self._used -= reservation.tokens


def bytes_per_token(config: PretrainedConfig, num_blocks: int, itemsize: int) -> int:
    """KV-cache bytes one token takes in `num_blocks` blocks: keys + values of every KV head."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * kv_heads * head_dim * num_blocks * itemsize
