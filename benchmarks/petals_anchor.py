"""Petals 2.2 on the same machine and model, for the side-by-side table in RESULTS.md.

Drives the anchor scripts in /work/shared/anchors/petals (override with $SWARMLM_ANCHORS):
`setup.sh W` builds Petals 2.2 and a converted copy of the default model in W once (~5 min;
later calls skip finished steps), `run.sh W` starts a DHT + 3 Petals servers on 127.0.0.1
and prints its client benchmark's JSON line, `DELAY_MS=10 run.sh W` does the same with a
10 ms-each-way delay proxy in front of every server (20 ms RTT). `PetalsSwarm` starts run.sh's
swarm and keeps it up while `concurrent_clients.py` runs at several client counts, each bounded.

Petals is a benchmark-only dependency: it lives in its own venv under W
(default ~/.cache/swarmlm-petals, override with $SWARMLM_PETALS_DIR); nothing imports it.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from bounded import signal_group, run_bounded

ANCHORS = Path(os.environ.get("SWARMLM_ANCHORS", "/work/shared/anchors"))
WORKDIR = Path(os.environ.get("SWARMLM_PETALS_DIR", Path.home() / ".cache" / "swarmlm-petals"))
# The client on one thread, as ours in generate.py: on a shared 2-core box a 2-thread torch
# client stalls behind the servers (measured: a local 2-thread decode fell to ~1 tok/s under load).
RUNS = {"loopback": {"CLIENT_THREADS": "1"}, "wan_20ms": {"CLIENT_THREADS": "1", "DELAY_MS": "10"}}


def _last_json_line(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in the output")


def setup(timeout: float = 1800.0, log=print) -> None:
    """Builds Petals 2.2 and the converted model in WORKDIR once; later calls skip finished steps."""
    script = ANCHORS / "petals" / "setup.sh"
    if not script.exists():
        raise FileNotFoundError(f"{script} not found: set SWARMLM_ANCHORS to the folder holding petals/setup.sh")
    WORKDIR.mkdir(parents=True, exist_ok=True)
    log(f"petals: setup in {WORKDIR} (skips finished steps)")
    setup_log = WORKDIR / "setup.log"
    done = run_bounded(["bash", str(script), str(WORKDIR)], timeout)
    setup_log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"Petals setup failed (exit {done.returncode}); see {setup_log}")


def run_petals(timeout: float = 1800.0, log=print) -> dict:
    """Setup if needed, then both runs; each run's JSON line, or {"error": ...} for that run."""
    setup(timeout, log)
    run = ANCHORS / "petals" / "run.sh"
    results: dict = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
                     "workdir": str(WORKDIR)}
    for name, env in RUNS.items():
        log(f"petals: {name} run")
        # run.sh stops the servers it started (each in its own session) when it exits or is stopped.
        done = run_bounded(["bash", str(run), str(WORKDIR)], timeout, env={**os.environ, **env})
        try:
            if done.returncode != 0:
                raise RuntimeError(f"run.sh exited {done.returncode}: {(done.stdout + done.stderr)[-1500:]}")
            results[name] = _last_json_line(done.stdout)
        except (RuntimeError, ValueError) as e:
            results[name] = {"error": str(e)[-1500:]}
    return results


class PetalsSwarm:
    """The swarm `run.sh` starts (DHT + 3 servers x 10 blocks, fp32, CPU, 127.0.0.1), kept up for
    several calls of the anchor's concurrent_clients.py. run.sh's own CLIENTS loop cannot bound a
    client count's time (the script's --timeout is not passed through, so a hung count waits its
    600 s default), hence the same commands from here:

        with PetalsSwarm() as swarm:
            swarm.concurrent_clients(4, tokens=32, prompt_ids="ids.json", timeout=300)

    As in run.sh, every process runs from cwd / (hivemind 1.1.10 puts its handler socket at a
    relative path) and leads its own session, stopped as a group (hivemind's forked p2p daemons
    outlive a plain kill and keep answering in the DHT).
    """

    SPANS = ("0:10", "10:20", "20:30")

    def __init__(self, port: int = int(os.environ.get("PORT", 31400)), start_timeout: float = 300.0, log=print):
        self.port, self.start_timeout, self.log = port, start_timeout, log
        self.python = WORKDIR / "petals-venv" / "bin" / "python"
        self.model_dir = WORKDIR / "smollm2-hf"
        self.logs = WORKDIR / "logs_concurrent"
        self.env = {**os.environ, "PETALS_IGNORE_DEPENDENCY_VERSION": "1",
                    "HIVEMIND_LOGLEVEL": os.environ.get("HIVEMIND_LOGLEVEL", "INFO")}
        self.procs: list[subprocess.Popen] = []
        self.maddr = ""

    def _spawn(self, name: str, args: list[str]) -> Path:
        path = self.logs / f"{name}.log"
        with open(path, "w") as out:
            self.procs.append(subprocess.Popen([str(self.python), *args], stdout=out, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, cwd="/", env=self.env,
                                               start_new_session=True))
        return path

    def _wait_for(self, what: str, ready) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if ready():
                return
            if any(proc.poll() is not None for proc in self.procs):
                break
            time.sleep(1)
        tails = "\n".join(f"{p.name}: {p.read_text()[-800:]}" for p in sorted(self.logs.glob("*.log")))
        raise RuntimeError(f"Petals {what} did not start within {self.start_timeout:.0f} s:\n{tails}")

    def __enter__(self) -> "PetalsSwarm":
        if not self.python.exists():
            raise FileNotFoundError(f"{self.python} not found: run petals_anchor.setup() first")
        shutil.rmtree(self.logs, ignore_errors=True)
        self.logs.mkdir(parents=True)
        try:
            dht_log = self._spawn("dht", ["-m", "petals.cli.run_dht", "--host_maddrs",
                                          f"/ip4/127.0.0.1/tcp/{self.port}", "--identity_path",
                                          str(WORKDIR / "dht.id")])
            pattern = re.compile(rf"/ip4/127\.0\.0\.1/tcp/{self.port}/p2p/[A-Za-z0-9]+")

            def dht_ready() -> bool:
                match = pattern.search(dht_log.read_text())
                self.maddr = match.group(0) if match else ""
                return bool(match)

            self._wait_for("DHT", dht_ready)
            servers = [self._spawn(f"server_{span.replace(':', '_')}", [
                "-m", "petals.cli.run_server", str(self.model_dir), "--dht_prefix", "smollm2",
                "--block_indices", span, "--device", "cpu", "--torch_dtype", "float32",
                "--host_maddrs", "/ip4/127.0.0.1/tcp/0", "--skip_reachability_check", "--throughput", "100",
                "--no_auto_relay", "--initial_peers", self.maddr]) for span in self.SPANS]
            self._wait_for("servers", lambda: all("Started" in log.read_text() for log in servers))
            time.sleep(5)  # as run.sh: the servers' DHT records settle
        except BaseException:
            self.__exit__()
            raise
        self.log(f"petals: swarm up ({self.maddr})")
        return self

    def __exit__(self, *exc) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for proc in self.procs:
                signal_group(proc.pid, sig)
            if sig == signal.SIGTERM:
                time.sleep(3)
        for proc in self.procs:
            proc.wait()
        self.procs.clear()

    def concurrent_clients(self, clients: int, tokens: int, prompt_ids: str, timeout: float) -> dict:
        """The anchor's concurrent_clients.py at one client count: its JSON line. Clients still running
        after `timeout` s (loading and warm-up included) come back as {"finished": k, "hung_after_s": ...}."""
        script = ANCHORS / "concurrent_clients.py"
        cmd = [str(self.python), str(script), "--system", "petals", "--model-dir", str(self.model_dir),
               "--peer", self.maddr, "--clients", str(clients), "--tokens", str(tokens),
               "--prompt-ids", str(Path(prompt_ids).resolve()), "--timeout", str(timeout)]
        out, err = self.logs / f"clients_{clients}.out", self.logs / f"clients_{clients}.log"
        # Files, not pipes: a client it killed leaves forked helpers (hivemind's DHT process, p2p
        # daemon) that hold inherited pipes open, and would keep answering in the DHT through the
        # next count; they go with the group once the script is done.
        with open(out, "w") as stdout, open(err, "w") as stderr:
            proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, cwd="/",
                                    env=self.env, start_new_session=True)
        try:
            proc.wait(timeout=timeout + 120)
        except subprocess.TimeoutExpired:
            pass
        finally:
            signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
        try:
            return _last_json_line(out.read_text())
        except ValueError:
            return {"clients": clients, "finished": 0,
                    "error": f"exit {proc.returncode}, no JSON line: {err.read_text().strip()[-600:]}"}
