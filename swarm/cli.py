"""The `swarm` command: one entry point, one subcommand per job.

Subcommands live with the code they drive (a peer's flags in peer/, the client's in
client/); this table only names them, and imports a subcommand's module when it runs, so
`swarm dht` does not pay for importing the client and `swarm --help` starts instantly.
"""

from __future__ import annotations

import importlib
import os
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "dht": ("swarm.dht_node", "run a DHT bootstrap node that peers and clients join"),
    "peer": ("peer.cli", "serve a span of a model's blocks to the swarm"),
    "generate": ("client.apps.cli_generate", "generate text through the swarm"),
    "status": ("client.apps.cli_status", "show which peers serve which blocks"),
    "finetune": ("client.apps.cli_finetune", "train your own adapters through the swarm"),
}

USAGE = """usage: swarm COMMAND [--help] [ARGS...]

Run and fine-tune large language models across a swarm of machines.

commands:
{commands}

A typical swarm on one machine:
  swarm dht --host 127.0.0.1 --maddr-file dht.txt
  swarm peer --initial-peers $(head -1 dht.txt) --blocks 0:15
  swarm peer --initial-peers $(head -1 dht.txt) --blocks 15:30
  swarm generate --initial-peers $(head -1 dht.txt) "What is a swarm?"

Run `swarm COMMAND --help` for a command's options.
"""


# Set by whoever starts us as a child that must not outlive it (LocalSwarm: demo, tests).
PARENT_PID_ENV = "SWARMLM_PARENT_PID"


def _die_with_parent() -> None:
    """Linux: get SIGTERM when the starting process dies, even by SIGKILL, so a killed demo
    or test run leaves no peers behind (they shut down cleanly on SIGTERM)."""
    parent = os.environ.pop(PARENT_PID_ENV, None)
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(parent):  # the parent died before we armed the signal
        sys.exit(1)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        width = max(map(len, COMMANDS))
        lines = "\n".join(f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items())
        print(USAGE.format(commands=lines))
        return 0
    _die_with_parent()
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"swarm: unknown command {name!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    # Before torch loads OpenMP: idle worker threads sleep instead of spinning. A swarm on
    # one machine runs its peers one after another; spinning threads of the peer that just
    # answered steal the cores the next peer computes on (measured: decode 20-30% slower).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
