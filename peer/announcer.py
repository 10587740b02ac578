"""This peer's records in the DHT: announced, kept fresh while it serves, withdrawn at the end.

In a private swarm the records are signed with the member's credential, and the swarm's
revocation list is read every REVOCATIONS_PERIOD, so that the peer refuses a revoked member's
calls within seconds of its publication."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

from swarm.membership.published import REPUBLISH_SECONDS, read_revocations
from swarm.membership.trust import Trust
from swarm.registry import ModelRecord, PeerRecord, announce, announce_model, withdraw

from .threads import in_daemon_thread

logger = logging.getLogger(__name__)

# Records live this many announce periods, so two lost refreshes do not make the peer vanish.
RECORD_LIFETIME_PERIODS = 3
DHT_CALL_TIMEOUT = 5.0  # s; a DHT call that takes longer is abandoned (the DHT may be gone)
REVOCATIONS_PERIOD = REPUBLISH_SECONDS  # s; as often as the swarm's DHT node republishes the list


class Announcer:
    """Keeps this peer's records in the DHT fresh, and withdraws them at the end."""

    def __init__(self, dht, model: ModelRecord, peer_record: Callable[[], PeerRecord], period: float,
                 trust: Trust | None = None) -> None:
        self.dht, self.model, self.peer_record, self.period, self.trust = dht, model, peer_record, period, trust
        self._last_expiration = 0.0
        self._record: PeerRecord | None = None
        # One DHT write at a time, in the order asked: a refresh racing a move must not store
        # the old span after its tombstones, nor the tombstones expire before the records.
        self._writing = asyncio.Lock()

    async def announce(self) -> bool:
        async with self._writing:
            return await self._announce()

    async def _announce(self) -> bool:
        from hivemind.utils import get_dht_time

        record = self._record = self.peer_record()
        # Noted before the call: a withdrawal must outlive every record we may have stored.
        expiration = self._last_expiration = get_dht_time() + RECORD_LIFETIME_PERIODS * self.period

        def store() -> bool:
            model_stored = announce_model(self.dht, self.model, expiration, trust=self.trust)
            return announce(self.dht, record, expiration, trust=self.trust) and model_stored

        try:
            stored = await self.call(store)
        except Exception as e:  # the DHT is best effort: keep serving, retry next period
            logger.warning("announcing to the DHT failed: %s", e)
            return False
        if not stored:
            logger.warning("the DHT did not store all records; retrying in %.0f s", self.period)
        return stored

    async def refresh_until(self, stop: asyncio.Event) -> None:
        while True:
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.period)
                return
            except asyncio.TimeoutError:
                await self.announce()

    async def follow_revocations(self, stop: asyncio.Event) -> None:
        """In a private swarm: reads the revocation list every REVOCATIONS_PERIOD until `stop`."""
        trust = self.trust
        while trust is not None and not stop.is_set():
            try:
                await self.call(lambda: read_revocations(self.dht, trust))
            except Exception as e:  # the DHT is best effort: the next read may work
                logger.warning("reading the swarm's revocation list failed: %s", e)
            try:
                await asyncio.wait_for(stop.wait(), timeout=REVOCATIONS_PERIOD)
            except asyncio.TimeoutError:
                pass

    async def withdraw(self, start: int | None = None, end: int | None = None) -> bool:
        """Tombstones over the last announced records: all of them, or blocks [start, end)
        only (the part of its span a moving peer leaves)."""
        async with self._writing:
            if self._record is None:
                return True
            record, expiration = self._record, self._last_expiration + 1.0
            if start is not None and end is not None:
                record = record.model_copy(update={"start": start, "end": end})
            try:
                return await self.call(lambda: withdraw(self.dht, record, expiration))
            except Exception as e:
                logger.warning("withdrawing the records failed (they expire by themselves within %.0f s): %s",
                               RECORD_LIFETIME_PERIODS * self.period, e)
                return False

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Runs a blocking DHT call off the event loop; gives up when the DHT process dies
        (its callers would wait forever: e.g. SIGTERM sent to the whole process group) or
        after DHT_CALL_TIMEOUT."""
        future = in_daemon_thread(fn, name="dht-call")
        deadline = time.monotonic() + DHT_CALL_TIMEOUT
        while not future.done():
            await asyncio.wait([future], timeout=0.05)
            if not future.done() and not self.dht.is_alive():
                raise ConnectionError("the DHT process is gone")
            if not future.done() and time.monotonic() > deadline:
                raise TimeoutError(f"the DHT did not answer in {DHT_CALL_TIMEOUT:g} s")
        return future.result()
