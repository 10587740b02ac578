"""A zygote for integration tests: `swarm ...` processes forked from one interpreter that has
imported torch, transformers and hivemind already, instead of each paying that import.

On two cores a process start is ~9.5 s of CPU (torch 3 s, transformers' modeling stack 5 s,
hivemind 1 s) and the suite starts about a hundred of them: most of its time. A forked child is
still a real process running the real command (`runpy`, as `python -m` would): its own
session and process group, its own gRPC server, DHT process and p2pd, its stdout and stderr
in files, stopped by signalling its group. Only the interpreter start and the imports are
shared. What still starts with a fresh interpreter (tests/procs.py decides): every command
that is not the project's, the `--help` tests (subprocess.run), a child whose start-up
environment differs from the zygote's, and whatever runs inside `real_processes()`.

The zygote is one process with no Python threads (fork and threads do not mix; it checks that
its imports started none, else it refuses and every spawn falls back to a real one). It forks a
child per request on a Unix socket, answers with the child's pid, and, when it reaps the
child, with its exit code; the connection is the test side's handle (`ForkedProcess`).

    python -m tests.zygote SOCKET     # prints "zygote ready" once it serves
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
from pathlib import Path

from swarm.cli import OPENMP_ENV

# What the forked commands import; each costs the zygote once. No module here may start a
# thread at import.
PRELOAD = ("torch", "transformers", "hivemind", "grpc", "swarm.models", "swarm.loading", "peer.server", "client",
           "client.apps.api.app")
# Module runs (`python -m M`) that may be forked: the project's own entry points and the test
# clients. Anything else is started for real.
FORKABLE_MODULES = ("swarm.cli", "client.apps.api.cli", "tests.integration.generating_client",
                    "tests.integration.nat_client")
# Environment read when a process starts (the allocator, OpenMP, the interpreter): a child
# whose values differ from the zygote's would not get them, so it starts for real.
# OPENMP_ENV is not compared: `swarm` commands set it to the zygote's values themselves.
START_ENV_PREFIXES = ("MALLOC_", "OMP_", "KMP_", "MKL_", "GOMP_", "PYTHON", "LD_", "CUDA", "TORCH", "HF_", "TRANSFORMERS")


class ForkedProcess:
    """The test side of a forked child, shaped like `subprocess.Popen` where tests use it."""

    def __init__(self, args: list[str], connection: socket.socket, stdout_path: Path, stderr_path: Path):
        self.args, self._connection = args, connection
        self.stdout_path, self.stderr_path = stdout_path, stderr_path
        self.returncode: int | None = None
        self.pid = _read_message(connection)["pid"]

    def poll(self) -> int | None:
        if self.returncode is None:
            self._connection.setblocking(False)
            try:
                self._take(_read_message(self._connection))
            except BlockingIOError:
                self._connection.setblocking(True)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self._connection.settimeout(timeout)
            try:
                message = _read_message(self._connection)
            except (socket.timeout, TimeoutError):
                self._connection.settimeout(None)
                raise subprocess.TimeoutExpired(self.args, timeout) from None
            self._take(message)
        return self.returncode

    def _take(self, message: dict | None) -> None:
        # None: the zygote is gone (the run is ending); its children went with it (parent-death signal).
        self.returncode = -signal.SIGKILL if message is None else message["returncode"]
        self._connection.close()

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """The test run's zygote (`Zygote.shared()`), started on first use, stopped at exit."""

    _shared: "Zygote | None | bool" = None

    def __init__(self, folder: Path, parent_env: dict[str, str]):
        self.path = folder / "zygote.sock"
        env = {**os.environ, **parent_env, "PYTHONUNBUFFERED": "1", **OPENMP_ENV}
        self.start_env = _start_env(env)
        self._log = open(folder / "zygote.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.zygote", str(self.path)], stdout=subprocess.PIPE,
                                     stderr=self._log, stdin=subprocess.DEVNULL, env=env,
                                     cwd=Path(__file__).resolve().parents[1], start_new_session=True)
        line = self.proc.stdout.readline().decode()
        if line.strip() != "zygote ready":
            self.stop()
            raise RuntimeError(f"zygote did not start ({line.strip() or 'no output'}); see {folder / 'zygote.log'}")

    @classmethod
    def shared(cls, folder: Path, parent_env: dict[str, str]) -> "Zygote | None":
        """The run's zygote; None if it cannot run here (then processes start for real)."""
        if cls._shared is None:
            if os.environ.get("SWARMLM_TEST_ZYGOTE", "1") == "0" or not hasattr(os, "fork"):
                cls._shared = False
            else:
                try:
                    cls._shared = cls(folder, parent_env)
                except RuntimeError as e:
                    print(f"tests/zygote.py: {e}; starting processes for real", file=sys.stderr)
                    cls._shared = False
                else:
                    import atexit

                    atexit.register(cls._shared.stop)
        return cls._shared or None

    def can_fork(self, env: dict[str, str]) -> bool:
        """Whether a child with environment `env` starts as the zygote did."""
        return _start_env(env) == self.start_env

    def spawn(self, args: list[str], stdout_path: Path, stderr_path: Path, env: dict[str, str], cwd: str,
              stdin_path: Path | None = None, netns: str | None = None) -> ForkedProcess:
        """Forks `args`; `stdin_path`: a file as its stdin (else /dev/null); `netns`: a network
        namespace it runs in, as `ip netns exec NETNS` would put it."""
        for path in (stdout_path, stderr_path):
            path.write_bytes(b"")  # there from the start, as for a real spawn
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.connect(str(self.path))
        _send_message(connection, {"args": args, "stdout": str(stdout_path), "stderr": str(stderr_path),
                                   "env": env, "cwd": cwd, "stdin": str(stdin_path or os.devnull), "netns": netns})
        return ForkedProcess(args, connection, stdout_path, stderr_path)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()


def _start_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(START_ENV_PREFIXES) and k not in OPENMP_ENV}


def forkable(args: list[str]) -> bool:
    """Whether `args` (argv[0] the interpreter) runs one of the forkable modules."""
    return len(args) >= 3 and args[1] == "-m" and args[2] in FORKABLE_MODULES


def _send_message(connection: socket.socket, message: dict) -> None:
    connection.sendall(json.dumps(message).encode() + b"\n")


def _read_message(connection: socket.socket) -> dict | None:
    """One newline-ended JSON message; None if the other side closed first. Messages are read
    a byte at a time: the connection carries at most two, and the second must stay unread."""
    data = b""
    while not data.endswith(b"\n"):
        byte = connection.recv(1)
        if not byte:
            return None
        data += byte
        connection.setblocking(True)  # once a message has begun, take all of it
    return json.loads(data)


# --- the zygote process -------------------------------------------------------------------------


def _serve(path: str) -> None:
    import importlib
    import threading

    from swarm.cli import die_with_parent

    die_with_parent()  # a killed test run takes the zygote, and with it every child, along
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:  # an optional part not installed (the API's extra): its children import it
            pass
    # Native threads that torch and hivemind start at import are there too when hivemind forks
    # its DHT process in every peer; a Python thread would be copied mid-work.
    if threading.active_count() != 1:
        print(f"imports started Python threads {threading.enumerate()}: forking would copy them mid-work", flush=True)
        sys.exit(1)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.path.exists(path):
        os.unlink(path)  # left by a zygote that was killed
    listener.bind(path)
    listener.listen(64)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the selector through the fd
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(wake_read, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}
    print("zygote ready", flush=True)
    while True:
        for key, _ in selector.select():
            if key.fileobj is listener:
                connection, _ = listener.accept()
                request = _read_message(connection)
                if request is None:
                    connection.close()
                    continue
                pid = os.fork()
                if pid == 0:  # the other children's connections are theirs, not this child's
                    for fd in (listener, connection, *children.values()):
                        fd.close()
                    selector.close()
                    os.close(wake_read)
                    os.close(wake_write)
                    _child(request)  # never returns
                children[pid] = connection
                _send_message(connection, {"pid": pid})
            else:
                try:
                    while os.read(wake_read, 512):
                        pass
                except BlockingIOError:
                    pass
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            connection = children.pop(pid, None)
            if connection is not None:
                try:
                    _send_message(connection, {"returncode": os.waitstatus_to_exitcode(status)})
                except OSError:
                    pass  # the test side is gone
                connection.close()


def _enter_netns(name: str) -> None:
    """Moves this (single-threaded) process into network namespace `name`, as `ip netns exec`
    does; its children (the DHT process, p2pd) inherit it."""
    import ctypes

    clone_newnet = 0x40000000
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, clone_newnet) != 0:
            raise OSError(ctypes.get_errno(), f"setns into network namespace {name}")
    finally:
        os.close(fd)


def _child(request: dict) -> None:
    """In the forked child: becomes the process `python -m MODULE ARGS` would have been, runs it,
    exits."""
    import atexit
    import random
    import runpy
    import threading
    import traceback

    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            opened = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(opened, fd)
            os.close(opened)
        stdin = os.open(request["stdin"], os.O_RDONLY)
        os.dup2(stdin, 0)
        os.close(stdin)
        if request["netns"]:
            _enter_netns(request["netns"])
        os.environ.clear()
        # The child's parent is the zygote: that is the death it must follow (swarm/cli.py).
        from swarm.cli import PARENT_PID_ENV

        os.environ.update({**request["env"], PARENT_PID_ENV: str(os.getppid())})
        os.chdir(request["cwd"])
        random.seed()  # a forked child would otherwise repeat the zygote's random numbers
        args = request["args"]
        sys.path[0] = os.getcwd()  # as `python -m` sets it
        sys.argv = [args[2], *args[3:]]
        runpy.run_module(args[2], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        code = 128 + signal.SIGINT
    except BaseException:  # noqa: BLE001 - printed as the interpreter would
        traceback.print_exc()
    finally:
        try:
            threading._shutdown()  # what the interpreter does at exit: join non-daemon threads
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


if __name__ == "__main__":
    _serve(sys.argv[1])
