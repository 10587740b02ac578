"""A whole swarm on this machine: one `swarm dht` and a few `swarm peer` processes on
127.0.0.1. Used by `make demo` and the benchmarks.

Every process starts in its own session and is stopped as a process group: hivemind forks
helpers (its p2p daemon) that outlive a plain kill and would keep answering in the DHT.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

from swarm.cli import PARENT_PID_ENV
from swarm.named_models import DEFAULT_MODEL
from swarm.ready_line import PeerReady

READY = re.compile(PeerReady.PATTERN.pattern, re.MULTILINE)  # in the peer's whole stdout


class LocalSwarm:
    """`with LocalSwarm(["0:10", "10:20", "20:30"]) as swarm: swarm.initial_peers`"""

    def __init__(self, spans: list[str], model: str = DEFAULT_MODEL, extra_peer_args: list[str] = (),
                 start_timeout: float = 180.0, dht_initial_peers: list[str] | None = None):
        self.spans, self.model = spans, model
        self.extra_peer_args, self.start_timeout = list(extra_peer_args), start_timeout
        self.logs = Path(tempfile.mkdtemp(prefix="swarmlm-local-"))
        self.procs: list[subprocess.Popen] = []
        # Given: the peers join that DHT instead of a DHT of their own.
        self.initial_peers: list[str] = list(dht_initial_peers or [])
        self.endpoints: list[str] = []
        self.peer_procs: list[subprocess.Popen] = []

    def _spawn(self, name: str, args: list[str]) -> tuple[subprocess.Popen, Path]:
        out = self.logs / f"{name}.out"
        with open(out, "w") as stdout, open(self.logs / f"{name}.err", "w") as stderr:
            # No preexec_fn: it forces fork() of a process that may run gRPC threads, whose
            # fork handlers then break the child. The child arms its own parent-death signal.
            env = {**os.environ, PARENT_PID_ENV: str(os.getpid())}
            proc = self._start([sys.executable, "-m", "swarm.cli", *args], out, out.with_suffix(".err"), stdout,
                               stderr, env)
        self.procs.append(proc)
        return proc, out

    def _start(self, argv: list[str], out: Path, err: Path, stdout, stderr, env: dict[str, str]) -> subprocess.Popen:
        """Starts one process in a session of its own (the tests fork theirs from a preloaded
        interpreter instead: tests/zygote.py)."""
        return subprocess.Popen(argv, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, start_new_session=True,
                                env=env)

    def _decode_threads(self) -> list[str]:
        """Peers on one machine take turns at each decode step; one thread each keeps their idle
        OpenMP workers off the core the busy peer needs (peer/runtime.py has the figures; a
        pass holding every active session's step still gets every thread)."""
        if len(self.spans) < 2 or "--decode-threads" in self.extra_peer_args:
            return []
        return ["--decode-threads", "1"]

    def _wait(self, proc: subprocess.Popen, out: Path, pattern: re.Pattern, what: str) -> re.Match:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            match = pattern.search(out.read_text())
            if match:
                return match
            if proc.poll() is not None:
                err = (out.with_suffix(".err")).read_text()[-2000:]
                raise RuntimeError(f"{what} exited with code {proc.returncode}:\n{err}")
            time.sleep(0.1)
        raise TimeoutError(f"{what} did not start within {self.start_timeout:.0f} s; logs in {self.logs}")

    def __enter__(self) -> "LocalSwarm":
        try:
            if not self.initial_peers:
                dht, out = self._spawn("dht", ["dht", "--host", "127.0.0.1"])
                maddr = re.compile(r"(/ip4/127\.0\.0\.1/\S+)")
                self.initial_peers = [self._wait(dht, out, maddr, "swarm dht").group(1)]
            peers = []
            for i, span in enumerate(self.spans):
                peers.append(self._spawn(f"peer{i}", [
                    "peer", "--model", self.model, "--blocks", span, "--host", "127.0.0.1",
                    "--initial-peers", self.initial_peers[0], *self._decode_threads(), *self.extra_peer_args,
                ]))
            for i, (proc, out) in enumerate(peers):
                self.endpoints.append(PeerReady.parse(self._wait(proc, out, READY, f"peer {self.spans[i]}").group(0)).endpoint)
            self.peer_procs = [proc for proc, _ in peers]  # in the order of `spans` and `endpoints`
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.stop()
        if exc_type is None:
            shutil.rmtree(self.logs, ignore_errors=True)  # kept after a failure, for its logs

    def stop(self) -> None:
        # SIGTERM to each leader only: a peer shuts its own DHT process down after withdrawing
        # its records; signalling the group would kill that process first and stall withdraw.
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc, signal.SIGKILL)  # whatever the group left behind
        self.procs.clear()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
