"""`swarm revoke`: lock a member out of a private swarm.

Adds every credential issued to NAME to the swarm's revocation list. The swarm's `swarm dht
--private` node publishes the list within seconds (or this command does, with
--initial-peers); members refuse NAME's records and calls within one record lifetime.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from ..initial_peers import explained_join, exit_if_not_joined, initial_peers_argument
from .credential import CredentialError
from .identity import IdentityError, SwarmIdentity, add_swarm_dir_argument


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="swarm revoke",
        description="Revoke every credential issued to NAME: members stop using its peers and refuse its calls "
        "within one record lifetime (30 s). Nobody else is touched. A revoked name stays revoked.",
        epilog="example:\n  swarm revoke alice --initial-peers $(head -1 dht.txt)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="the member to lock out, as given to `swarm invite`")
    add_swarm_dir_argument(parser)
    parser.add_argument("--initial-peers", action="append", default=[], metavar="MULTIADDR",
                        help="also publish the list now through this DHT node (default: leave it to the "
                        "`swarm dht --private` node that uses --swarm-dir, which republishes it every few seconds)")
    args = parser.parse_args(argv)
    peers = initial_peers_argument(parser, args.initial_peers)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        identity = SwarmIdentity.load(args.swarm_dir)
        identity.revoke(args.name)
    except (IdentityError, CredentialError) as e:
        print(f"swarm revoke: error: {e}", file=sys.stderr)
        return 1
    print(f"revoked {args.name!r} in swarm {identity.swarm_id}")
    if not peers:
        return 0
    import hivemind

    from .published import publish_revocations

    with exit_if_not_joined(parser.prog), explained_join(peers):
        dht = hivemind.DHT(initial_peers=peers, client_mode=True, start=True)
    try:
        stored = publish_revocations(dht, identity)
    finally:
        dht.shutdown()
    print("published the revocation list" if stored else
          "the DHT did not store the list now; the `swarm dht --private` node publishes it")
    return 0
