"""Unit tests for swarm.membership: credentials, signed records, revocation, and the gRPC
check, without a network (the registry's reads run against tests/swarm/test_registry.py's
in-memory DHT; the gRPC test uses a real server on 127.0.0.1 in this process)."""

from __future__ import annotations

import asyncio
import datetime
import os
import stat

import grpc
import pytest
from hivemind.utils import MSGPackSerializer, get_dht_time

from swarm import registry
from swarm.membership import CredentialError, Trust, load_credential
from swarm.membership.grpc_auth import TOKEN_KEY, CallToken, MemberCheck, add_port, channel, server_interceptors
from swarm.membership.identity import SwarmIdentity
from swarm.membership.revocation import RevocationList, revocation_key
from swarm.membership.trust import admitted
from swarm.registry import PeerRecord
from swarm.wire import swarm_pb2, swarm_pb2_grpc
from tests.swarm.test_registry import MODEL_ID, FakeDHT, peer_dict


@pytest.fixture(scope="module")
def identity(tmp_path_factory) -> SwarmIdentity:
    return SwarmIdentity.create(tmp_path_factory.mktemp("swarm") / "ca")


@pytest.fixture(scope="module")
def alice(identity):
    return identity.invite("alice")


def through_dht(value):
    return MSGPackSerializer.loads(MSGPackSerializer.dumps(value))


def test_identity_files_are_private_and_reload(identity):
    for name in ("ca.key", "members.json", "revoked.json"):
        assert stat.S_IMODE(os.stat(identity.folder / name).st_mode) == 0o600
    again = SwarmIdentity.load(identity.folder)
    assert again.swarm_id == identity.swarm_id and len(identity.swarm_id) == 16


def test_credential_round_trips_as_file_and_token(alice, tmp_path):
    path = tmp_path / "alice.pem"
    path.write_text(alice.to_pem())
    for given in (str(path), alice.token()):
        loaded = load_credential(given)
        assert (loaded.name, loaded.serial, loaded.swarm_id) == ("alice", alice.serial, alice.swarm_id)


@pytest.mark.parametrize("given, says", [("nope.pem", "not a file and not a swarmlm-member: token"),
                                         ("swarmlm-member:@@@", "not a swarmlm member credential")])
def test_bad_join_values_say_what_is_wrong(given, says):
    with pytest.raises(CredentialError, match=says):
        load_credential(given)


def test_expired_credential_is_refused(identity, alice):
    import cryptography.x509 as x509
    from cryptography.hazmat.primitives import hashes

    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=3)
    cert = (x509.CertificateBuilder().subject_name(alice.cert.subject).issuer_name(identity.ca_cert.subject)
            .public_key(alice.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(past).not_valid_after(past + datetime.timedelta(days=1))
            .sign(identity.key, hashes.SHA256()))
    from swarm.membership.credential import Credential

    expired = Credential("alice", alice.key, cert, identity.ca_cert)
    with pytest.raises(CredentialError, match="expired on"):
        load_credential(expired.token())
    # ...and a record it signed counts for nobody.
    assert Trust(alice).verify(Trust(alice).sign({"a": 1})) == "alice"
    assert Trust(alice).verify(Trust(expired).sign({"a": 1})) is None


def test_signed_record_verifies_after_the_dht_and_tampering_is_refused(alice):
    trust = Trust(alice)
    signed = through_dht(trust.sign(PeerRecord(**peer_dict()).model_dump(mode="json")))
    assert trust.verify(signed) == "alice"
    assert trust.verify({**signed, "throughput": 1e9}) is None  # same signature, other body: not the cache's
    assert trust.verify({**signed, "member_sig": signed["member_sig"][:-4] + "AAAA"}) is None
    assert trust.verify(PeerRecord(**peer_dict()).model_dump(mode="json")) is None  # unsigned


def test_a_foreign_swarms_credential_is_refused(alice, tmp_path):
    mallory = SwarmIdentity.create(tmp_path / "other").invite("alice")  # same name, other CA
    signed = Trust(mallory).sign({"x": 1})
    assert Trust(alice).verify(signed) is None
    assert Trust(alice).verify({**signed, "swarm": alice.swarm_id}) is None  # claims our swarm: CA check fails
    private = set()
    assert not admitted(signed, None, private) and private == {mallory.swarm_id}
    assert admitted({"x": 1}, None) and not admitted({"x": 1}, Trust(alice))


def test_revoked_member_is_refused_and_revocation_is_a_union(identity, alice):
    bob = identity.invite("bob")
    carol = identity.invite("carol")
    reader = Trust(alice)
    bob_record, carol_record = Trust(bob).sign({"n": 1}), Trust(carol).sign({"n": 2})
    assert reader.verify(bob_record) == "bob"
    first = identity.revoke("bob")
    _, value = first.signed(identity.key, identity.swarm_id)
    reader.learn_revocations([through_dht(value), {"junk": True}, {**value, "revoked": []}])
    assert reader.verify(bob_record) is None and reader.verify(carol_record) == "carol"
    # A later list that (wrongly or maliciously replayed) lacks bob does not make us forget him.
    _, older = RevocationList({carol.serial: "carol"}, 7).signed(identity.key, identity.swarm_id)
    reader.learn_revocations([older])
    assert reader.verify(bob_record) is None and reader.verify(carol_record) is None
    with pytest.raises(CredentialError, match="stays revoked"):
        identity.invite("bob")


def test_registry_reads_only_members_records_and_learns_revocations(identity, alice):
    dht, dave = FakeDHT(), identity.invite("dave")
    now = get_dht_time()
    member = PeerRecord(**peer_dict(peer_id="M", start=0, end=2))
    outsider = PeerRecord(**peer_dict(peer_id="O", start=0, end=2))
    revoked = PeerRecord(**peer_dict(peer_id="R", start=0, end=2))
    registry.announce(dht, member, now + 30, trust=Trust(alice))
    registry.announce(dht, outsider, now + 30)
    registry.announce(dht, revoked, now + 30, trust=Trust(dave))
    reader = Trust(alice)
    assert {r.peer_id for r in registry.fetch_span_records(dht, MODEL_ID, 2, trust=reader)[0]} == {"M", "R"}
    subkey, value = identity.revocations().adding("dave", [dave.serial]).signed(identity.key, identity.swarm_id)
    asyncio.run(dht.node.store_many([revocation_key(identity.swarm_id)], [value], now + 30, subkeys=[subkey]))
    assert [r.peer_id for r in registry.fetch_span_records(dht, MODEL_ID, 2, trust=reader)[1]] == ["M"]
    open_read = registry.fetch_span_records(dht, MODEL_ID, 2)
    assert [r.peer_id for r in open_read[0]] == ["O"] and open_read.private_swarms == {identity.swarm_id}


def test_record_check_is_cheap_once_cached(alice):
    import time

    trust = Trust(alice)
    signed = through_dht(trust.sign(PeerRecord(**peer_dict()).model_dump(mode="json")))
    trust.verify(signed)
    started = time.perf_counter()
    for _ in range(200):
        assert trust.verify(signed) == "alice"
    assert (time.perf_counter() - started) / 200 < 0.002  # generous: measured ~2 us (benchmarks/membership.py)


# --- the data plane -----------------------------------------------------------------------


class InfoOnly(swarm_pb2_grpc.BlockServiceServicer):
    async def Info(self, request, context):
        return swarm_pb2.PeerInfo()


async def _serve_and_call(server_trust: Trust, calls) -> list:
    server = grpc.aio.server(interceptors=server_interceptors(server_trust))
    swarm_pb2_grpc.add_BlockServiceServicer_to_server(InfoOnly(), server)
    port = add_port(server, "127.0.0.1:0", server_trust)
    await server.start()
    try:
        return await asyncio.to_thread(lambda: [call(f"127.0.0.1:{port}") for call in calls])
    finally:
        await server.stop(0)


def _info(endpoint: str, trust: Trust | None, metadata=()):
    with channel(endpoint, trust) as ch:
        try:
            swarm_pb2_grpc.BlockServiceStub(ch).Info(swarm_pb2.InfoRequest(), timeout=5, metadata=metadata)
            return "OK"
        except grpc.RpcError as e:
            return e.code().name


def test_grpc_members_pass_outsiders_are_refused(identity, alice, tmp_path):
    erin, frank = identity.invite("erin"), identity.invite("frank")
    server_trust = Trust(alice)
    server_trust.learn_revocations([identity.revocations().adding("frank", [frank.serial])
                                    .signed(identity.key, identity.swarm_id)[1]])
    stranger = SwarmIdentity.create(tmp_path / "stranger").invite("erin")

    def tls_without_token(endpoint: str) -> str:
        creds = grpc.ssl_channel_credentials(root_certificates=alice.ca_pem())
        with grpc.secure_channel(endpoint, creds, options=[("grpc.ssl_target_name_override", "swarmlm-member")]) as ch:
            try:
                swarm_pb2_grpc.BlockServiceStub(ch).Info(swarm_pb2.InfoRequest(), timeout=5)
            except grpc.RpcError as e:
                return f"{e.code().name}: {e.details()}"
        return "OK"

    results = asyncio.run(_serve_and_call(server_trust, [
        lambda e: _info(e, Trust(erin)),
        tls_without_token,
        lambda e: _info(e, None),  # plaintext to a TLS port: no answer at all
        lambda e: _info(e, Trust(frank)),
        lambda e: _info(e, Trust(stranger)),  # the stranger's channel does not trust our CA either
    ]))
    assert results[0] == "OK"
    assert results[1].startswith("UNAUTHENTICATED: this swarm is private: join it with --join CREDENTIAL")
    assert results[2] == "UNAVAILABLE"
    assert results[3] == "PERMISSION_DENIED"
    assert results[4] == "UNAVAILABLE"


def test_server_refuses_stale_or_foreign_tokens(alice, tmp_path):
    check = MemberCheck(Trust(alice))
    good = CallToken(Trust(alice)).token()
    assert check.refusal(good) is None and check.refusal(good) is None  # the second from the cache
    cert, issued, signature = good.split(".")
    code, message = check.refusal(f"{cert}.{int(issued) - 600}.{signature}")
    assert code == grpc.StatusCode.UNAUTHENTICATED and "stale" in message
    code, _ = check.refusal(f"{cert}.{issued}.{signature[:-4]}AAAA")
    assert code == grpc.StatusCode.UNAUTHENTICATED
    foreign = CallToken(Trust(SwarmIdentity.create(tmp_path / "x").invite("alice"))).token()
    assert check.refusal(foreign)[0] == grpc.StatusCode.UNAUTHENTICATED
    assert TOKEN_KEY == "swarmlm-member"


# --- the commands ---------------------------------------------------------------------------


def test_commands_say_what_is_wrong_in_one_line(tmp_path, capsys, monkeypatch):
    from swarm.membership import cli_init, cli_invite, cli_revoke

    monkeypatch.chdir(tmp_path)
    folder = str(tmp_path / "swarm")
    assert cli_invite.main(["alice", "--swarm-dir", folder]) == 1
    assert "holds no swarm identity; create one with `swarm init" in capsys.readouterr().err
    assert cli_init.main(["--swarm-dir", folder]) == 0 and cli_init.main(["--swarm-dir", folder]) == 1
    assert "already holds a swarm identity" in capsys.readouterr().err
    assert cli_invite.main(["alice", "--swarm-dir", folder]) == 0
    assert load_credential(str(tmp_path / "alice.pem")).name == "alice"
    assert cli_invite.main(["alice", "--swarm-dir", folder]) == 1  # alice.pem exists: nothing issued
    assert len(SwarmIdentity.load(folder).members()["alice"]["serials"]) == 1
    assert cli_invite.main(["bad name", "--swarm-dir", folder]) == 1
    assert cli_revoke.main(["zed", "--swarm-dir", folder]) == 1
    assert cli_revoke.main(["alice", "--swarm-dir", folder]) == 0
    err = capsys.readouterr().err
    assert "member name 'bad name'" in err and "no member named 'zed'" in err and "Traceback" not in err
