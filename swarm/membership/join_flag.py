"""--join CREDENTIAL, as `swarm peer` and every client command take it: the flag, and its
check before anything heavy loads (a bad credential ends the command with one line)."""

from __future__ import annotations

import argparse

JOIN_HELP = ("join a private swarm as a member: the credential file, or the swarmlm-member: token, that "
             "`swarm invite NAME` made (default: an open swarm)")


def add_join_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup, help: str = JOIN_HELP) -> None:
    parser.add_argument("--join", metavar="CREDENTIAL", help=help)


def join_argument(parser: argparse.ArgumentParser, value: str | None) -> str | None:
    """`value` if it names a usable credential (or is None); else `parser.error` with the reason."""
    from . import CredentialError, trust_from

    try:
        trust_from(value)
    except CredentialError as e:
        parser.error(str(e))
    return value
