"""`swarm peer`: serve a span of a model's blocks to the swarm.

Prints exactly one line on stdout once the peer serves and is announced:
``peer ready: blocks START:END of MODEL at HOST:PORT (model_id MODEL_ID)``; logs go to stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from swarm.dtypes import COMPUTE_DTYPES
from swarm.initial_peers import initial_peers_argument
from swarm.named_models import DEFAULT_MODEL  # no torch: --help stays instant

from .config import PeerConfig, PeerLimits, PeerStartError
from .lying import check_lie_spec

MB = 1024 * 1024

DESCRIPTION = """\
Serve blocks START..END-1 of a model to the swarm (--blocks), or N blocks where the swarm
needs them most (--num-blocks), so that clients can run (and fine-tune) the model through
your machine together with others. Your peer loads only the blocks it serves, answers
clients over gRPC and announces itself in the swarm's DHT. Stop it with Ctrl-C: it
withdraws its announcement and closes open sessions first.
"""

EPILOG = """\
examples:
  # a local test swarm: start a DHT node, then serve the first 15 of the default model's 30 blocks
  swarm dht --host 127.0.0.1 --maddr-file dht.txt
  swarm peer --initial-peers $(head -1 dht.txt) --blocks 0:15

  # a member of a private swarm (see `swarm init --help`)
  swarm peer --join alice.pem --initial-peers $(head -1 dht.txt) --blocks 0:15

  # let the peer choose: 10 blocks where the swarm is weakest, moving later if needed
  swarm peer --initial-peers $(head -1 dht.txt) --num-blocks 10

  # a desktop GPU behind a router that forwards port 31330 to it
  swarm peer --initial-peers /ip4/1.2.3.4/tcp/31337/p2p/12D3Koo... --blocks 15:30 \\
      --port 31330 --public-host MY.PUBLIC.IP --device cuda --cache-tokens 32768

memory: the weights take about (blocks served / all blocks) x model size in --dtype; the
KV cache takes up to --cache-tokens tokens on top (the peer logs how many MiB that is).
"""


def _span(text: str) -> tuple[int, int]:
    start, sep, end = text.partition(":")
    if not sep or not start.strip().isdigit() or not end.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not START:END, e.g. 0:15 for blocks 0 to 14")
    return int(start), int(end)


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def _non_negative(kind):
    def parse(text: str):
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value
    return parse


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535, got {port}")
    return port


def build_parser() -> argparse.ArgumentParser:
    # Defaults come from the settings themselves (peer/config.py): one place says them.
    defaults, limits = PeerConfig(model=DEFAULT_MODEL), PeerLimits()
    p = argparse.ArgumentParser(prog="swarm peer", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what to serve")
    what.add_argument("--model", default=DEFAULT_MODEL,
                      help="model to serve: a known name, a local Hugging Face folder (config.json + safetensors) "
                      "or a .gguf file (default: %(default)s)")
    span = what.add_mutually_exclusive_group(required=True)
    span.add_argument("--blocks", type=_span, metavar="START:END",
                      help="the blocks to serve, START included, END excluded: 0:15 serves blocks 0..14 "
                      "(the default model has 30 blocks)")
    span.add_argument("--num-blocks", type=_positive(int), metavar="N",
                      help="serve N consecutive blocks where the swarm needs them most: blocks nobody serves "
                      "first, then those with the least total throughput; the peer may move later "
                      "(see --balance-period)")
    what.add_argument("--balance-period", type=_non_negative(float), default=defaults.balance_period, metavar="SECONDS",
                      help="with --num-blocks: how often to check whether moving to other blocks would "
                      "strengthen the swarm's weakest point (an uncovered block, or at least 20%% more "
                      "throughput there), and move; 0 never moves (default: %(default)s)")

    net = p.add_argument_group("network")
    net.add_argument("--initial-peers", action="append", default=[], metavar="MULTIADDR",
                     help="a DHT node to join, as printed by `swarm dht` (/ip4/.../tcp/.../p2p/...); repeat the "
                     "flag or separate several with commas")
    net.add_argument("--host", default=defaults.host,
                     help="address to listen on for clients (default: %(default)s, all interfaces; 127.0.0.1 "
                     "keeps the peer local to this machine)")
    net.add_argument("--port", type=_port, default=defaults.port,
                     help="port to listen on (default: %(default)s, any free port)")
    net.add_argument("--public-host", metavar="HOST",
                     help="address clients should dial, announced in the DHT; set it behind NAT or a proxy "
                     "(default: --host, or 127.0.0.1 when listening on all interfaces)")
    net.add_argument("--public-port", type=_port, metavar="PORT",
                     help="port clients should dial, if it differs from the bound one (port forwarding, proxy)")
    net.add_argument("--join", metavar="CREDENTIAL",
                     help="serve a private swarm as a member: the credential file or swarmlm-member: token that "
                     "`swarm invite NAME` made; the peer signs its records, serves TLS and answers only members "
                     "(default: an open swarm)")
    net.add_argument("--announce-period", type=_positive(float), default=defaults.announce_period, metavar="SECONDS",
                     help="how often to refresh the DHT announcement; it expires after 3 periods "
                     "(default: %(default)s)")

    compute = p.add_argument_group("compute and memory")
    compute.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    compute.add_argument("--dtype", default="auto", choices=["auto", *COMPUTE_DTYPES],
                         help="weights and compute dtype (default: auto = bfloat16 on cuda, float32 on cpu)")
    compute.add_argument("--quant", default=defaults.quant, choices=["none", "int8", "nf4"],
                         help="store the blocks' linear weights quantized, so the same memory holds more "
                         "blocks; compute, norms and the KV cache stay in --dtype. none: as --dtype. int8: 8 bits "
                         "with a scale per 64 inputs, nothing to install (on cuda bitsandbytes' LLM.int8 when "
                         "installed): about half of bfloat16 or a quarter of float32 per block; on the default "
                         "model 90%% of greedy tokens as in float32, CPU steps ~1.5x slower (weights are "
                         "dequantized at each use). nf4: 4-bit NormalFloat, a quarter of bfloat16, less accurate "
                         "(33%% of greedy tokens); needs bitsandbytes: pip install 'swarmlm[quant]'. The peer "
                         "announces its choice; clients may refuse quantized peers (default: %(default)s)")
    compute.add_argument("--cache-tokens", type=int, default=defaults.cache_tokens, metavar="TOKENS",
                         help="KV-cache budget in tokens, shared by all inference sessions: a session takes "
                         "batch x max_length tokens; one that does not fit is refused (default: %(default)s)")
    compute.add_argument("--max-batch-size", type=_positive(int), default=limits.max_batch_size, metavar="N",
                         help="largest batch a request may send (default: %(default)s)")
    compute.add_argument("--max-seq-length", type=_positive(int), default=limits.max_seq_length, metavar="TOKENS",
                         help="most tokens per sequence in a request or session (default: %(default)s)")
    compute.add_argument("--max-message-mb", type=_positive(int), default=limits.max_message_bytes // MB, metavar="MB",
                         help="largest gRPC message sent or received (default: %(default)s)")
    compute.add_argument("--session-timeout", type=_positive(float), default=defaults.session_timeout, metavar="SECONDS",
                         help="close an inference session idle this long, freeing its cache (default: %(default)s)")
    compute.add_argument("--backward-memory", type=int, default=defaults.backward_memory_mb, metavar="MB",
                         help="memory for activations kept from a training Forward until its Backward, so "
                         "Backward need not recompute the forward pass (training steps ~1.3x faster); kept at "
                         "most 2 minutes; 0: always recompute (default: %(default)s)")
    compute.add_argument("--threads", type=_positive(int), metavar="N",
                         help="CPU threads for compute (default: torch's choice, one per core)")
    compute.add_argument("--decode-threads", type=_positive(int), metavar="N",
                         help="CPU threads for decode steps (one new token per sequence): small memory-bound "
                         "ops that gain little from threads; when several peers share one machine, give each 1 "
                         "(default: as --threads)")
    compute.add_argument("--join-wait-ms", type=float, default=defaults.join_wait_ms, metavar="MS",
                         help="while other sessions are generating here, a decode step waits up to this long "
                         "for theirs, so that they run as one forward pass (a lone session never waits); "
                         "0: never wait (default: %(default)s)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="stderr log level (default: %(default)s)")
    # For tests of verification only, so not in --help: a peer that returns wrong outputs.
    p.add_argument("--lie", type=_lie_spec, help=argparse.SUPPRESS)
    p.add_argument("--lie-scale", type=_positive(float), default=0.5, help=argparse.SUPPRESS)
    p.add_argument("--lie-seed", type=int, default=0, help=argparse.SUPPRESS)
    return p


def _lie_spec(text: str) -> str:
    try:
        return check_lie_spec(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None


def _fail(message: str) -> int:
    print(f"swarm peer: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    initial_peers = initial_peers_argument(parser, args.initial_peers)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.cache_tokens < 0:
        return _fail(f"--cache-tokens must be >= 0, got {args.cache_tokens}")
    if args.backward_memory < 0:
        return _fail(f"--backward-memory must be >= 0 MB, got {args.backward_memory}")
    if args.public_host in ("0.0.0.0", "::"):
        return _fail(f"--public-host {args.public_host} means 'all interfaces'; give an address clients can dial")

    from swarm.membership import CredentialError, trust_from

    try:
        trust = trust_from(args.join)
    except CredentialError as e:
        return _fail(str(e))

    import torch  # heavy: after --help and argument errors

    from swarm.checkpoint import CheckpointError, resolve_checkpoint
    from swarm.loading import check_span
    from swarm.models import get_family

    if args.threads:
        torch.set_num_threads(args.threads)  # also for loading; compute threads are set per job
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except RuntimeError:
        return _fail(f"--device {device!r} is not a device; use cpu, cuda or cuda:N")
    if parsed.type not in ("cpu", "cuda"):
        return _fail(f"--device {device!r}: only cpu and cuda are supported")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        return _fail("--device cuda: CUDA is not available on this machine; use --device cpu")
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if parsed.type == "cuda" else "float32")
    from swarm.quant import QuantizationError, check_quant

    try:
        check_quant(args.quant, parsed)
    except QuantizationError as e:
        return _fail(str(e))

    start, end = args.blocks or (0, 0)
    try:
        checkpoint = resolve_checkpoint(args.model)
        num_blocks = get_family(checkpoint.config).num_blocks
        if args.blocks:
            check_span(start, end, num_blocks)
    except (CheckpointError, ValueError) as e:  # SpanError and UnsupportedModelError are ValueErrors
        return _fail(str(e))
    if args.num_blocks and args.num_blocks > num_blocks:
        return _fail(f"--num-blocks {args.num_blocks}: {checkpoint.name} has {num_blocks} blocks; "
                     f"use 1..{num_blocks}")

    config = PeerConfig(
        model=args.model, start=start, end=end,
        initial_peers=initial_peers,
        host=args.host, port=args.port, public_host=args.public_host, public_port=args.public_port,
        device=device, dtype=dtype, quant=args.quant, cache_tokens=args.cache_tokens,
        limits=PeerLimits(max_batch_size=args.max_batch_size, max_seq_length=args.max_seq_length,
                          max_message_bytes=args.max_message_mb * MB),
        session_timeout=args.session_timeout, backward_memory_mb=args.backward_memory,
        threads=args.threads, decode_threads=args.decode_threads, join_wait_ms=max(0.0, args.join_wait_ms),
        announce_period=args.announce_period,
        blocks_wanted=args.num_blocks, balance_period=args.balance_period, trust=trust,
        lie=args.lie, lie_scale=args.lie_scale, lie_seed=args.lie_seed,
    )

    from .server import run_peer

    def ready(line: str) -> None:
        print(line, flush=True)

    try:
        code = run_peer(config, checkpoint, ready)
    except PeerStartError as e:
        print(f"swarm peer: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before serving started (during loading)
        return 130
    # Everything that needs closing is closed (records withdrawn, server stopped, DHT shut
    # down); skip the interpreter's teardown, which spends seconds garbage-collecting torch
    # and transformers objects while a restart or a test waits for the port and the exit.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
