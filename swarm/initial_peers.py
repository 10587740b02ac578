"""`--initial-peers`, checked and explained: every multiaddr is parsed before any DHT daemon
starts, and a DHT node that cannot start or reach them fails with one line saying what to check.

hivemind's own failures (`P2PDaemonError: Daemon failed to start: ... failed to parse
multiaddr "bogus"`, `... failed to connect to bootstrap peers`) reach the user as tracebacks
naming neither the flag nor a fix. Here a malformed address is an `InitialPeersError` (a
ValueError: the command's argument error, exit code 2) and a failed start a `DHTJoinError`
(exit code 1). No heavy imports: the commands check their flags before torch and hivemind load.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import re
import sys
from pathlib import Path
from typing import Iterable, Iterator, Sequence

FLAG = "--initial-peers"
EXAMPLE = "/ip4/203.0.113.5/tcp/31337/p2p/12D3KooW..."
HINT = f"pass one printed by `swarm dht`, e.g. {EXAMPLE}"


class InitialPeersError(ValueError):
    """An initial peer that is not a multiaddr with a peer id; the message is one line."""


class DHTJoinError(RuntimeError):
    """A DHT node could not start or reach any initial peer; the message is one line."""


@functools.cache
def _multiaddr_class() -> type:
    """The parser hivemind uses: the `multiaddr` package where installed, else hivemind's copy of
    it (hivemind.utils.multiaddr, self-contained), loaded without importing hivemind itself,
    which takes torch and seconds: a wrong flag fails instantly."""
    with contextlib.suppress(ImportError):
        from multiaddr import Multiaddr

        return Multiaddr
    spec = importlib.util.find_spec("hivemind")
    folder = Path(spec.origin).parent / "utils" / "multiaddr" if spec and spec.origin else None
    if "hivemind" in sys.modules or folder is None or not (folder / "__init__.py").is_file():
        from hivemind.utils.multiaddr import Multiaddr

        return Multiaddr
    name = "swarm._hivemind_multiaddr"
    package = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                     submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(package)
    sys.modules[name] = module  # its relative imports (codecs, protocols) look it up there
    package.loader.exec_module(module)
    return module.Multiaddr


def check_initial_peer(maddr: str) -> str:
    """`maddr` if hivemind can bootstrap from it (a multiaddr ending in /p2p/<peer id>), else
    an InitialPeersError saying what is wrong."""
    try:
        parsed = _multiaddr_class()(maddr)
    except Exception as e:  # noqa: BLE001 - the parser's errors are ValueErrors, TypeErrors, LookupErrors
        message = getattr(e, "message", None) or str(e)
        protocol = getattr(e, "protocol", None)
        reason = one_line(f"{protocol}: {message}" if protocol else message[:1].lower() + message[1:])
        raise InitialPeersError(f"{FLAG} {maddr!r} is not a multiaddr ({reason}); {HINT}") from None
    if parsed.protocols()[-1].name != "p2p":
        raise InitialPeersError(f"{FLAG} {maddr!r} has no peer id: it must end in /p2p/<peer id>; {HINT}")
    return maddr


def parse_initial_peers(values: Iterable[str]) -> list[str]:
    """The multiaddrs in `values` (each one or several, comma-separated), each checked by
    `check_initial_peer`; a value that names none is an InitialPeersError too."""
    peers = []
    for value in values:
        found = [item.strip() for item in str(value).split(",") if item.strip()]
        if not found:
            raise InitialPeersError(f"{FLAG} {value!r} names no multiaddr; {HINT}")
        peers.extend(check_initial_peer(item) for item in found)
    return peers


def initial_peers_argument(parser, values: Iterable[str] | None) -> list[str]:
    """`parse_initial_peers` for a command: a bad value ends it as an argument error
    (`parser.error`: usage, then the one line, exit code 2)."""
    try:
        return parse_initial_peers(values or [])
    except InitialPeersError as e:
        parser.error(str(e))


def join_error(error: BaseException, initial_peers: Sequence[str]) -> DHTJoinError:
    """hivemind's failure to start a DHT node, as one line saying what to check."""
    reason = one_line(str(error))
    reason = re.sub(r"^Daemon failed to start: (\d{4}/\d\d/\d\d \d\d:\d\d:\d\d )?", "", reason)  # p2pd's log stamp
    timed_out = re.search(r"failed to start in ([\d.]+) seconds", reason)
    unreachable = "failed to connect to bootstrap peers" in reason or "none of the initial_peers responded" in reason
    if initial_peers and (unreachable or timed_out):
        within = f" in {float(timed_out.group(1)):g} s" if timed_out else ""
        return DHTJoinError(f"cannot reach any of {FLAG} ({', '.join(initial_peers)}){within}: is `swarm dht` "
                            "running there, and is its port open from this machine?")
    if "failed to parse multiaddr" in reason or "invalid p2p multiaddr" in reason:
        return DHTJoinError(f"{FLAG} rejected by the DHT daemon ({reason}); {HINT}")
    return DHTJoinError(f"cannot start a DHT node: {reason or type(error).__name__}")


@contextlib.contextmanager
def explained_join(initial_peers: Sequence[str]) -> Iterator[None]:
    """`with explained_join(peers): dht = hivemind.DHT(initial_peers=peers, start=True, ...)`:
    a failure to start becomes `join_error`'s DHTJoinError (the original chained to it)."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - P2PDaemonError, RuntimeError, timeouts: all are failures to join
        raise join_error(e, initial_peers) from e


@contextlib.contextmanager
def exit_if_not_joined(prog: str) -> Iterator[None]:
    """For a command's main: a DHTJoinError ends it with `PROG: error: <the line>` on stderr
    and exit code 1, no traceback."""
    try:
        yield
    except DHTJoinError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def one_line(text: str) -> str:
    return " ".join(text.split())
