"""Peers and clients behind real NAT (tests/netlab.py): the middle of three spans is served only
by a peer in `home1`, behind a router that lets nothing in; the DHT nodes in `pub` relay.

- a client in `pub` gets local transformers' greedy tokens and PEFT's LoRA gradients through it;
- a client in `home2`, behind a second router, does too (both sides behind NAT);
- the path is hole-punched (TCP simultaneous open), or relayed with punching turned off;
- the peers' start-up lines say how they are reached: public, NAT with a relay, NAT without;
- `kill -9` of the relay in use mid-generation leaves the tokens unchanged.

Without root, `ip netns` or iptables the module skips and says which is missing.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarm.models import get_family
from swarm.ready_line import PeerReady
from tests.integration.nat_reference import local_greedy, local_lora_grads
from tests.netlab import NetLab, missing
from tests.procs import output, wait_for_line
from tests.swarm.test_models import tiny_model

TOKENS = 12
START_SECONDS = 90.0
REACH_LINE = r"reachability: (.*)"


@dataclass
class Lab:
    net: NetLab
    folder: Path
    relays: list[str]  # the DHT nodes' multiaddrs, all relays
    relay_procs: list
    lines: dict[str, str]  # peer name -> its reachability line
    logs: Path


def _dht(net: NetLab, ip: str, relay: bool, logs: Path):
    proc = net.spawn("pub", [sys.executable, "-m", "swarm.cli", "dht", "--host", ip, *(["--relay"] if relay else [])],
                     log_dir=logs)
    return proc, wait_for_line(proc, rf"^/ip4/{ip.replace('.', '[.]')}/tcp/\d+/p2p/\w+$", 30).group(0)


def _peer(net: NetLab, where: str, folder: Path, blocks: str, initial: list[str], logs: Path):
    argv = [sys.executable, "-m", "swarm.cli", "peer", "--model", str(folder), "--blocks", blocks, "--host", "0.0.0.0",
            "--device", "cpu", "--threads", "1", *[a for m in initial for a in ("--initial-peers", m)]]
    return net.spawn(where, argv, log_dir=logs)


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Iterator[Lab]:
    why = missing()
    if why:
        pytest.skip(f"NAT lab: {why}")
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(folder, safe_serialization=True)
    logs = tmp_path_factory.mktemp("nat-logs")
    with NetLab(homes=2) as net:
        (relay1, m1), (relay2, m2) = (_dht(net, net.public_ip, True, logs),
                                      _dht(net, net.extra_public_ip(0), True, logs))
        _, lonely = _dht(net, net.extra_public_ip(1), False, logs)  # a swarm of its own, with no relay
        peers = {"public": _peer(net, "pub", folder, "0:1", [m1, m2], logs),
                 "nat": _peer(net, "home1", folder, "1:3", [m1, m2], logs),
                 "public2": _peer(net, "pub", folder, "3:4", [m1, m2], logs),
                 "nat_no_relay": _peer(net, "home2", folder, "0:4", [lonely], logs)}
        lines = {name: wait_for_line(proc, REACH_LINE, START_SECONDS).group(1) for name, proc in peers.items()}
        for name in ("public", "nat", "public2"):
            wait_for_line(peers[name], PeerReady.PATTERN.pattern, START_SECONDS)
        yield Lab(net, folder, [m1, m2], [relay1, relay2], lines, logs)


def _client(lab: Lab, where: str, *args: str, punch: bool = True) -> "subprocess.Popen":  # noqa: F821
    argv = [sys.executable, "-m", "tests.integration.nat_client", "--model", str(lab.folder), "--tokens", str(TOKENS),
            *[a for m in lab.relays for a in ("--peer", m)], *args]
    return lab.net.spawn(where, argv, log_dir=lab.logs, env=None if punch else {"SWARMLM_HOLE_PUNCH": "0"})


def _result(proc, timeout: float = 120.0) -> dict:
    return json.loads(wait_for_line(proc, r"^\{.*\}$", timeout).group(0))


@pytest.fixture(scope="module")
def local(lab):
    return AutoModelForCausalLM.from_pretrained(lab.folder, dtype=torch.float32).eval()


def test_start_up_lines_say_how_each_peer_is_reached(lab):
    assert lab.lines["public"].startswith(f"reachable directly at {lab.net.public_ip}:"), lab.lines
    assert lab.lines["nat"].startswith("behind NAT, reachable through relay /ip4/198.51.100."), lab.lines
    assert "forward TCP port" in lab.lines["nat"] and "--public-host" in lab.lines["nat"]
    assert lab.lines["nat_no_relay"].startswith("unreachable: behind NAT (seen as 198.51.100.3)"), lab.lines
    assert "swarm dht --relay" in lab.lines["nat_no_relay"]


def _check_tokens_and_grads(lab: Lab, local, where: str, tmp_path: Path, punch: bool = True) -> dict:
    grads_file = tmp_path / f"grads-{where}.pt"
    proc = _client(lab, where, "--grads", str(grads_file), punch=punch)
    result = _result(proc)
    assert result["tokens"] == local_greedy(local, TOKENS), output(proc)
    ours = torch.load(grads_file)
    family = get_family(local.config)
    loss, expected = local_lora_grads(local, sorted(ours["grads"]), list(family.default_lora_targets),
                                      family.layers_prefix)
    torch.testing.assert_close(ours["loss"], loss, rtol=1e-5, atol=1e-5)
    for name, grad in expected.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(ours["grads"][name], grad, rtol=1e-3, atol=1e-4 * grad.abs().max().item(), msg=name)
    return result


def test_client_in_public_generates_and_trains_through_the_nat_peer_relayed(lab, local, tmp_path):
    result = _check_tokens_and_grads(lab, local, "pub", tmp_path, punch=False)
    assert set(result["paths"]) == {"relayed"} and result["relayed_bytes"] > 0, result


def test_client_in_public_punches_a_direct_path(lab, local, tmp_path):
    result = _check_tokens_and_grads(lab, local, "pub", tmp_path)
    assert set(result["paths"]) == {"punched"} and result["relayed_bytes"] == 0, result


def test_client_behind_its_own_nat_punches_a_direct_path_too(lab, local, tmp_path):
    # Both routers drop what they did not ask for: only simultaneous open gets through.
    result = _check_tokens_and_grads(lab, local, "home2", tmp_path)
    assert set(result["paths"]) == {"punched"} and result["relayed_bytes"] == 0, result
    assert result["punched_bytes"] > 0


def test_killing_the_relay_in_use_mid_generation_leaves_the_tokens(lab, local, tmp_path):
    go = tmp_path / "go"
    proc = _client(lab, "pub", "--pause-after", str(TOKENS // 2), "--go", str(go), punch=False)
    wait_for_line(proc, "^PAUSED$", 120)
    os.killpg(lab.relay_procs[0].pid, signal.SIGKILL)  # the first relay: every tunnel tries it first
    go.touch()
    assert _result(proc)["tokens"] == local_greedy(local, TOKENS), output(proc)
