"""A private swarm with real processes: `swarm dht --private`, `swarm invite`, two member peers
(`swarm peer --join`: a credential file and a token) and an outsider's peer on the same DHT,
then `swarm revoke`. Members generate what local transformers does and never use the
outsider; outsiders get UNAUTHENTICATED; a revoked member is out within one record lifetime."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from client import AutoDistributedModelForCausalLM, SwarmSettings
from client.remote_swarm import RemoteSwarm
from client.routing import MissingBlocksError
from swarm.checkpoint import DEFAULT_MODEL, resolve_checkpoint
from swarm.membership import Trust, load_credential
from swarm.membership.grpc_auth import channel
from swarm.registry import DEFAULT_RECORD_TTL, fetch_span_records
from swarm.wire import swarm_pb2, swarm_pb2_grpc
from tests.integration.conftest import DHT_LINE, SwarmProcs
from tests.procs import wait_for_line

pytestmark = pytest.mark.integration

NUM_BLOCKS = 30


def swarm_cli(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "swarm.cli", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


class PrivateSwarm:
    def __init__(self, procs: SwarmProcs, folder: Path) -> None:
        self.swarm_dir = str(folder / "swarm")
        dht = procs.spawn(["python", "-m", "swarm.cli", "dht", "--host", "127.0.0.1", "--private",
                           "--swarm-dir", self.swarm_dir])
        self.maddr = wait_for_line(dht, DHT_LINE, timeout=30).group(0)
        self.files = {}
        for name in ("alice", "carol", "dave"):  # peer 0:15; the client; a client revoked along with bob
            self.files[name] = str(folder / f"{name}.pem")
            swarm_cli("invite", name, "--swarm-dir", self.swarm_dir, "--out", self.files[name])
        self.bob_token = swarm_cli("invite", "bob", "--swarm-dir", self.swarm_dir, "--token").strip()
        self.alice = procs.start_peer("--join", self.files["alice"], "--blocks", "0:15", initial_peers=[self.maddr])
        self.bob = procs.start_peer("--join", self.bob_token, "--blocks", "15:30", initial_peers=[self.maddr])
        self.outsider = procs.start_peer("--blocks", "0:15", initial_peers=[self.maddr])
        for peer in (self.alice, self.bob, self.outsider):
            peer.wait_ready()

    def trust(self, name: str) -> Trust:
        return Trust(load_credential(self.bob_token if name == "bob" else self.files[name]))


@pytest.fixture(scope="module")
def private(tmp_path_factory):
    folder = tmp_path_factory.mktemp("private-swarm")
    resolve_checkpoint(DEFAULT_MODEL)  # convert once, before three peers wait on it
    procs = SwarmProcs(folder, initial_peers=[])
    try:
        yield PrivateSwarm(procs, folder)
    finally:
        procs.close()


@pytest.fixture(scope="module")
def member(private):
    model = AutoDistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, initial_peers=[private.maddr],
                                                            join=private.files["carol"])
    yield model
    model.swarm.shutdown()


def info(endpoint: str, trust: Trust | None) -> str:
    """'OK', or 'CODE: details' of an Info call."""
    with channel(endpoint, trust) as ch:
        try:
            swarm_pb2_grpc.BlockServiceStub(ch).Info(swarm_pb2.InfoRequest(), timeout=5)
        except grpc.RpcError as e:
            return f"{e.code().name}: {e.details()}"
    return "OK"


def test_members_generate_greedy_like_local_and_never_use_the_outsider(private, member):
    local = AutoModelForCausalLM.from_pretrained(resolve_checkpoint(DEFAULT_MODEL).folder, dtype=torch.float32).eval()
    inputs = member.tokenizer("The capital of France is", return_tensors="pt")
    with member.inference_session(max_length=32) as session:
        ours = member.generate(**inputs, max_new_tokens=12, do_sample=False, session=session)
        assert session.endpoints == [private.alice.endpoint, private.bob.endpoint]
        # alice pushed every step on to bob, over a members' TLS channel of her own
        with channel(private.bob.endpoint, private.trust("carol")) as ch:
            sessions = swarm_pb2_grpc.BlockServiceStub(ch).Info(swarm_pb2.InfoRequest(), timeout=5).sessions
        assert [s.steps_pushed_in for s in sessions if s.session_id == session.session_id] == [12]
    theirs = local.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert ours.tolist() == theirs.tolist()
    seen = {r.endpoint for rs in member.swarm.records(refresh=True).values() for r in rs}
    assert seen == {private.alice.endpoint, private.bob.endpoint}
    # The outsider's records are in the DHT (an open reader sees them), a member skips them.
    open_view = fetch_span_records(member.swarm.dht, private.alice.model_id, NUM_BLOCKS)
    assert {r.endpoint for rs in open_view.values() for r in rs} == {private.outsider.endpoint}
    assert open_view.private_swarms == {member.swarm.trust.swarm_id}


def test_outsiders_get_unauthenticated_and_an_open_client_is_told_to_join(private):
    tls_no_token = grpc.ssl_channel_credentials(root_certificates=private.trust("alice").ca_pem)
    for peer in (private.alice, private.bob):
        with grpc.secure_channel(peer.endpoint, tls_no_token,
                                 options=[("grpc.ssl_target_name_override", "swarmlm-member")]) as ch:
            with pytest.raises(grpc.RpcError) as refused:
                swarm_pb2_grpc.BlockServiceStub(ch).Info(swarm_pb2.InfoRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "this swarm is private: join it with --join CREDENTIAL" in refused.value.details()
        assert info(peer.endpoint, None).startswith("UNAVAILABLE")  # plaintext: not even a TLS handshake
    assert info(private.outsider.endpoint, None) == "OK"  # the outsider's own open peer works as before
    assert info(private.outsider.endpoint, private.trust("carol")).startswith("UNAVAILABLE")  # not a member
    swarm = RemoteSwarm([private.maddr], private.alice.model_id, NUM_BLOCKS, SwarmSettings(wait_for_peers=0))
    try:
        with pytest.raises(MissingBlocksError, match=r"blocks 15-29 .*private swarm \w{16} serves the model too"):
            swarm.find_chain()
    finally:
        swarm.shutdown()


def test_a_revoked_member_is_refused_within_one_record_lifetime(private, member):
    bob, dave, carol = private.trust("bob"), private.trust("dave"), private.trust("carol")
    assert info(private.alice.endpoint, dave) == "OK"
    swarm_cli("revoke", "bob", "--swarm-dir", private.swarm_dir)
    revoked = time.monotonic()
    swarm_cli("revoke", "dave", "--swarm-dir", private.swarm_dir, "--initial-peers", private.maddr)
    refused = ignored = None
    while time.monotonic() - revoked < DEFAULT_RECORD_TTL and not (refused and ignored):
        if refused is None and info(private.alice.endpoint, bob).startswith("PERMISSION_DENIED"):
            refused = time.monotonic() - revoked
        records = fetch_span_records(member.swarm.dht, private.alice.model_id, NUM_BLOCKS, trust=carol)
        if ignored is None and private.bob.endpoint not in {r.endpoint for rs in records.values() for r in rs}:
            ignored = time.monotonic() - revoked
        time.sleep(0.5)
    assert refused is not None and ignored is not None, (refused, ignored)
    print(f"revoked: refused after {refused:.1f} s, records ignored after {ignored:.1f} s")
    assert info(private.alice.endpoint, dave).startswith("PERMISSION_DENIED: member 'dave' was revoked")
    assert info(private.alice.endpoint, carol) == "OK"  # nobody else is touched
    assert info(private.bob.endpoint, carol) == "OK"  # a revoked member's peer still answers; members skip it
