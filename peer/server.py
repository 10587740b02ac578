"""A running peer: joins the DHT, loads its span, serves BlockService over gRPC, announces
itself, and shuts down cleanly on SIGINT/SIGTERM.

Start-up order matters:

1. the DHT first: `hivemind.DHT` forks its own process, and forking before the model is
   loaded, the compute thread exists or gRPC starts is cheap and safe (gRPC does not
   survive a fork); a bad --initial-peers also fails before minutes of loading;
2. the port is bound (the records name it), and the span announced as `joining`; with
   --num-blocks the span is chosen first (peer/balancer.py);
3. weights of the span only (`load_span`, on a thread: a signal still stops the peer),
   then a short throughput measurement;
4. the gRPC server starts, the span is announced `online`; only then "peer ready".

The server holds a `SpanSwitch`, not the BlockService itself, so that a peer can move to
other blocks (--num-blocks with --balance-period) without changing its endpoint.

Shutdown: withdraw the records (so clients stop routing here), end open sessions with
UNAVAILABLE, stop the server (1 s grace for in-flight calls), stop the compute thread,
shut the DHT down.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import threading
import time
from typing import Any, Callable

import grpc
import torch
from pydantic import ValidationError

import swarm
from swarm.blocks import BlockSpan
from swarm.checkpoint import Checkpoint, config_fingerprint
from swarm.loading import load_span
from swarm.heap import release_freed_memory
from swarm.quant import quantize_layers, weight_bytes
from swarm.models import get_family
from swarm.registry import (
    ModelRecord,
    PeerRecord,
    PeerState,
    announce,
    announce_model,
    fetch_span_records,
    withdraw,
)

from .balancer import Balancer, PlacementError
from .config import PeerConfig
from .kept_graphs import KeptGraphs
from .memory import CacheBudget, bytes_per_token
from .runtime import ComputeRuntime
from .placement import departed
from .registration import add_to_server
from .service import BlockService, ServedModel
from .span_switch import SpanSwitch

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Records live this many announce periods, so two lost refreshes do not make the peer vanish.
RECORD_LIFETIME_PERIODS = 3
DHT_CALL_TIMEOUT = 5.0  # s; a DHT call that takes longer is abandoned (the DHT may be gone)
# A moving peer waits this long at most for its inference sessions to end by themselves;
# the rest are closed, and their clients replay them on other peers.
DRAIN_SECONDS = 10.0


class PeerStartError(RuntimeError):
    """The peer cannot start as configured; the message says what to change."""


def measure_throughput(span: BlockSpan, max_seconds: float = 1.0, max_steps: int = 16) -> float:
    """Tokens/s of single-token inference steps at batch 1: what one generating client gets."""
    state = span.start_inference(batch_size=1, max_length=max_steps + 1)
    generator = torch.Generator().manual_seed(0)
    token = torch.randn(1, 1, span.hidden_size, generator=generator).to(span.device, span.dtype)
    span.inference_step(state, token)  # warm-up: first-call allocations, kernel selection
    _synchronize(span.device)
    started, steps = time.perf_counter(), 0
    while steps < max_steps and time.perf_counter() - started < max_seconds:
        span.inference_step(state, token)
        steps += 1
    _synchronize(span.device)
    return steps / (time.perf_counter() - started)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def start_dht(config: PeerConfig):
    import hivemind  # heavy; only a serving peer needs it

    loopback = config.host in ("127.0.0.1", "localhost", "::1")
    host_maddrs = ["/ip4/127.0.0.1/tcp/0"] if loopback else ["/ip4/0.0.0.0/tcp/0"]
    try:
        return hivemind.DHT(initial_peers=config.initial_peers or None, host_maddrs=host_maddrs, start=True,
                            client_mode=False)
    except Exception as e:
        raise PeerStartError(f"cannot join the DHT through {config.initial_peers or 'no initial peers'}: {e}; "
                             "check --initial-peers (a multiaddr printed by `swarm dht`)") from e


def format_endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Announcer:
    """Keeps this peer's records in the DHT fresh, and withdraws them at the end."""

    def __init__(self, dht, model: ModelRecord, peer_record: Callable[[], PeerRecord], period: float) -> None:
        self.dht, self.model, self.peer_record, self.period = dht, model, peer_record, period
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
            model_stored = announce_model(self.dht, self.model, expiration)
            return announce(self.dht, record, expiration) and model_stored

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
        future = _in_daemon_thread(fn)
        deadline = time.monotonic() + DHT_CALL_TIMEOUT
        while not future.done():
            await asyncio.wait([future], timeout=0.05)
            if not future.done() and not self.dht.is_alive():
                raise ConnectionError("the DHT process is gone")
            if not future.done() and time.monotonic() > deadline:
                raise TimeoutError(f"the DHT did not answer in {DHT_CALL_TIMEOUT:g} s")
        return future.result()


def _in_daemon_thread(fn: Callable[[], Any], name: str = "dht-call") -> asyncio.Future:
    """Runs a blocking call on a daemon thread: a call to a dead DHT never returns, and an
    executor thread stuck in it would block the interpreter's exit."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def deliver(setter, value) -> None:
        if not future.done():
            setter(value)

    def target() -> None:
        try:
            result = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            setter, value = future.set_exception, e
        else:
            setter, value = future.set_result, result
        try:
            loop.call_soon_threadsafe(deliver, setter, value)
        except RuntimeError:  # loop closed: nobody waits any more
            pass

    threading.Thread(target=target, name=name, daemon=True).start()
    return future


class SpanHost:
    """The span this peer serves, behind a gRPC server whose endpoint never changes: it loads
    the span, announces it, and can drain it and load another in its place (a move)."""

    def __init__(self, config: PeerConfig, checkpoint: Checkpoint, model: ModelRecord, dht, endpoint: str,
                 runtime: ComputeRuntime, switch: SpanSwitch) -> None:
        self.config, self.checkpoint, self.model, self.dht = config, checkpoint, model, dht
        self.endpoint, self.runtime, self.switch = endpoint, runtime, switch
        self.peer_id = dht.peer_id.to_base58()
        # With --num-blocks a provisional span until the balancer chooses one.
        self.start, self.end = (0, config.num_blocks) if config.num_blocks else (config.start, config.end)
        self.state = PeerState.joining
        self.throughput = 0.0  # tokens/s; 0 until measured on the loaded span
        self.span: BlockSpan | None = None
        self.service: BlockService | None = None
        self.announcer = Announcer(dht, model, self.record, config.announce_period)

    def record(self) -> PeerRecord:
        service, span = self.service, self.span
        return PeerRecord(model_id=self.model.model_id, peer_id=self.peer_id, endpoint=self.endpoint,
                          start=self.start, end=self.end, state=self.state, throughput=self.throughput,
                          cache_tokens_free=service.budget.free_tokens if service else self.config.cache_tokens,
                          dtype=self.config.dtype, quant=self.config.quant, version=swarm.__version__,
                          fingerprint=span.fingerprint if span is not None else "")

    async def fetch_records(self) -> list[PeerRecord]:
        """Every valid record of the model's blocks (one DHT call)."""
        model = self.model
        by_block = await self.announcer.call(lambda: fetch_span_records(self.dht, model.model_id, model.num_blocks))
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
        dtype, device = DTYPES[config.dtype], torch.device(config.device)
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

        loading = _in_daemon_thread(load_and_measure, name="load-span")
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait([loading, stopping], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not loading.done():
            return False
        span, self.throughput = loading.result()
        logger.info("throughput: %.1f tokens/s (single-token steps, batch 1)", self.throughput)
        served = ServedModel(model_id=self.model.model_id, model_name=self.checkpoint.name,
                             num_blocks=self.model.num_blocks, throughput=self.throughput, quant=config.quant)
        budget = CacheBudget(config.cache_tokens)
        per_token = bytes_per_token(self.checkpoint.config, span.num_blocks, span.dtype.itemsize)
        logger.info("KV-cache budget: %d tokens (%.0f MiB)", config.cache_tokens,
                    config.cache_tokens * per_token / 2**20)
        self.span = span
        self.service = BlockService(span, served, self.runtime, budget, config.limits, config.session_timeout,
                                    kept=KeptGraphs(config.backward_memory_mb * 2**20))
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


def run_peer(config: PeerConfig, checkpoint: Checkpoint, on_ready: Callable[[str], None]) -> int:
    """Serves until SIGINT/SIGTERM; returns the exit code. `on_ready` gets the lines for stdout:
    the ready line once serving, and a line for each move to other blocks."""
    dht = start_dht(config)
    try:
        return asyncio.run(_serve(config, checkpoint, dht, on_ready))
    finally:
        stopping = time.perf_counter()
        dht.shutdown()
        logger.debug("DHT shut down in %.2f s", time.perf_counter() - stopping)


async def _serve(config: PeerConfig, checkpoint: Checkpoint, dht, on_ready: Callable[[str], None]) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    family = get_family(checkpoint.config)
    fingerprint = config_fingerprint(checkpoint.config)
    model = ModelRecord(model_name=checkpoint.name, num_blocks=family.num_blocks, config_fingerprint=fingerprint,
                        version=swarm.__version__)

    runtime = ComputeRuntime(threads=config.threads, light_threads=config.decode_threads)
    switch = SpanSwitch()
    max_bytes = config.limits.max_message_bytes
    server = grpc.aio.server(options=[
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.so_reuseport", 0),  # a second peer on a taken port must fail, not share it
    ])
    add_to_server(switch, server)  # refuses unparsable requests with INVALID_ARGUMENT
    try:
        listen = format_endpoint(config.host, config.port)
        try:
            port = server.add_insecure_port(listen)
        except RuntimeError as e:
            raise PeerStartError(f"cannot listen on {listen} ({e}); is the port taken? pick another --port, or 0 "
                                 "for any free one") from None
        endpoint = format_endpoint(config.announced_host, config.public_port or port)
        host = SpanHost(config, checkpoint, model, dht, endpoint, runtime, switch)
        try:
            host.record()  # an endpoint clients could not dial is refused here, before serving
        except ValidationError as e:
            reasons = "; ".join(error["msg"] for error in e.errors())
            raise PeerStartError(f"cannot announce {endpoint}: {reasons}; fix --public-host / --public-port") from None
        if not config.public_host and config.host in ("0.0.0.0", "::"):
            logger.warning("announcing %s: only clients on this machine can reach this peer; pass --public-host "
                           "with an address others can dial", endpoint)

        balancer = Balancer(host, config.num_blocks, config.balance_period) if config.num_blocks else None
        # Refreshed from the first (joining) announcement on: loading may outlast its records.
        refreshing = asyncio.ensure_future(host.announcer.refresh_until(stop))
        try:
            return await _place_load_and_serve(host, balancer, server, stop, on_ready)
        finally:
            stop.set()
            await refreshing
            await _stop(host)
    finally:
        await server.stop(grace=1.0)
        runtime.shutdown()


async def _place_load_and_serve(host: SpanHost, balancer: Balancer | None, server: grpc.aio.Server,
                                stop: asyncio.Event, on_ready: Callable[[str], None]) -> int:
    """Chooses the span (or takes --blocks), loads it, serves it until `stop`, moving it when
    the balancer says so; returns the exit code."""
    if balancer is not None:
        try:
            if not await balancer.place(stop):
                return 0
        except PlacementError as e:
            raise PeerStartError(str(e)) from None
    else:
        await host.announce(PeerState.joining)  # so peers choosing their span meanwhile count this one
    if not await host.load(stop):
        return 0
    await server.start()
    await host.announce(PeerState.online)
    on_ready(f"peer ready: blocks {host.start}:{host.end} of {host.checkpoint.name} at {host.endpoint} "
             f"(model_id {host.model.model_id})")
    if balancer is None or balancer.period <= 0:
        await stop.wait()
        return 0
    stopping = asyncio.ensure_future(stop.wait())
    balancing = asyncio.ensure_future(balancer.rebalance_until(stop, on_ready))
    await asyncio.wait([stopping, balancing], return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if not balancing.done():
        balancing.cancel()  # a move half done is abandoned: its blocks are withdrawn on the way out
        await asyncio.gather(balancing, return_exceptions=True)
        return 0
    if balancing.exception() is not None:
        logger.error("moving to other blocks failed; shutting down", exc_info=balancing.exception())
        return 1
    return 0


async def _stop(host: SpanHost) -> None:
    """Withdraws the records (so clients stop routing here) and ends open sessions."""
    service = host.service
    logger.info("shutting down: withdrawing records, closing %d open sessions", service.open_sessions if service else 0)
    stopping = time.perf_counter()
    await host.announcer.withdraw()
    if service is not None:
        await service.close_sessions()
    logger.debug("records withdrawn and sessions closed in %.2f s", time.perf_counter() - stopping)
