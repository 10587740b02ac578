"""The client's view of the swarm: the DHT, the model's records in it, the chains that
routing picks from them (after pinging the candidates), and which peers to avoid."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial

import grpc
import hivemind

from swarm.dht_process import OwnedDHT
from swarm.flags import FlagsView
from swarm.initial_peers import explained_join
from swarm.membership import Trust, trust_from
from swarm.reach import tunnels
from swarm.reach.probe import peer_ids
from swarm.registry import PeerRecord, PendingRecords, fetch_span_records, fetch_span_records_later

from .routing import Hop, MissingBlocksError, RouteFinder
from .transport import CLIENT_ERRORS, PeerCallError, PeerConnection
from .verify import Verifier

logger = logging.getLogger(__name__)

BACKGROUND_FETCH_DELAY = 0.5  # seconds; see `RemoteSwarm.records`


@dataclass
class SwarmSettings:
    """How the client talks to peers."""

    codec: str = "raw"  # activations on the wire: raw | float16 | bfloat16 | int8 | int8_blockwise
    request_timeout: float = 60.0  # a peer silent this long (per request or inference step) counts as failed
    wait_for_peers: float = 5.0  # how long a missing block may take to appear before we give up
    records_ttl: float = 2.0  # reuse DHT records this long before fetching again
    # Records older than records_ttl but not this old are used while newer ones are fetched in
    # the background, for the next call: a session's open does not wait ~40 ms on the DHT for
    # them. (Peers announce every 10 s, for 30 s.) 0: always wait for the fetch.
    records_stale_ok: float = 20.0
    max_failures: int = 3  # peer failures one step survives (each moves to other peers)
    allow_quantized: bool = True  # False: never route through peers serving quantized weights (--quant)
    push: bool = True  # inference steps go peer to peer where peers support it (False: via the client)
    # Fraction of each peer's calls redone on a replica to catch wrong outputs (client/verify.py);
    # a peer's first call of each kind is always checked. 0: no checks, nothing on the hot path.
    verify: float = 0.0
    # A private swarm's member credential (a file or swarmlm-member: token, from `swarm invite`); None: an open swarm.
    join: str | None = None


class RemoteSwarm:
    """The peers serving one model, as found in the DHT."""

    def __init__(self, initial_peers: list[str], model_id: str, num_blocks: int,
                 settings: SwarmSettings | None = None, dht: hivemind.DHT | None = None):
        if not initial_peers and dht is None:
            raise ValueError("initial_peers is empty: pass the multiaddr printed by `swarm dht`")
        self.model_id, self.num_blocks = model_id, num_blocks
        self.settings = settings or SwarmSettings()
        # Checked before a DHT node starts: a bad credential is one line (CredentialError).
        self.trust = trust_from(self.settings.join, "join")
        # A DHT process of our own that dies with this process (a killed client leaves no orphan).
        if dht is None:
            with explained_join(initial_peers):  # a DHTJoinError saying what to check
                dht = OwnedDHT(initial_peers=list(initial_peers), client_mode=True, start=True)
        self.dht = dht
        # Peers behind NAT: dialed through its libp2p daemon; the initial peers say our address.
        tunnels.install(lambda: self.dht.replicate_p2p(), peer_ids(list(initial_peers)))
        self.routes = RouteFinder(model_id, num_blocks, allow_quantized=self.settings.allow_quantized)
        self._records: dict[int, list[PeerRecord]] | None = None
        self._records_time = 0.0
        self._fetching: PendingRecords | None = None  # a background fetch (see records_stale_ok)
        self._fetch_started = 0.0
        self._flags = FlagsView(self.dht, model_id)
        self.verifier = Verifier(self, self.settings.verify) if self.settings.verify else None

    def records(self, refresh: bool = False) -> dict[int, list[PeerRecord]]:
        """The model's records, fetched again when older than `records_ttl` (see `records_stale_ok`)."""
        self._take_fetched()
        age, settings = time.monotonic() - self._records_time, self.settings
        if refresh or self._records is None or age > max(settings.records_ttl, settings.records_stale_ok):
            started = time.monotonic()
            self._records = fetch_span_records(self.dht, self.model_id, self.num_blocks, trust=self.trust)
            self._records_time = started
        elif age > settings.records_ttl and self._fetching is None:
            # Started a moment later: the caller is opening a session, and its prefill is the
            # peers' heaviest moment (on one 2-core machine with 3 peers, a fetch run during it
            # cost the prefill about as much as the fetch saved the open).
            self._fetching = fetch_span_records_later(self.dht, self.model_id, self.num_blocks,
                                                      delay=BACKGROUND_FETCH_DELAY, trust=self.trust)
            self._fetch_started = time.monotonic()
        return self._records

    def _take_fetched(self) -> None:
        if self._fetching is None or not self._fetching.done():
            return
        fetching, self._fetching = self._fetching, None
        try:
            records = fetching.result()
        except Exception as e:  # noqa: BLE001 - a later call fetches again
            logger.warning("fetching the model's records from the DHT failed: %s", e)
            return
        if self._fetch_started >= self._records_time:  # not older than a fetch waited for meanwhile
            self._records, self._records_time = records, self._fetch_started

    def find_chain(self, start: int = 0, end: int | None = None, randomize: bool = False) -> list[Hop]:
        """A chain covering [start, end); waits up to `wait_for_peers` for missing blocks
        (peers that just started may not be in the DHT yet), then names them."""
        deadline = time.monotonic() + self.settings.wait_for_peers
        refresh = False
        self.routes.flags = self._flags.counts()
        while True:
            try:
                records = self.records(refresh=refresh)
                self.measure_rtts(records, start, self.num_blocks if end is None else end)
                return self.routes.find_chain(records, start, end, randomize)
            except MissingBlocksError as e:
                if time.monotonic() > deadline:
                    private = sorted(getattr(self._records, "private_swarms", ()))
                    if private and not any(self._records.values()):
                        raise PrivateSwarmError(e, private) from None
                    if private:  # some blocks are served only in a private swarm
                        raise MissingBlocksError(self.model_id, e.missing, self.num_blocks, hint=(
                            f"; private swarm {', '.join(private)} serves the model too: join it with --join "
                            "CREDENTIAL")) from None
                    raise
                time.sleep(0.5)
                refresh = True

    def measure_rtts(self, records: dict[int, list[PeerRecord]], start: int, end: int) -> None:
        """Pings the peers that could serve part of [start, end) and have no fresh round-trip
        time, in parallel; a peer that does not answer is avoided like a failed one."""
        peers = [p for p in self.routes.candidates(records) if start <= p.start and p.end <= end]
        pinger = ping if self.trust is None else partial(ping, trust=self.trust)
        unreachable = set(self.routes.rtt.measure([tunnels.dial_target(p) for p in peers], pinger))
        for peer in peers:
            if tunnels.dial_target(peer) in unreachable:
                self.routes.ban(peer.peer_id)

    def ban_endpoint(self, endpoint: str) -> None:
        """Avoid the peer at `endpoint` for a while (it failed), unless the relay on the way
        failed and it has another (the next connection goes through that)."""
        if tunnels.route_failed(endpoint):
            return
        for records in self.records().values():
            for record in records:
                if tunnels.dial_target(record) == endpoint:
                    self.routes.ban(record.peer_id)

    def retry_after(self, error: PeerCallError, failures: int) -> bool:
        """After the `failures`-th failure of one request: False to give up (too many, or the
        request itself is wrong); True once the failed peer is avoided, to try other peers."""
        if failures > self.settings.max_failures or error.code in CLIENT_ERRORS:
            return False
        self.ban_endpoint(error.endpoint)
        logger.warning("%s; retrying on other peers", error)
        return True

    def flag(self, peer_id: str, reason: str) -> None:
        """Tells other clients, through the DHT, that this peer returned wrong outputs."""
        self._flags.store(peer_id, reason)

    def shutdown(self) -> None:
        self.dht.shutdown()


class PrivateSwarmError(MissingBlocksError):
    """The only peers found serve a private swarm this client is not a member of."""

    def __init__(self, missing: MissingBlocksError, swarm_ids: list[str]):
        RuntimeError.__init__(self, f"this swarm is private (id {', '.join(swarm_ids)}): join it with --join "
                              "CREDENTIAL (SwarmSettings(join=...) in Python); ask its owner for `swarm invite NAME`")
        self.missing = missing.missing


def ping(endpoint: str, timeout: float, trust: Trust | None = None) -> float:
    """Seconds for an Info call to the peer at `endpoint`; raises PeerCallError if the peer
    cannot be reached. One that answers no faster than `timeout` counts as that slow: busy
    is not dead, and it may be the only peer of its blocks. A first call opens the connection
    (reused by every later call), so the second measures a round trip without handshakes."""
    connection = PeerConnection.to(endpoint, trust)
    try:
        connection.info(timeout)
        started = time.perf_counter()
        connection.info(timeout)
    except PeerCallError as e:
        if e.code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return timeout
        raise
    return time.perf_counter() - started
