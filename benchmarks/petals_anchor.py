"""Petals 2.2 on the same machine and model, for the side-by-side table in RESULTS.md.

Drives the anchor scripts in /work/shared/anchors/petals (override with $SWARMLM_ANCHORS):
`setup.sh W` builds Petals 2.2 and a converted copy of the default model in W once (~5 min;
later calls skip finished steps), `run.sh W` starts a DHT + 3 Petals servers on 127.0.0.1
and prints its client benchmark's JSON line, `DELAY_MS=10 run.sh W` does the same with a
10 ms-each-way delay proxy in front of every server (20 ms RTT).

Petals is a benchmark-only dependency: it lives in its own venv under W
(default ~/.cache/swarmlm-petals, override with $SWARMLM_PETALS_DIR); nothing imports it.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

from bounded import run_bounded

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


def run_petals(timeout: float = 1800.0, log=print) -> dict:
    """Setup if needed, then both runs; each run's JSON line, or {"error": ...} for that run."""
    setup, run = ANCHORS / "petals" / "setup.sh", ANCHORS / "petals" / "run.sh"
    if not setup.exists():
        raise FileNotFoundError(f"{setup} not found: set SWARMLM_ANCHORS to the folder holding petals/setup.sh")
    WORKDIR.mkdir(parents=True, exist_ok=True)
    log(f"petals: setup in {WORKDIR} (skips finished steps)")
    setup_log = WORKDIR / "setup.log"
    done = run_bounded(["bash", str(setup), str(WORKDIR)], timeout)
    setup_log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"Petals setup failed (exit {done.returncode}); see {setup_log}")
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
