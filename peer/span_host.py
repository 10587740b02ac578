"""The span this peer serves, behind a port that never changes: loaded, measured, announced,
and drained and replaced by another when the peer moves (--num-blocks with --balance-period).

The gRPC server holds a `SpanSwitch`, not the BlockService itself, so that a move keeps the
endpoint: between spans every call is answered UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time

import torch

import swarm
from swarm.blocks import BlockSpan
from swarm.checkpoint import Checkpoint
from swarm.dtypes import torch_dtype
from swarm.heap import release_freed_memory
from swarm.loading import load_span
from swarm.quant import quantize_layers, weight_bytes
from swarm.registry import ModelRecord, PeerRecord, PeerState, fetch_span_records

from .announcer import Announcer
from .config import PeerConfig
from .kept_graphs import KeptGraphs
from .lying import Liar
from .memory import CacheBudget, bytes_per_token
from .placement import departed
from .runtime import ComputeRuntime
from .service import BlockService, ServedModel
from .span_switch import SpanSwitch
from .threads import in_daemon_thread
from .throughput import measure_throughput

logger = logging.getLogger(__name__)

# A moving peer waits this long at most for its inference sessions to end by themselves;
# the rest are closed, and their clients replay them on other peers.
DRAIN_SECONDS = 10.0


class SpanHost:
    """The span this peer serves, behind a gRPC server whose endpoint never changes: it loads
    the span, announces it, and can drain it and load another in its place (a move)."""

    def __init__(self, config: PeerConfig, checkpoint: Checkpoint, model: ModelRecord, dht, endpoint: str,
                 runtime: ComputeRuntime, switch: SpanSwitch, relays: list[str] | None = None) -> None:
        self.config, self.checkpoint, self.model, self.dht = config, checkpoint, model, dht
        self.relays = tuple(relays or ())  # circuit multiaddrs when behind NAT (peer/reach.py)
        self.endpoint, self.runtime, self.switch = endpoint, runtime, switch
        self.peer_id = dht.peer_id.to_base58()
        # With --num-blocks a provisional span until the balancer chooses one.
        self.start, self.end = (0, config.blocks_wanted) if config.blocks_wanted else (config.start, config.end)
        self.state = PeerState.joining
        self.throughput = 0.0  # tokens/s; 0 until measured on the loaded span
        self.span: BlockSpan | None = None
        self.service: BlockService | None = None
        self.tokens_before_move = 0  # served on spans left behind: the record's counter never goes back
        self.announcer = Announcer(dht, model, self.record, config.announce_period, trust=config.trust)

    def record(self) -> PeerRecord:
        service, span = self.service, self.span
        return PeerRecord(model_id=self.model.model_id, peer_id=self.peer_id, endpoint=self.endpoint,
                          start=self.start, end=self.end, state=self.state, throughput=self.throughput,
                          cache_tokens_free=service.budget.free_tokens if service else self.config.cache_tokens,
                          dtype=self.config.dtype, quant=self.config.quant, version=swarm.__version__,
                          fingerprint=span.fingerprint if span is not None else "", relays=self.relays,
                          sessions=service.open_sessions if service else 0,
                          tokens_served=self.tokens_before_move + (service.sessions.tokens_served if service else 0))

    async def fetch_records(self) -> list[PeerRecord]:
        """Every valid record of the model's blocks (one DHT call)."""
        model = self.model
        by_block = await self.announcer.call(
            lambda: fetch_span_records(self.dht, model.model_id, model.num_blocks, trust=self.config.trust))
        return [record for records in by_block.values() for record in records]

    async def announce(self, state: PeerState, start: int | None = None, end: int | None = None) -> bool:
        if start is not None and end is not None:
            self.start, self.end = start, end
        self.state = state
        return await self.announcer.announce()

    async def load(self, stop: asyncio.Event) -> bool:
        """Loads blocks [start, end), measures them and serves them; False if stopped first
        (the loading thread is then abandoned: the process is about to exit)."""
        config = self.config
        dtype, device = torch_dtype(config.dtype), torch.device(config.device)
        start, end = self.start, self.end

        def load_and_measure() -> tuple[BlockSpan, float]:
            loaded = time.perf_counter()
            span = load_span(self.checkpoint, start, end, dtype=dtype, device=device)
            quantize_layers(span.layers, config.quant)
            release_freed_memory()  # loading's read buffers: a bf16 peer otherwise keeps 10.3 MiB/block for 7.1 of weights
            logger.info("loaded blocks [%d, %d) of %s on %s in %s (quant %s, %.0f MiB) in %.1f s", start, end,
                        self.checkpoint.name, device, config.dtype, config.quant, weight_bytes(span) / 2**20,
                        time.perf_counter() - loaded)
            return span, measure_throughput(span)

        loading = in_daemon_thread(load_and_measure, name="load-span")
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait([loading, stopping], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not loading.done():
            return False
        span, self.throughput = loading.result()
        if config.lie:
            self.throughput *= 10  # a liar advertises speed, to draw the traffic it wants to spoil
        logger.info("throughput: %.1f tokens/s (single-token steps, batch 1)", self.throughput)
        served = ServedModel(model_id=self.model.model_id, model_name=self.checkpoint.name,
                             num_blocks=self.model.num_blocks, throughput=self.throughput, quant=config.quant)
        budget = CacheBudget(config.cache_tokens)
        per_token = bytes_per_token(self.checkpoint.config, span.length, span.dtype.itemsize)
        logger.info("KV-cache budget: %d tokens (%.0f MiB)", config.cache_tokens,
                    config.cache_tokens * per_token / 2**20)
        self.span = span
        self.service = BlockService(span, served, self.runtime, budget, config.limits, config.session_timeout,
                                    kept=KeptGraphs(config.backward_memory_mb * 2**20), trust=config.trust,
                                    liar=Liar(config.lie, config.lie_scale, config.lie_seed) if config.lie else None)
        self.switch.serve(self.service)
        return True

    async def drain(self) -> None:
        """Announces `draining` and stops taking new inference sessions (open ones go on)."""
        self.switch.refuse_sessions(f"peer is leaving blocks {self.start}:{self.end}; open the session on another "
                                    "peer")
        await self.announce(PeerState.draining)

    async def undrain(self) -> None:
        self.switch.refuse_sessions(None)
        await self.announce(PeerState.online)

    async def move(self, start: int, end: int, stop: asyncio.Event) -> bool:
        """Leaves the current span for blocks [start, end): waits (bounded) for open sessions
        to end, closes the rest (their clients rebuild them elsewhere), withdraws the blocks it
        leaves, loads the new ones and announces them. False if stopped on the way."""
        old = self.service
        if old is not None:
            deadline = time.monotonic() + min(DRAIN_SECONDS, self.config.session_timeout)
            while old.open_sessions and time.monotonic() < deadline and not stop.is_set():
                await asyncio.sleep(0.1)
            await old.close_sessions(f"peer moved to blocks {start}:{end}; other peers serve these blocks")
            self.tokens_before_move += old.sessions.tokens_served
        self.switch.serve(None, unavailable=f"peer is loading blocks {start}:{end}; try another peer")
        left = departed((self.start, self.end), (start, end))
        self.service = self.span = old = None
        gc.collect()  # the old span's weights go before the new ones come
        for gone_start, gone_end in left:
            await self.announcer.withdraw(gone_start, gone_end)
        self.throughput = 0.0
        await self.announce(PeerState.joining, start, end)
        if not await self.load(stop):
            return False
        await self.announce(PeerState.online)
        return True
