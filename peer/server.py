"""The peer process's main (`run_peer`): it starts the peer in order, serves until SIGINT or
SIGTERM, and shuts down cleanly.

Start-up order matters:

1. the DHT first (peer/dht.py): `hivemind.DHT` forks its own process, and forking before the model is
   loaded, the compute thread exists or gRPC starts is cheap and safe (gRPC does not
   survive a fork); a bad --initial-peers also fails before minutes of loading;
2. the port is bound (the records name it), and the span announced as `joining`; with
   --num-blocks the span is chosen first (peer/balancer.py);
3. weights of the span only (`load_span`, on a thread: a signal still stops the peer),
   then a short throughput measurement (peer/span_host.py, peer/throughput.py);
   The gRPC server already runs during these steps (answering UNAVAILABLE): right after it is
   bound, the dial-back probe finds how this peer is reached (peer/reach.py), and says so;
4. the span is announced `online`; only then "peer ready".

The span itself, and its moves, are `SpanHost`'s (peer/span_host.py).

Shutdown: withdraw the records (so clients stop routing here), end open sessions with
UNAVAILABLE, stop the server (1 s grace for in-flight calls), stop the compute thread,
shut the DHT down.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Callable

import grpc
from pydantic import ValidationError

import swarm
from swarm.checkpoint import Checkpoint, config_fingerprint
from swarm.membership.grpc_auth import add_port, server_interceptors
from swarm.models import get_family
from swarm.ready_line import PeerReady
from swarm.registry import ModelRecord, PeerState

from .balancer import Balancer, PlacementError
from .config import PeerConfig, PeerStartError, format_endpoint
from .dht import start_dht
from .reach import find_reach
from .rpc_handlers import add_to_server
from .runtime import ComputeRuntime
from .span_host import SpanHost
from .span_switch import SpanSwitch

logger = logging.getLogger(__name__)

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

    if config.trust is not None:
        logger.info("serving private swarm %s as member %r: signed records, TLS, members' calls only",
                    config.trust.swarm_id, config.trust.name)
    runtime = ComputeRuntime(threads=config.threads, light_threads=config.decode_threads,
                             join_wait=config.join_wait_ms / 1000)
    switch = SpanSwitch()
    max_bytes = config.limits.max_message_bytes
    server = grpc.aio.server(interceptors=server_interceptors(config.trust), options=[
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.so_reuseport", 0),  # a second peer on a taken port must fail, not share it
    ])
    add_to_server(switch, server)  # refuses unparsable requests with INVALID_ARGUMENT
    try:
        listen = format_endpoint(config.host, config.port)
        try:
            port = add_port(server, listen, config.trust)  # TLS in a private swarm
        except RuntimeError as e:
            raise PeerStartError(f"cannot listen on {listen} ({e}); is the port taken? pick another --port, or 0 "
                                 "for any free one") from None
        # Serving from now on (answered UNAVAILABLE until a span is loaded), so that the
        # dial-back probe can open the port: the owner learns how it is reached in seconds, not
        # after minutes of loading.
        await server.start()
        reach = await find_reach(config, dht, port)
        on_ready(f"reachability: {reach.line}")
        host = SpanHost(config, checkpoint, model, dht, reach.endpoint, runtime, switch, relays=reach.relays)
        try:
            host.record()  # an endpoint clients could not dial is refused here, before serving
        except ValidationError as e:
            await reach.close()
            reasons = "; ".join(error["msg"] for error in e.errors())
            raise PeerStartError(f"cannot announce {reach.endpoint}: {reasons}; fix --public-host / --public-port") from None

        balancer = Balancer(host, config.blocks_wanted, config.balance_period) if config.blocks_wanted else None
        # Refreshed from the first (joining) announcement on: loading may outlast its records.
        refreshing = asyncio.gather(host.announcer.refresh_until(stop), host.announcer.follow_revocations(stop))
        try:
            return await _place_load_and_serve(host, balancer, server, stop, on_ready)
        finally:
            stop.set()
            await refreshing
            await _stop(host)
            await reach.close()
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
    await host.announce(PeerState.online)
    on_ready(PeerReady(host.start, host.end, host.checkpoint.name, host.endpoint, host.model.model_id).line())
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
