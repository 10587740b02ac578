"""A peer started with `--num-blocks N` places itself where the swarm is weakest, and moves
later when another place needs it more. The decisions are peer/placement.py's; this module
is the protocol around them, which makes peers deciding at the same moment agree.

Choosing at start-up: read the records, choose, announce the choice as `joining` at once
(before loading anything), wait a random 1-2 s, read again and choose again; repeat until
the choice stands. Peers that started together all read an empty swarm and chose 0:N;
after the wait each sees the others' claims, and of peers whose claims overlap, the
smallest peer id keeps its span while the others choose again, counting it (a few rounds
at most: each round settles at least the smallest id still choosing).

Rebalancing, every --balance-period seconds (randomised by +-25% so peers do not check in
step): while the swarm is settled (nobody else joining or moving), compute where this peer
would do most good as if it had left its span; if that beats the swarm's weakest point now
(`placement.better_span`), announce `draining`, wait a random 1-2 s and decide again with
fresh records. Of two peers draining at once, the smaller id goes and the other stays, so
they never both leave one span. Then drain (no new sessions; open ones get a bounded wait),
load the new span and announce it.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING, Callable

from swarm.ready_line import moved_line
from swarm.registry import PeerState

from .placement import (
    assumed_throughput,
    better_span,
    choose_span,
    others_while_draining,
    others_while_joining,
    serving_peers,
    settled,
    yields_to_draining,
)

if TYPE_CHECKING:
    from .span_host import SpanHost

logger = logging.getLogger(__name__)

# Seconds to wait between announcing a decision and checking it again: long enough for
# other peers' records of the same moment to reach the DHT (a store takes milliseconds on
# a LAN), short next to loading the blocks.
SETTLE_SECONDS = (1.0, 2.0)
MAX_PLACEMENT_ROUNDS = 8  # each round settles at least one of the peers choosing at once


class PlacementError(RuntimeError):
    """The peer cannot choose its span (the DHT did not answer); the message says what to do."""


class Balancer:
    """Places `host` (a peer serving `length` blocks) and, every ~`period` s, moves it where
    the swarm needs it more (period 0: never)."""

    def __init__(self, host: SpanHost, length: int, period: float) -> None:
        self.host, self.length, self.period = host, length, period
        self.num_blocks = host.model.num_blocks

    async def place(self, stop: asyncio.Event) -> bool:
        """Chooses the span and announces it as joining; False if stopped first."""
        host = self.host
        try:
            records = await host.fetch_records()
        except Exception as e:
            raise PlacementError(f"cannot read the swarm's records from the DHT to choose blocks: {e}; check "
                                 "--initial-peers, or choose blocks yourself with --blocks START:END") from e
        guess = assumed_throughput(serving_peers(records, exclude=host.peer_id))
        span = choose_span(records, self.num_blocks, self.length, guess, exclude=host.peer_id)
        for _ in range(MAX_PLACEMENT_ROUNDS):
            logger.info("choosing blocks %d:%d; checking for peers choosing at the same time", *span)
            await host.announce(PeerState.joining, *span)
            if await _sleep(stop, random.uniform(*SETTLE_SECONDS)):
                return False
            try:
                records = await host.fetch_records()
            except Exception as e:  # the claim is announced; keep it rather than fail the start
                logger.warning("cannot re-read the swarm's records (%s); keeping blocks %d:%d", e, *span)
                break
            again = choose_span(others_while_joining(host.record(), records), self.num_blocks, self.length, guess)
            if again == span:
                break
            logger.info("other peers claimed blocks %d:%d meanwhile; choosing %d:%d instead", *span, *again)
            span = again
        logger.info("serving blocks %d:%d", *span)
        return True

    async def rebalance_until(self, stop: asyncio.Event, report: Callable[[str], None]) -> None:
        """Checks every ~period whether to move, and moves; `report` gets a line per move."""
        while not await _sleep(stop, self.period * random.uniform(0.75, 1.25)):
            try:
                target = await self.decide(stop)
            except Exception as e:  # the DHT is best effort: stay, check again next period
                logger.warning("rebalancing check failed (%s); staying on blocks %d:%d", e, self.host.start,
                               self.host.end)
                if self.host.state == PeerState.draining:
                    await self.host.undrain()
                continue
            if target is None:
                continue
            old = (self.host.start, self.host.end)
            if not await self.host.move(*target, stop):
                return
            report(moved_line(old, target))

    async def decide(self, stop: asyncio.Event) -> tuple[int, int] | None:
        """Where to move (the peer is then draining), or None to stay (it is then online)."""
        host = self.host
        current = (host.start, host.end)
        records = await host.fetch_records()
        if not settled(records, host.peer_id):
            return None
        target = better_span(records, self.num_blocks, current, host.throughput, exclude=host.peer_id)
        if target is None:
            return None
        logger.info("blocks %d:%d need this peer more than blocks %d:%d; draining to move", *target, *current)
        await host.drain()
        if await _sleep(stop, random.uniform(*SETTLE_SECONDS)):
            return None
        records = await host.fetch_records()
        me = host.record()
        target = None
        if not yields_to_draining(me, records):
            target = better_span(others_while_draining(me, records), self.num_blocks, current, host.throughput)
        if target is None:
            logger.info("staying on blocks %d:%d: the swarm changed meanwhile", *current)
            await host.undrain()
        return target


async def _sleep(stop: asyncio.Event, seconds: float) -> bool:
    """Waits `seconds`; True if `stop` was set meanwhile."""
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
        return True
    except asyncio.TimeoutError:
        return False
