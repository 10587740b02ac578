"""`swarm init`: create the identity of a private swarm (its certificate authority).

Prints the swarm id. Then invite members with `swarm invite NAME` and run the swarm's DHT
node with `swarm dht --private` (which also creates the identity when it is missing).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .identity import IdentityError, SwarmIdentity, add_swarm_dir_argument

EPILOG = """\
a private swarm, start to finish:
  swarm init                                   # once: the swarm's CA in ~/.config/swarmlm/swarm
  swarm dht --private --maddr-file dht.txt     # the DHT node; republishes the revocation list
  swarm invite alice --out alice.pem           # a credential per member (file, or --token)
  swarm peer --join alice.pem --initial-peers $(head -1 dht.txt) --blocks 0:30
  swarm generate --join alice.pem --initial-peers $(head -1 dht.txt) "Hello"
  swarm revoke alice                           # alice is out within one record lifetime (30 s)
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="swarm init", description="Create the identity of a private swarm: a "
                                     "certificate authority whose key admits members. Keep --swarm-dir secret.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_swarm_dir_argument(parser)
    args = parser.parse_args(argv)
    try:
        identity = SwarmIdentity.create(args.swarm_dir)
    except (IdentityError, OSError) as e:
        print(f"swarm init: error: {e}", file=sys.stderr)
        return 1
    print(f"private swarm {identity.swarm_id} created in {identity.folder}")
    print(f"next: swarm invite NAME --swarm-dir {identity.folder}; swarm dht --private --swarm-dir {identity.folder}")
    return 0
