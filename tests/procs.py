"""Start and stop real processes in integration tests, without leaking any.

hivemind forks helpers (the DHT process, the p2pd daemon) that outlive a plain kill of
their parent, so every process is started in its own session and stopped by signalling
its whole process group.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from swarm.cli import PARENT_PID_ENV
from client.apps.local_swarm import LocalSwarm as _LocalSwarm
from tests.zygote import ForkedProcess, Zygote, forkable

REPO_ROOT = Path(__file__).resolve().parents[1]
_log_dir: Path | None = None
# Whether the project's commands are forked from the zygote; `real_processes()` turns it off
# where a test measures the process itself (a forked child faults the zygote's code pages in as
# it runs, so its RSS creeps up where a fresh interpreter's would not).
_fork = True


@contextlib.contextmanager
def real_processes() -> Iterator[None]:
    """Within it, `spawn` starts every process with a fresh interpreter."""
    global _fork
    before, _fork = _fork, False
    try:
        yield
    finally:
        _fork = before


def _logs() -> Path:
    global _log_dir
    if _log_dir is None:
        _log_dir = Path(tempfile.mkdtemp(prefix="swarm-test-procs-"))
    return _log_dir


def spawn(
    args: Sequence[str],
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = REPO_ROOT,
    log_dir: str | os.PathLike | None = None,
    stdin: str | os.PathLike | None = None,
) -> subprocess.Popen:
    """Start `args` in a new session; stdout/stderr go to files (proc.stdout_path, proc.stderr_path).

    `args[0] == "python"` is replaced by the running interpreter; `env` is added to os.environ;
    logs go under `log_dir` (default: one temporary folder per test run); `stdin`: a file to read
    from. The project's own commands (also under `ip netns exec NS`: the child enters NS itself)
    are forked from the zygote (tests/zygote.py), unless inside `real_processes()` or `env`
    changes what a starting process reads; the rest start for real.
    """
    args = [sys.executable if i == 0 and a == "python" else str(a) for i, a in enumerate(args)]
    name = re.sub(r"[^\w.-]+", "_", " ".join(args[1:3]))[:40] or "proc"
    fd, base = tempfile.mkstemp(prefix=name + "-", dir=log_dir or _logs())
    os.close(fd)
    stdout_path, stderr_path = Path(base + ".out"), Path(base + ".err")
    # SWARMLM_PARENT_PID: `swarm ...` commands arm a parent-death signal, so killing the
    # test run (even with SIGKILL) stops them too.
    full_env = {"PYTHONUNBUFFERED": "1", **os.environ, PARENT_PID_ENV: str(os.getpid()), **(env or {})}
    forked = _forked(args, stdout_path, stderr_path, full_env, str(cwd or os.getcwd()), stdin)
    if forked is not None:
        return forked
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err, \
            open(stdin or os.devnull, "rb") as source:
        proc = subprocess.Popen(args, stdout=out, stderr=err, stdin=source, env=full_env,
                                cwd=cwd, start_new_session=True)
    proc.stdout_path = stdout_path  # type: ignore[attr-defined]
    proc.stderr_path = stderr_path  # type: ignore[attr-defined]
    return proc


def _forked(args: list[str], stdout_path: Path, stderr_path: Path, env: dict[str, str], cwd: str,
            stdin: str | os.PathLike | None = None) -> ForkedProcess | None:
    """`args` forked from the zygote, or None where it must start for real (see `spawn`)."""
    netns, command = (args[3], args[4:]) if args[:3] == ["ip", "netns", "exec"] and len(args) > 4 else (None, args)
    if not (_fork and forkable(command)):
        return None
    zygote = Zygote.shared(_logs(), {PARENT_PID_ENV: str(os.getpid())})
    if zygote is None or not zygote.can_fork(env):
        return None
    return zygote.spawn(command, stdout_path, stderr_path, env, cwd, stdin_path=Path(stdin) if stdin else None,
                        netns=netns)


def run(args: Sequence[str], stdin: str | None = None, timeout: float = 180,
        log_dir: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    """`args` spawned (so forked where `spawn` forks) and run to its end: exit code, stdout and
    stderr, as `subprocess.run(..., capture_output=True, text=True)` gives them. `stdin`: text
    it reads."""
    source = None
    if stdin is not None:
        fd, source = tempfile.mkstemp(suffix=".stdin", dir=log_dir or _logs())
        os.write(fd, stdin.encode())
        os.close(fd)
    with running(args, stdin=source, log_dir=log_dir) as proc:
        code = proc.wait(timeout)
    return subprocess.CompletedProcess(proc.args, code, Path(proc.stdout_path).read_text(),
                                       Path(proc.stderr_path).read_text())


def unused_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on (bound, then closed again): a dead address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def output(proc: subprocess.Popen) -> str:
    """The process's stdout and stderr so far, for assertion messages."""
    parts = []
    for name in ("stdout_path", "stderr_path"):
        path = getattr(proc, name, None)
        if path is not None and Path(path).exists():
            parts.append(f"--- {Path(path).name} ---\n{Path(path).read_text(errors='replace')[-4000:]}")
    return "\n".join(parts)


def wait_for_line(source: subprocess.Popen | str | os.PathLike, pattern: str, timeout: float) -> re.Match:
    """Wait until a line of `source` (a spawned process's stdout+stderr, or a file) matches `pattern`.

    Fails early, with the output, if the process exits first.
    """
    proc = source if isinstance(source, (subprocess.Popen, ForkedProcess)) else None
    paths = [proc.stdout_path, proc.stderr_path] if proc is not None else [Path(source)]  # type: ignore[attr-defined]
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        exited = proc is not None and proc.poll() is not None  # read once more after exit
        for path in paths:
            if Path(path).exists():
                for line in Path(path).read_text(errors="replace").splitlines():
                    if match := regex.search(line):
                        return match
        if exited:
            raise AssertionError(f"process exited with {proc.returncode} before printing {pattern!r}\n{output(proc)}")
        if time.monotonic() > deadline:
            detail = output(proc) if proc is not None else ""
            raise TimeoutError(f"no line matching {pattern!r} in {timeout} s\n{detail}")
        time.sleep(0.05)


def group_members(proc: subprocess.Popen) -> list[int]:
    """Pids of the live (non-zombie) processes in `proc`'s process group."""
    proc_fs = Path("/proc")
    if not proc_fs.is_dir():  # not Linux: ask the kernel whether the group has anyone at all
        try:
            os.killpg(proc.pid, 0)
            return [proc.pid]
        except ProcessLookupError:
            return []
    members = []
    for entry in proc_fs.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited while we looked
        # "pid (comm) state ppid pgrp ...": comm may contain spaces, so split after the last ')'
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == proc.pid and state != "Z":
            members.append(int(entry.name))
    return members


def group_alive(proc: subprocess.Popen) -> bool:
    return bool(group_members(proc))


def stop(proc: subprocess.Popen, timeout: float = 5.0) -> int | None:
    """SIGTERM the process group, wait up to `timeout`, then SIGKILL the group. Returns the exit code."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + wait
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
        # The leader may be gone while its children (DHT process, p2pd) still run.
        while group_alive(proc) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not group_alive(proc):
            break
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=1.0)
    return proc.returncode


@contextlib.contextmanager
def running(args: Sequence[str], timeout: float = 5.0, **spawn_kwargs) -> Iterator[subprocess.Popen]:
    """`with running([...]) as proc:` spawns a process and stops its whole group on exit, also on failure."""
    proc = spawn(args, **spawn_kwargs)
    try:
        yield proc
    finally:
        stop(proc, timeout=timeout)


class LocalSwarm(_LocalSwarm):
    """client.apps.local_swarm.LocalSwarm with its processes forked from the zygote (tests/zygote.py)."""

    def _start(self, argv, out, err, stdout, stderr, env):
        env = {"PYTHONUNBUFFERED": "1", **env}
        forked = _forked(argv, Path(out), Path(err), env, str(REPO_ROOT))
        return forked if forked is not None else super()._start(argv, out, err, stdout, stderr, env)
