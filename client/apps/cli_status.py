"""`swarm status`: which peers serve which blocks, and which blocks nobody serves."""

from __future__ import annotations

import argparse
import logging

from swarm.initial_peers import explained_join, exit_if_not_joined, initial_peers_argument
from swarm.membership.join_flag import add_join_argument, join_argument
from swarm.named_models import DEFAULT_MODEL  # no torch: --help and argument errors stay instant


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarm status",
                                     description="Show, per block of a model, the peers serving it.")
    parser.add_argument("--initial-peers", action="append", required=True, metavar="MULTIADDR",
                        help="a DHT multiaddr, as printed by `swarm dht` (repeatable)")
    add_join_argument(parser)
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model name, HF folder or .gguf (default {DEFAULT_MODEL})")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    peers = initial_peers_argument(parser, args.initial_peers)
    join = join_argument(parser, args.join)
    logging.basicConfig(level=logging.WARNING)
    import hivemind

    from swarm.checkpoint import config_fingerprint, resolve_checkpoint
    from swarm.flags import count_flags, flags_key
    from swarm.models import get_family
    from swarm.membership import trust_from
    from swarm.registry import fetch_span_records, make_model_id, peers_by_id

    from client.routing import format_blocks

    checkpoint = resolve_checkpoint(args.model)
    num_blocks = get_family(checkpoint.config).num_blocks
    model_id = make_model_id(checkpoint.name, config_fingerprint(checkpoint.config))
    with exit_if_not_joined(parser.prog), explained_join(peers):
        dht = hivemind.DHT(initial_peers=peers, client_mode=True, start=True)
    try:
        records = fetch_span_records(dht, model_id, num_blocks, trust=trust_from(join))
        flags = count_flags(model_id, dht.get(flags_key(model_id), latest=True))
    finally:
        dht.shutdown()
    print(f"model {model_id}: {num_blocks} blocks")

    def relay_hosts(peer) -> str:
        return ", ".join(maddr.split("/")[2] for maddr in peer.relays)

    for peer in sorted(peers_by_id(records).values(), key=lambda r: (r.start, r.end)):
        reach = f"relayed via {relay_hosts(peer)}" if peer.relayed else "direct"
        if peer.peer_id in flags:  # clients that verify caught it returning wrong outputs (client/verify.py)
            reach += f"  FLAGGED by {flags[peer.peer_id]} client(s): wrong outputs"
        print(f"  peer {peer.peer_id[:16]:16}  blocks {peer.start:>3}:{peer.end:<3}  {peer.endpoint:21}  "
              f"{peer.state.value:8} {peer.throughput:8.1f} tok/s  {peer.dtype:8} cache free {peer.cache_tokens_free}  "
              f"{reach}")
    missing = [i for i, rs in records.items() if not rs]
    if records.private_swarms:
        swarms = ", ".join(sorted(records.private_swarms))
        print(f"(also peers of private swarm {swarms}: see them with --join CREDENTIAL)")
    if missing:
        print(f"UNCOVERED blocks: {format_blocks(missing)}")
        return 1
    print("all blocks covered")
    return 0
