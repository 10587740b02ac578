"""`swarm invite`: issue a member credential of a private swarm.

Writes one PEM file (the member's key, its certificate and the swarm's CA certificate), or
prints it as a one-line token with --token. The member passes either to `--join`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from .credential import CredentialError
from .identity import DEFAULT_DAYS, IdentityError, SwarmIdentity, add_swarm_dir_argument


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="swarm invite",
        description="Issue a credential that lets NAME join the private swarm of --swarm-dir: its peers serve, and "
        "its clients use, the members' peers. Hand it over privately: it is the member's secret.",
        epilog="examples:\n  swarm invite alice --out alice.pem\n  swarm invite bob --token --days 30",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="the member's name (letters, digits, '.', '_', '-'); `swarm revoke NAME` "
                        "locks out every credential issued to it")
    add_swarm_dir_argument(parser)
    parser.add_argument("--out", metavar="FILE", help="write the credential to FILE (mode 0600; default: NAME.pem)")
    parser.add_argument("--token", action="store_true",
                        help="print the credential as one `swarmlm-member:...` line instead of writing a file")
    parser.add_argument("--days", type=int, default=DEFAULT_DAYS, help="days the credential is valid "
                        "(default: %(default)s)")
    args = parser.parse_args(argv)
    out = args.out or f"{args.name}.pem"
    if not args.token and os.path.exists(out):  # checked before a credential is issued and recorded
        print(f"swarm invite: error: --out {out} exists; pick another file", file=sys.stderr)
        return 1
    try:
        credential = SwarmIdentity.load(args.swarm_dir).invite(args.name, args.days)
    except (IdentityError, CredentialError) as e:
        print(f"swarm invite: error: {e}", file=sys.stderr)
        return 1
    if args.token:
        print(credential.token())
        return 0
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        print(f"swarm invite: error: --out {out}: {e.strerror}; pick another file", file=sys.stderr)
        return 1
    with os.fdopen(fd, "w") as f:
        f.write(credential.to_pem())
    print(f"credential of {args.name!r} for swarm {credential.swarm_id} written to {out}; "
          f"the member joins with --join {out}")
    return 0
