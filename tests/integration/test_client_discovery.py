"""Finding peers through the DHT: peers that join later are found, uncovered blocks are
named quickly, and `swarm status` shows both."""

from __future__ import annotations

import contextlib
import io
import time
from types import SimpleNamespace

import pytest
import torch

from client import AutoDistributedModelForCausalLM, MissingBlocksError, SwarmSettings
from client.apps.cli_status import main as status_main
from tests.procs import LocalSwarm
from swarm.checkpoint import DEFAULT_MODEL, resolve_checkpoint

pytestmark = pytest.mark.integration


def status(initial_peers: list[str]) -> SimpleNamespace:
    """`swarm status` run in this process (its DHT node is its own; no interpreter start, no
    second import of torch): its exit code and output."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = status_main(["--initial-peers", initial_peers[0]])
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def test_uncovered_blocks_then_a_late_peer_completes_the_swarm():
    resolve_checkpoint(DEFAULT_MODEL)
    with LocalSwarm(["0:15"]) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(
            DEFAULT_MODEL, initial_peers=swarm.initial_peers, settings=SwarmSettings(wait_for_peers=2.0))
        inputs = model.tokenizer("Hello", return_tensors="pt")
        started = time.monotonic()
        with pytest.raises(MissingBlocksError, match=r"blocks 15-29"):
            model.generate(**inputs, max_new_tokens=2)
        assert time.monotonic() - started < 10, "a missing block must be reported within seconds, not hang"

        report = status(swarm.initial_peers)
        assert report.returncode == 1 and "UNCOVERED blocks: 15-29" in report.stdout

        with LocalSwarm(["15:30"], dht_initial_peers=swarm.initial_peers):
            report = status(swarm.initial_peers)
            assert report.returncode == 0 and "all blocks covered" in report.stdout, report.stdout + report.stderr
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            assert out.shape[1] == inputs["input_ids"].shape[1] + 4

            # A third peer, started later, replicates [0, 15): status and the client see it.
            with LocalSwarm(["0:15"], dht_initial_peers=swarm.initial_peers) as third:
                report = status(swarm.initial_peers)
                assert report.stdout.count("blocks   0:15") == 2 and report.stdout.count("blocks  15:30") == 1
                assert third.endpoints[0] in report.stdout
                seen = {r.endpoint for rs in model.swarm.records(refresh=True).values() for r in rs}
                assert third.endpoints[0] in seen
        model.swarm.shutdown()

