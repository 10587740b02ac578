"""The `swarm` command: one entry point, one subcommand per job.

Subcommands live with the code they drive (a peer's flags in peer/, the client's in
client/) and declare themselves as entry points of the group `swarmlm.commands` in
pyproject.toml, so the core names none of them. A subcommand's module is imported only when
it runs, and `swarm --help` reads each one's summary off its module docstring without
importing it: `swarm dht` does not pay for the client, and `--help` starts instantly.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points

from swarm.parent_death import signal_on_parent_death

COMMAND_GROUP = "swarmlm.commands"


@dataclass(frozen=True)
class Command:
    name: str
    target: str  # "module:function", the entry point's value

    @property
    def module(self) -> str:
        return self.target.partition(":")[0]

    def summary(self) -> str:
        """The first line of the module's docstring, after its "`swarm NAME`: " label."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or spec.origin is None:
            return ""
        with open(spec.origin, encoding="utf-8") as source:
            doc = ast.get_docstring(ast.parse(source.read())) or ""
        first = doc.split("\n\n", 1)[0].replace("\n", " ")
        if first.startswith("`swarm ") and ": " in first:
            first = first.split(": ", 1)[1]
        return first.split(". ", 1)[0].rstrip(".")

    def load(self):
        module_name, _, function = self.target.partition(":")
        return getattr(importlib.import_module(module_name), function or "main")


# How idle OpenMP workers wait, for every `swarm` command. Between steps they sleep instead of
# spinning: a swarm on one machine runs its peers one after another, and spinning threads of the
# peer that just answered steal the cores the next peer computes on (measured: decode 20-30%
# slower). But not between the ops of one step: a worker that sleeps after every op is woken
# hundreds of times a decode step, and a lone session's step on two threads gained only 10% over
# one (local transformers gains 35-55%). A short spin (a few thousand pause loops, well under a
# millisecond) bridges the gap between ops and ends before the next peer's turn.
OPENMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "3000"}


def commands() -> dict[str, Command]:
    return {ep.name: Command(ep.name, ep.value) for ep in entry_points(group=COMMAND_GROUP)}


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


def die_with_parent() -> None:
    """Get SIGTERM when the starting process dies, even by SIGKILL, so a killed demo or test
    run leaves no peers behind (they shut down cleanly on SIGTERM)."""
    parent = os.environ.pop(PARENT_PID_ENV, None)
    if parent and not signal_on_parent_death(int(parent)):  # the parent died before we armed the signal
        sys.exit(1)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    table = commands()
    if not table:
        print(f"swarm: no subcommands are installed (entry points {COMMAND_GROUP!r}); install the project: "
              "pip install -e .", file=sys.stderr)
        return 2
    if not argv or argv[0] in ("-h", "--help", "help"):
        width = max(map(len, table))
        lines = "\n".join(f"  {name:<{width}}  {command.summary()}" for name, command in table.items())
        print(USAGE.format(commands=lines))
        return 0
    die_with_parent()
    name, rest = argv[0], argv[1:]
    if name not in table:
        print(f"swarm: unknown command {name!r}; commands: {', '.join(table)}", file=sys.stderr)
        return 2
    for key, value in OPENMP_ENV.items():  # before torch loads OpenMP, which reads them once
        os.environ.setdefault(key, value)
    return table[name].load()(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
