"""A small internet in network namespaces, with real NAT: for the reach tests and benchmarks/nat.py.

    with NetLab(homes=2) as lab:
        lab.run("pub", ["ping", "-c1", "203.0.113.2"])      # fails: nothing reaches in
        lab.spawn("home1", [sys.executable, "-m", "swarm.cli", "peer", ...])

Namespaces (names carry a per-lab prefix, so parallel runs never meet):

    pub       198.51.100.1/24 on a bridge, plus ADDRESSES extra public addresses; the internet
    routerN   198.51.100.(1+N) on the bridge, 203.0.113.1 (home1) / 192.0.2.1 (home2) inside;
              MASQUERADE out; FORWARD drops all but ESTABLISHED,RELATED in; INPUT from the
              WAN drops what is new, as a home router does (no RST to give the game away)
    homeN     203.0.113.2 / 192.0.2.2, default route via its router

Only documentation ranges, only inside namespaces this lab creates and deletes. `forward_port`
adds the DNAT a user would set up on their router. Every spawned process is stopped by `close`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Sequence

from tests.procs import spawn, stop

HOME_NETS = ["203.0.113", "192.0.2"]  # homeN's LAN /24, for N = 1, 2
PUBLIC_NET = "198.51.100"
EXTRA_PUBLIC = 4  # public addresses .10-.13: separate machines' addresses for public processes


def missing() -> str | None:
    """Why the lab cannot run here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    if shutil.which("iptables") is None:
        return "iptables is not installed (apt-get install -y iptables)"
    probe = f"swlabprobe{os.getpid() % 100000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` fails: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class NetLab:
    def __init__(self, homes: int = 1, prefix: str | None = None) -> None:
        assert 1 <= homes <= len(HOME_NETS)
        self.homes = homes
        self.prefix = prefix or f"sw{os.getpid() % 100000}"
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen] = []

    # --- addresses ------------------------------------------------------------------------

    def ns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    @property
    def public_ip(self) -> str:
        return f"{PUBLIC_NET}.1"

    def extra_public_ip(self, i: int) -> str:
        """The i-th extra public address (0-based), for a second public machine."""
        assert 0 <= i < EXTRA_PUBLIC
        return f"{PUBLIC_NET}.{10 + i}"

    def router_wan_ip(self, home: int) -> str:
        return f"{PUBLIC_NET}.{1 + home}"

    def home_ip(self, home: int) -> str:
        return f"{HOME_NETS[home - 1]}.2"

    # --- building -------------------------------------------------------------------------

    def sh(self, *args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        argv = (["ip", "netns", "exec", self.ns(ns)] if ns else []) + list(args)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
        return done

    def _add_ns(self, name: str) -> None:
        self.sh("ip", "netns", "add", self.ns(name))
        self._namespaces.append(self.ns(name))
        self.sh("ip", "link", "set", "lo", "up", ns=name)

    def _veth(self, a: str, a_if: str, b: str, b_if: str) -> None:
        tmp_a, tmp_b = f"{self.prefix}a{a_if}"[-15:], f"{self.prefix}b{b_if}"[-15:]
        self.sh("ip", "link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b)
        self.sh("ip", "link", "set", tmp_a, "netns", self.ns(a))
        self.sh("ip", "link", "set", tmp_b, "netns", self.ns(b))
        self.sh("ip", "link", "set", tmp_a, "name", a_if, ns=a)
        self.sh("ip", "link", "set", tmp_b, "name", b_if, ns=b)
        self.sh("ip", "link", "set", a_if, "up", ns=a)
        self.sh("ip", "link", "set", b_if, "up", ns=b)

    def __enter__(self) -> NetLab:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        self._add_ns("pub")
        self.sh("ip", "link", "add", "br0", "type", "bridge", ns="pub")
        self.sh("ip", "link", "set", "br0", "up", ns="pub")
        self.sh("ip", "addr", "add", f"{self.public_ip}/24", "dev", "br0", ns="pub")
        for i in range(EXTRA_PUBLIC):
            self.sh("ip", "addr", "add", f"{self.extra_public_ip(i)}/24", "dev", "br0", ns="pub")
        for home in range(1, self.homes + 1):
            router, lan = f"router{home}", HOME_NETS[home - 1]
            self._add_ns(router)
            self._add_ns(f"home{home}")
            self._veth(router, "wan", "pub", f"r{home}")
            self.sh("ip", "link", "set", f"r{home}", "master", "br0", ns="pub")
            self.sh("ip", "addr", "add", f"{self.router_wan_ip(home)}/24", "dev", "wan", ns=router)
            self._veth(router, "lan", f"home{home}", "eth0")
            self.sh("ip", "addr", "add", f"{lan}.1/24", "dev", "lan", ns=router)
            self.sh("ip", "addr", "add", f"{lan}.2/24", "dev", "eth0", ns=f"home{home}")
            self.sh("ip", "route", "add", "default", "via", f"{lan}.1", ns=f"home{home}")
            self.sh("sysctl", "-q", "-w", "net.ipv4.ip_forward=1", ns=router)
            for rule in (
                ["-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE"],
                ["-P", "FORWARD", "DROP"],
                ["-A", "FORWARD", "-i", "lan", "-o", "wan", "-j", "ACCEPT"],
                ["-A", "FORWARD", "-i", "wan", "-m", "state", "--state", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
                ["-A", "INPUT", "-i", "wan", "-m", "state", "--state", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
                ["-A", "INPUT", "-i", "wan", "-j", "DROP"],
            ):
                self.sh("iptables", *rule, ns=router)

    def forward_port(self, home: int, port: int, proto: str = "tcp") -> None:
        """Forwards `port` on router `home`'s WAN address to the same port in the home."""
        router, target = f"router{home}", self.home_ip(home)
        self.sh("iptables", "-t", "nat", "-A", "PREROUTING", "-i", "wan", "-p", proto, "--dport", str(port),
                "-j", "DNAT", "--to-destination", f"{target}:{port}", ns=router)
        self.sh("iptables", "-I", "FORWARD", "1", "-i", "wan", "-p", proto, "-d", target, "--dport", str(port),
                "-j", "ACCEPT", ns=router)

    # --- running --------------------------------------------------------------------------

    def spawn(self, where: str, args: Sequence[str], env: dict[str, str] | None = None,
              log_dir: str | os.PathLike | None = None) -> subprocess.Popen:
        """Starts `args` inside namespace `where` (its own process group, stopped by `close`)."""
        proc = spawn(["ip", "netns", "exec", self.ns(where), *map(str, args)], env=env, log_dir=log_dir)
        self._procs.append(proc)
        return proc

    def run(self, where: str, args: Sequence[str], timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.ns(where), *map(str, args)], capture_output=True,
                              text=True, timeout=timeout)

    def close(self) -> None:
        for proc in reversed(self._procs):
            stop(proc)
        self._procs.clear()
        for name in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self._namespaces.clear()

    def __exit__(self, *_) -> None:
        self.close()
