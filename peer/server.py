"""A running peer: joins the DHT, loads its span, serves BlockService over gRPC, announces
itself, and shuts down cleanly on SIGINT/SIGTERM.

Start-up order matters:

1. the DHT first: `hivemind.DHT` forks its own process, and forking before the model is
   loaded, the compute thread exists or gRPC starts is cheap and safe (gRPC does not
   survive a fork); a bad --initial-peers also fails before minutes of loading;
2. weights of the span only (`load_span`), then a short throughput measurement;
3. the gRPC server, then the first announcement; only then "peer ready".

Shutdown: withdraw the records (so clients stop routing here), end open sessions with
UNAVAILABLE, stop the server (1 s grace for in-flight calls), stop the compute thread,
shut the DHT down.
"""

from __future__ import annotations

import asyncio
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
from swarm.models import get_family
from swarm.registry import ModelRecord, PeerRecord, PeerState, announce, announce_model, make_model_id, withdraw
from swarm.wire import swarm_pb2_grpc

from .config import PeerConfig
from .memory import CacheBudget, bytes_per_token
from .runtime import ComputeRuntime
from .service import BlockService, ServedModel

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Records live this many announce periods, so two lost refreshes do not make the peer vanish.
RECORD_LIFETIME_PERIODS = 3
DHT_CALL_TIMEOUT = 5.0  # s; a DHT call that takes longer is abandoned (the DHT may be gone)


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

    async def announce(self) -> bool:
        from hivemind.utils import get_dht_time

        record = self._record = self.peer_record()
        # Noted before the call: a withdrawal must outlive every record we may have stored.
        expiration = self._last_expiration = get_dht_time() + RECORD_LIFETIME_PERIODS * self.period

        def store() -> bool:
            model_stored = announce_model(self.dht, self.model, expiration)
            return announce(self.dht, record, expiration) and model_stored

        try:
            stored = await self._call(store)
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

    async def withdraw(self) -> bool:
        if self._record is None:
            return True
        record, expiration = self._record, self._last_expiration + 1.0
        try:
            return await self._call(lambda: withdraw(self.dht, record, expiration))
        except Exception as e:
            logger.warning("withdrawing the records failed (they expire by themselves within %.0f s): %s",
                           RECORD_LIFETIME_PERIODS * self.period, e)
            return False


    async def _call(self, fn: Callable[[], Any]) -> Any:
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


def _in_daemon_thread(fn: Callable[[], Any]) -> asyncio.Future:
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

    threading.Thread(target=target, name="dht-call", daemon=True).start()
    return future


def run_peer(config: PeerConfig, checkpoint: Checkpoint, on_ready: Callable[[str], None]) -> int:
    """Serves until SIGINT/SIGTERM; returns the exit code. `on_ready` gets the ready line."""
    dht = start_dht(config)
    try:
        dtype, device = DTYPES[config.dtype], torch.device(config.device)
        loaded = time.perf_counter()
        span = load_span(checkpoint, config.start, config.end, dtype=dtype, device=device)
        logger.info("loaded blocks [%d, %d) of %s on %s in %s in %.1f s", config.start, config.end, checkpoint.name,
                    device, config.dtype, time.perf_counter() - loaded)
        throughput = measure_throughput(span)
        logger.info("throughput: %.1f tokens/s (single-token steps, batch 1)", throughput)
        return asyncio.run(_serve(config, checkpoint, span, throughput, dht, on_ready))
    finally:
        stopping = time.perf_counter()
        dht.shutdown()
        logger.debug("DHT shut down in %.2f s", time.perf_counter() - stopping)


async def _serve(config: PeerConfig, checkpoint: Checkpoint, span: BlockSpan, throughput: float, dht,
                 on_ready: Callable[[str], None]) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    family = get_family(checkpoint.config)
    fingerprint = config_fingerprint(checkpoint.config)
    model = ModelRecord(model_name=checkpoint.name, num_blocks=family.num_blocks, config_fingerprint=fingerprint,
                        version=swarm.__version__)
    served = ServedModel(model_id=make_model_id(checkpoint.name, fingerprint), model_name=checkpoint.name,
                         num_blocks=family.num_blocks, throughput=throughput)
    budget = CacheBudget(config.cache_tokens)
    per_token = bytes_per_token(checkpoint.config, span.num_blocks, span.dtype.itemsize)
    logger.info("KV-cache budget: %d tokens (%.0f MiB)", config.cache_tokens, config.cache_tokens * per_token / 2**20)

    endpoint = ""  # known once the port is bound

    def peer_record() -> PeerRecord:
        return PeerRecord(model_id=served.model_id, peer_id=dht.peer_id.to_base58(), endpoint=endpoint,
                          start=span.start, end=span.end, state=PeerState.online, throughput=throughput,
                          cache_tokens_free=budget.free_tokens, dtype=config.dtype, version=swarm.__version__,
                          fingerprint=span.fingerprint)

    runtime = ComputeRuntime()
    service = BlockService(span, served, runtime, budget, config.limits, config.session_timeout)
    max_bytes = config.limits.max_message_bytes
    server = grpc.aio.server(options=[
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.so_reuseport", 0),  # a second peer on a taken port must fail, not share it
    ])
    swarm_pb2_grpc.add_BlockServiceServicer_to_server(service, server)
    try:
        listen = format_endpoint(config.host, config.port)
        try:
            port = server.add_insecure_port(listen)
        except RuntimeError as e:
            raise PeerStartError(f"cannot listen on {listen} ({e}); is the port taken? pick another --port, or 0 "
                                 "for any free one") from None
        endpoint = format_endpoint(config.announced_host, config.public_port or port)
        try:
            peer_record()  # an endpoint clients could not dial is refused here, before serving
        except ValidationError as e:
            reasons = "; ".join(error["msg"] for error in e.errors())
            raise PeerStartError(f"cannot announce {endpoint}: {reasons}; fix --public-host / --public-port") from None
        if not config.public_host and config.host in ("0.0.0.0", "::"):
            logger.warning("announcing %s: only clients on this machine can reach this peer; pass --public-host "
                           "with an address others can dial", endpoint)
        await server.start()

        announcer = Announcer(dht, model, peer_record, config.announce_period)
        await announcer.announce()
        on_ready(f"peer ready: blocks {span.start}:{span.end} of {checkpoint.name} at {endpoint} "
                 f"(model_id {served.model_id})")
        await announcer.refresh_until(stop)

        logger.info("shutting down: withdrawing records, closing %d open sessions", service.open_sessions)
        stopping = time.perf_counter()
        await announcer.withdraw()
        await service.close_sessions()
        logger.debug("records withdrawn and sessions closed in %.2f s", time.perf_counter() - stopping)
    finally:
        await server.stop(grace=1.0)
        runtime.shutdown()
    return 0
