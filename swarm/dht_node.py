"""`swarm dht`: run a bootstrap node of the swarm's hivemind DHT.

Prints the node's multiaddrs on stdout, one per line, the first one usable as
`--initial-peers` by peers and clients; logs go to stderr. Runs until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
import tempfile
import threading
from typing import Sequence

from .initial_peers import explained_join, exit_if_not_joined, initial_peers_argument
from .membership.identity import IdentityError, SwarmIdentity, add_swarm_dir_argument

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swarm dht",
        description="Run a bootstrap node of the swarm's DHT. Peers and clients join the swarm by passing "
        "one of the printed multiaddrs as --initial-peers. Stops cleanly on Ctrl-C / SIGTERM.",
    )
    parser.add_argument("--host", default="0.0.0.0",
                        help="IP address to listen on (default: %(default)s, all interfaces; use 127.0.0.1 for a "
                        "local-only swarm)")
    parser.add_argument("--port", type=int, default=0,
                        help="TCP port to listen on (default: 0, any free port; fix it so the multiaddr survives "
                        "restarts together with --identity-path)")
    parser.add_argument("--initial-peers", nargs="+", action="extend", default=[], metavar="MULTIADDR",
                        help="multiaddrs of running DHT nodes to join, e.g. /ip4/10.0.0.2/tcp/31337/p2p/12D3Koo... "
                        "(default: start a new DHT)")
    parser.add_argument("--maddr-file", metavar="PATH",
                        help="also write the multiaddrs to PATH, one per line (written atomically, so a reader "
                        "never sees a partial file)")
    parser.add_argument("--identity-path", metavar="PATH",
                        help="private key file that fixes this node's peer id; created if missing")
    parser.add_argument("--relay", action="store_true",
                        help="also relay for peers behind NAT (they reserve a slot here and clients reach them "
                        "through it); only on a machine others can dial, e.g. with a public address")
    parser.add_argument("--dashboard", type=int, metavar="PORT",
                        help="also serve the swarm's dashboard (blocks, peers, load; no chat) over HTTP on PORT "
                        "(0: any free port; the address is logged); needs pip install 'swarmlm[api]'")
    parser.add_argument("--dashboard-host", default="127.0.0.1", metavar="IP",
                        help="address the dashboard listens on (default: %(default)s, this machine only; "
                        "0.0.0.0 to show it to others)")
    parser.add_argument("--private", action="store_true",
                        help="run a private swarm: only members (`swarm invite NAME`, then `--join CREDENTIAL`) "
                        "are used and served; creates the swarm identity in --swarm-dir if missing, and keeps its "
                        "revocation list (`swarm revoke NAME`) published")
    add_swarm_dir_argument(parser)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="stderr log level (default: %(default)s)")
    return parser


def _listen_maddr(host: str, port: int) -> str:
    ip = ipaddress.ip_address(host)  # raises ValueError naming the bad host
    return f"/ip{ip.version}/{host}/tcp/{port}"


def order_maddrs(maddrs: Sequence[str], host: str) -> list[str]:
    """Dialable multiaddrs, best first: the --host given, then loopback, then the rest.

    Listen-on-all addresses (0.0.0.0, ::) are dropped: nobody can dial them.
    """
    def rank(maddr: str) -> int:
        parts = maddr.split("/")  # "/ip4/127.0.0.1/tcp/..." -> ["", "ip4", "127.0.0.1", ...]
        address = parts[2] if len(parts) > 2 else ""
        if address == host:
            return 0
        return 1 if address in ("127.0.0.1", "::1") else 2

    def dialable(maddr: str) -> bool:
        parts = maddr.split("/")
        try:
            return not ipaddress.ip_address(parts[2]).is_unspecified
        except (IndexError, ValueError):
            return True  # e.g. /dns4/...: not ours to judge

    return sorted((m for m in maddrs if dialable(m)), key=rank)


def serve_probes(dht, relays: list[str]) -> None:
    """Answers peers' dial-back probes (swarm/reach/probe.py) on an event loop thread."""
    import asyncio

    from .reach.probe import Prober

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True, name="reach-probes").start()

    async def start() -> None:
        await Prober(await dht.replicate_p2p(), relays).serve()

    asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)


def serve_dashboard(parser: argparse.ArgumentParser, dht, host: str, port: int, identity=None):
    """The dashboard on host:port, or exit 1 with a one-line error (after the DHT shuts down);
    of a private swarm's members when given its `identity`."""
    from .dashboard import DashboardServer
    from .membership import Trust

    trust = Trust(identity.owner_credential()) if identity is not None else None
    try:
        dashboard = DashboardServer(dht, host, port, trust=trust)
    except OSError as e:
        print(f"{parser.prog}: error: --dashboard {port}: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    logger.info("dashboard at %s", dashboard.url)
    return dashboard


def write_atomically(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".maddrs-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)  # rename is atomic within one filesystem
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    initial_peers = initial_peers_argument(parser, args.initial_peers)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        listen = _listen_maddr(args.host, args.port)
    except ValueError:
        parser.error(f"--host {args.host!r} is not an IP address")
    if args.dashboard is not None:
        from .dashboard import missing_dependencies

        if not 0 <= args.dashboard < 65536:
            parser.error(f"--dashboard {args.dashboard} is not a TCP port (0..65535)")
        if missing := missing_dependencies():
            parser.error(f"--dashboard: {missing}")

    identity = None
    if args.private:
        try:
            identity, created = SwarmIdentity.load_or_create(args.swarm_dir)
        except (IdentityError, OSError) as e:
            print(f"{parser.prog}: error: {e}", file=sys.stderr)
            return 1
        print(f"private swarm {identity.swarm_id} ({'created in' if created else 'from'} {identity.folder}); "
              f"invite members with: swarm invite NAME --swarm-dir {identity.folder}", file=sys.stderr, flush=True)

    # Signals are caught before the DHT starts so an early SIGTERM still shuts it down cleanly.
    stop = threading.Event()
    main_pid = os.getpid()

    def on_signal(signum: int, _frame: object) -> None:
        if os.getpid() != main_pid:
            # The DHT's forked child inherits this handler; there the signal keeps its default meaning.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)

    from .dht_process import OwnedDHT  # heavy (hivemind, torch): imported after --help and argument errors

    # A relay serves only once libp2p believes it is public; AutoNAT needs several other nodes
    # to say so, which a small swarm lacks. --relay is the owner saying it.
    with exit_if_not_joined(parser.prog), explained_join(initial_peers):
        dht = OwnedDHT(start=True, host_maddrs=[listen], initial_peers=initial_peers or None,
                       identity_path=args.identity_path, **({"force_reachability": "public"} if args.relay else {}))
    dashboard = None
    try:
        maddrs = order_maddrs([str(m) for m in dht.get_visible_maddrs()], args.host)
        public = [m for m in maddrs if m.split("/")[2] not in ("127.0.0.1", "::1")]
        serve_probes(dht, relays=(public or maddrs)[:1] if args.relay else [])
        if args.maddr_file:
            write_atomically(args.maddr_file, "".join(m + "\n" for m in maddrs))
        print("\n".join(maddrs), flush=True)
        if identity is not None:
            from .membership.published import keep_published

            keep_published(dht, identity, stop)
        if args.dashboard is not None:
            dashboard = serve_dashboard(parser, dht, args.dashboard_host, args.dashboard, identity)
        logger.info("DHT node %s running; stop with Ctrl-C or SIGTERM", dht.peer_id)
        while not stop.wait(timeout=1.0):  # a timed wait keeps the main thread responsive to signals
            pass
        logger.info("shutting down")
    finally:
        if dashboard is not None:
            dashboard.stop()
        dht.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
