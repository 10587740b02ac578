"""Options every client command shares about how it treats the swarm's peers."""

from __future__ import annotations

import argparse


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction between 0 and 1, e.g. 0.05")
    return value


def add_verify(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verify", type=_fraction, default=0.0, metavar="FRACTION",
                        help="redo this fraction of each peer's work on another peer serving the same blocks, "
                        "and route around peers caught returning wrong outputs (their first call is always "
                        "checked); costs about that fraction more compute in the swarm (default 0: trust peers)")
