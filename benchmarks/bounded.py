"""Running a command under a time limit, stopping it politely when the limit passes.

The command leads its own process group. On timeout the group gets SIGTERM first (a
benchmark removes its temp files, a shell script's trap stops the servers it started; bash
runs traps only once its foreground child is gone, hence the whole group), then SIGKILL.
Peers started by LocalSwarm sit in their own sessions and stop when their parent dies.
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass


@dataclass
class Finished:
    returncode: int | None  # None: stopped at the time limit
    stdout: str
    stderr: str


def run_bounded(cmd: list[str], timeout: float, env: dict | None = None, cwd: str | None = None,
                grace: float = 30.0) -> Finished:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return Finished(proc.returncode, out, err)
    except subprocess.TimeoutExpired:
        signal_group(proc.pid, signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=grace)
        except subprocess.TimeoutExpired:
            signal_group(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        return Finished(None, out, err + f"\n[stopped after the {timeout:.0f} s limit]")
    finally:
        if proc.poll() is None:  # interrupted (Ctrl-C): leave nothing behind
            signal_group(proc.pid, signal.SIGKILL)
            proc.wait()


def signal_group(pgid: int, sig: int) -> None:
    """Signals every process left in the group, if any."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
