"""`swarm api`: serve an OpenAI-compatible HTTP API (chat and text completions, streaming) for a
swarm's models and your adapters.

The story: parse the flags (instantly: nothing heavy is imported before), join the swarm and
load each model and adapter, bind the port, print the ready line, serve with uvicorn until
SIGINT/SIGTERM, leave the swarm.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
from pathlib import Path

from swarm.initial_peers import exit_if_not_joined, initial_peers_argument
from swarm.membership.join_flag import add_join_argument, join_argument
from swarm.named_models import DEFAULT_MODEL  # no torch: --help and argument errors stay instant

from ..swarm_options import add_verify

READY_LINE = "swarm api: serving {models} at {url}"

EPILOG = """\
example:
  swarm api --initial-peers $(head -1 dht.txt) --adapter chat=runs/chat/adapter --port 8000
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi!"}]}'

Any OpenAI client works: base_url="http://127.0.0.1:8000/v1", any api_key.
"""


def adapter_argument(text: str) -> tuple[str, str]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    if not Path(folder).is_dir():
        raise argparse.ArgumentTypeError(f"{folder} is not a folder (an adapter as `swarm finetune` writes it)")
    return name, folder


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swarm api",
        description="Serve an OpenAI-compatible HTTP API (/v1/models, /v1/chat/completions, /v1/completions, "
                    "streaming over SSE) for models whose blocks are served by peers of the swarm.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--initial-peers", action="append", required=True, metavar="MULTIADDR",
                        help="a DHT multiaddr, as printed by `swarm dht` (repeatable or comma-separated)")
    add_join_argument(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default 8000)")
    parser.add_argument("--model", action="append", metavar="NAME",
                        help=f"a model to serve: name, HF folder or .gguf (repeatable; default {DEFAULT_MODEL})")
    parser.add_argument("--adapter", action="append", type=adapter_argument, default=[], metavar="NAME=DIR",
                        help="also serve DIR (a `swarm finetune` adapter, or a PEFT folder) as model NAME over "
                             "the --model it was trained on (repeatable)")
    parser.add_argument("--default-max-tokens", type=int, default=256, metavar="N",
                        help="completion length when a request sets no max_tokens (default 256)")
    parser.add_argument("--codec", default="raw", choices=["raw", "float16", "bfloat16", "int8", "int8_blockwise"],
                        help="how activations travel between this server and the peers (default raw: exact)")
    add_verify(parser)
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    args.model = args.model or [DEFAULT_MODEL]
    names = args.model + [name for name, _ in args.adapter]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        parser.error(f"model names must be unique; {', '.join(repeated)} is given twice")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in [0, 65535], got {args.port}")
    if args.default_max_tokens < 1:
        parser.error(f"--default-max-tokens must be at least 1, got {args.default_max_tokens}")


def listening_socket(host: str, port: int) -> socket.socket:
    """Bound and listening before the ready line: a client that reads it can connect at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    peers = initial_peers_argument(parser, args.initial_peers)
    join = join_argument(parser, args.join)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        sock = listening_socket(args.host, args.port)  # first: a taken port fails before seconds of loading
    except OSError as e:
        print(f"swarm api: error: cannot listen on {args.host}:{args.port}: {e.strerror}", file=sys.stderr)
        return 2

    import uvicorn

    from client import SwarmSettings

    from .app import ServerOptions, create_app
    from .catalog import load_catalog

    with exit_if_not_joined(parser.prog):
        catalog = load_catalog(peers, args.model, dict(args.adapter),
                               SwarmSettings(codec=args.codec, verify=args.verify, join=join))
    try:
        from swarm.dashboard import routes as dashboard_routes
        from swarm.membership import trust_from

        app = create_app(catalog, ServerOptions(default_max_tokens=args.default_max_tokens),
                         extra_routes=dashboard_routes(catalog.dht, api=True, trust=trust_from(join)))
        host, port = sock.getsockname()[:2]
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"
        print(READY_LINE.format(models=", ".join(catalog.served), url=url), flush=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5))
        # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again under the
        # handlers it found: these, so that we go on to leave the swarm and exit 0.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: None)
        server.run(sockets=[sock])
    finally:
        catalog.close()
    return 0


if __name__ == "__main__":  # `python -m client.apps.api.cli`: the command before `pip install -e .` registers it
    from swarm.cli import die_with_parent

    die_with_parent()
    sys.exit(main())
