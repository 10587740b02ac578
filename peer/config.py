"""What a peer is told to do: the settings the CLI parses (their defaults are the CLI's),
and the error for settings it cannot honour.

Kept free of heavy imports so `swarm peer --help` and argument errors are instant.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from swarm.membership import Trust


@dataclass(frozen=True)
class PeerLimits:
    """Per-request limits the service enforces before any compute."""

    max_batch_size: int = 64
    max_seq_length: int = 4096
    max_message_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True)
class PeerConfig:
    model: str
    start: int = 0  # the span [start, end), unless blocks_wanted is set
    end: int = 0
    initial_peers: list[str] = field(default_factory=list)
    host: str = "0.0.0.0"
    port: int = 0
    public_host: str | None = None  # None: host, or 127.0.0.1 when host listens on all interfaces
    public_port: int | None = None  # None: the bound port
    device: str = "cpu"
    dtype: str = "float32"  # float32 | bfloat16 | float16, already resolved from "auto"
    quant: str = "none"  # none | int8 | nf4: how the blocks' Linear weights are stored (swarm.quant)
    cache_tokens: int = 8192
    limits: PeerLimits = field(default_factory=PeerLimits)
    session_timeout: float = 300.0
    threads: int | None = None  # torch threads for compute; None: torch's choice
    decode_threads: int | None = None  # for decode steps (one token per sequence); None: as `threads`
    # Ms a decode step may wait for the steps of the other sessions generating here, to run with
    # them in one forward pass (peer/runtime.py); a lone session never waits. 0: never wait.
    join_wait_ms: float = 100.0
    backward_memory_mb: int = 1024  # activations kept from Forward for its Backward (peer/kept_graphs.py)
    announce_period: float = 10.0
    # --num-blocks: the peer chooses where to serve this many blocks (start/end ignored). Not the
    # model's num_blocks (its total) nor a span's length.
    blocks_wanted: int | None = None
    balance_period: float = 60.0  # with blocks_wanted: seconds between checks whether to move; 0: never move
    # Tests of verification only (peer/lying.py): when to return perturbed outputs, how much, seed.
    lie: str | None = None
    lie_scale: float = 0.5
    lie_seed: int = 0
    # --join: this member's trust in a private swarm (signed records, TLS + member tokens); None: an open swarm.
    trust: Trust | None = None

    @property
    def announced_host(self) -> str:
        if self.public_host:
            return self.public_host
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host


def format_endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class PeerStartError(RuntimeError):
    """The peer cannot start as configured; the message says what to change."""
