"""What peers announce in the DHT and how it is read back.

Keys (see DESIGN.md):
  "{model_id}.block.{i}"  subkey = peer id, value = that peer's PeerRecord (as a plain dict)
  "{model_id}.model", "swarmlm.models": the ModelRecords (swarm/model_records.py)

Everything read from the DHT is untrusted: any participant may store anything under
any key. Readers therefore validate each value with pydantic and skip what fails,
logging at debug level; a bad value never raises out of a fetch.

Withdrawal: hivemind cannot delete, and a subkey is only replaced by a value with a
*later* expiration time. `withdraw` therefore stores a tombstone (`{"withdrawn": True}`)
that outlives the last announcement; readers drop tombstones silently. `draining` stays
a real, visible state (a peer finishing its sessions but taking no new ones).

Private swarms: a member's records carry its signature (swarm/membership/trust.py), and a
reader given the member's `Trust` takes only records signed by a current member of its swarm,
learning the swarm's revocations in the same DHT call; an open swarm's reader takes only
unsigned ones and notes the private swarms it saw (`SpanRecords.private_swarms`).
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import re
from functools import partial
from typing import Any, Iterable, Literal

from hivemind.dht import DHT, DHTNode
from hivemind.utils import get_dht_time
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .dht_calls import get_many, get_many_after, store_many
from .dtypes import COMPUTE_DTYPES
from .membership.revocation import revocation_key
from .membership.trust import Trust, admitted
from .model_records import MAX_STR as _MAX_STR
from .model_records import (MODELS_KEY, ModelRecord, announce_model, fetch_model, fetch_models,  # noqa: F401
                            make_model_id, model_key)
from .reach.circuits import circuit_peer

logger = logging.getLogger(__name__)

# Record lifetime a peer's announcer should use; it refreshes well before this runs out.
DEFAULT_RECORD_TTL = 30.0

TOMBSTONE: dict[str, Any] = {"withdrawn": True}

_MODEL_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,79}$")
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
DType = Literal[COMPUTE_DTYPES]
_MAX_RELAYS = 4


class PeerState(str, enum.Enum):
    joining = "joining"  # loading weights; not yet serving
    online = "online"
    draining = "draining"  # finishing open sessions, refusing new ones


def _check_endpoint(value: str) -> str:
    """'host:port' or '[v6]:port'; the host must be something another machine can dial."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"endpoint {value!r} is not 'host:port' with a port in 1..65535")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"endpoint {value!r}: an IPv6 host must be bracketed, e.g. '[::1]:{port}'")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if bracketed or not _HOSTNAME_RE.fullmatch(host):
            raise ValueError(f"endpoint {value!r}: {host!r} is neither an IP address nor a host name") from None
        return value
    if ip.is_unspecified:
        raise ValueError(f"endpoint {value!r}: {host} means 'listen on all', it is not an address a client can dial")
    return value


class PeerRecord(BaseModel):
    """One peer's announcement, stored under every block key of its span."""

    # extra="ignore": newer peers may add fields without older readers dropping them.
    # protected_namespaces=(): our `model_id` field is domain language, not pydantic's.
    model_config = ConfigDict(frozen=True, extra="ignore", allow_inf_nan=False, protected_namespaces=())

    model_id: str = Field(pattern=_MODEL_ID_RE.pattern)
    peer_id: str = Field(min_length=1, max_length=128)
    endpoint: str = Field(max_length=_MAX_STR)
    start: int = Field(ge=0)
    end: int = Field(gt=0)
    state: PeerState
    throughput: float = Field(ge=0.0)  # tokens/s measured at start-up
    cache_tokens_free: int = Field(ge=0)
    dtype: DType
    quant: str = Field(default="none", max_length=64)
    version: str = Field(max_length=64)
    fingerprint: str = Field(max_length=_MAX_STR)  # weights fingerprint of [start, end)
    # Behind NAT: libp2p circuit multiaddrs (".../p2p/RELAY/p2p-circuit/p2p/PEER") that carry
    # gRPC to this peer (swarm/reach); empty when `endpoint` is dialable directly.
    relays: tuple[str, ...] = Field(default=(), max_length=_MAX_RELAYS)
    # Open inference sessions; tokens run through the span so far (a counter: readers take differences).
    sessions: int = Field(default=0, ge=0)
    tokens_served: int = Field(default=0, ge=0)

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        return _check_endpoint(value)

    @field_validator("relays")
    @classmethod
    def _relays(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for maddr in value:
            if len(maddr) > _MAX_STR or circuit_peer(maddr) is None:
                raise ValueError(f"relay {maddr[:80]!r} is not a circuit multiaddr '.../p2p/RELAY/p2p-circuit/p2p/PEER'")
        if len({circuit_peer(m) for m in value}) > 1:
            raise ValueError("relays name more than one peer")
        return value

    @property
    def relayed(self) -> bool:
        return bool(self.relays)

    @model_validator(mode="after")
    def _span(self) -> PeerRecord:
        if not self.start < self.end:
            raise ValueError(f"span [{self.start}, {self.end}) is empty; need start < end")
        return self

    @property
    def span(self) -> range:
        return range(self.start, self.end)


# --- keys ---------------------------------------------------------------------------


def block_key(model_id: str, index: int) -> str:
    return f"{model_id}.block.{index}"


# --- block records ------------------------------------------------------------------


def _store_span(dht: DHT, record: PeerRecord, value: dict[str, Any], expiration: float) -> bool:
    keys = [block_key(record.model_id, i) for i in record.span]
    result = dht.run_coroutine(partial(store_many, keys=keys, subkeys=[record.peer_id] * len(keys),
                                       values=[value] * len(keys), expiration=expiration))
    failed = [key for key, ok in result.items() if not ok]
    if failed:
        logger.debug("DHT refused %d of %d stores (a newer value exists or no node answered): %s",
                     len(failed), len(keys), failed[:4])
    return not failed


def announce(dht: DHT, record: PeerRecord, expiration: float, trust: Trust | None = None) -> bool:
    """Store `record` under every block key of its span until `expiration` (DHT time), signed
    by this member in a private swarm (`trust`).

    Returns True if every key was stored.
    """
    value = record.model_dump(mode="json")
    return _store_span(dht, record, value if trust is None else trust.sign(value), expiration)


def withdraw(dht: DHT, record: PeerRecord, expiration: float | None = None) -> bool:
    """Hide `record` from readers by overwriting it with a tombstone.

    `expiration` must be later than that of the last announcement, or the DHT keeps the
    record (it only accepts newer values); the default, now + DEFAULT_RECORD_TTL, is
    enough for an announcer using that TTL.
    """
    if expiration is None:
        expiration = get_dht_time() + DEFAULT_RECORD_TTL
    return _store_span(dht, record, TOMBSTONE, expiration)


def _parse_peer_value(model_id: str, index: int, num_blocks: int, subkey: Any, value: Any) -> PeerRecord | None:
    if value == TOMBSTONE:
        return None
    try:
        record = PeerRecord.model_validate(value)
    except ValidationError as e:
        logger.debug("skipping malformed record under %s/%r: %s", block_key(model_id, index), subkey, e)
        return None
    # A valid record in the wrong place is still junk: it must be the subkey owner's, for
    # this model, and cover this block.
    if record.peer_id != subkey or record.model_id != model_id or index not in record.span or record.end > num_blocks:
        logger.debug("skipping misplaced record under %s/%r: %s", block_key(model_id, index), subkey, record)
        return None
    return record


class SpanRecords(dict):
    """{block: [PeerRecord, ...]}, and the ids of the private swarms whose records were
    skipped because the reader is not their member (`private_swarms`)."""

    private_swarms: frozenset[str] = frozenset()


def _keys(model_id: str, num_blocks: int, trust: Trust | None) -> list[str]:
    """The block keys, then (a member's read) the swarm's revocation list: one DHT call."""
    keys = [block_key(model_id, i) for i in range(num_blocks)]
    return keys + [revocation_key(trust.swarm_id)] if trust is not None else keys


def fetch_span_records(dht: DHT, model_id: str, num_blocks: int, latest: bool = True,
                       trust: Trust | None = None) -> SpanRecords:
    """Valid, unexpired records for every block: {i: [PeerRecord, ...]} for i in range(num_blocks);
    in a private swarm (`trust`) only those signed by its current members, else only unsigned ones.

    Blocks nobody serves map to []. One DHT call for all blocks. Never raises on bad data.
    """
    keys = _keys(model_id, num_blocks, trust)
    return _span_records(dht.run_coroutine(partial(get_many, keys=keys, latest=latest)), model_id, num_blocks, trust)


class PendingRecords:
    """A `fetch_span_records` under way (`fetch_span_records_later`): `done()`, then `result()`."""

    def __init__(self, future, model_id: str, num_blocks: int, trust: Trust | None) -> None:
        self._future, self._model_id, self._num_blocks, self._trust = future, model_id, num_blocks, trust

    def done(self) -> bool:
        return self._future.done()

    def result(self) -> SpanRecords:
        """The records; raises what the DHT call raised."""
        return _span_records(self._future.result(), self._model_id, self._num_blocks, self._trust)


def fetch_span_records_later(dht: DHT, model_id: str, num_blocks: int, latest: bool = True,
                             delay: float = 0.0, trust: Trust | None = None) -> PendingRecords:
    """`fetch_span_records` without waiting for the DHT, started `delay` s from now: the caller
    goes on meanwhile."""
    fetch = partial(get_many_after, delay=delay, keys=_keys(model_id, num_blocks, trust), latest=latest)
    return PendingRecords(dht.run_coroutine(fetch, return_future=True), model_id, num_blocks, trust)


def _span_records(found: dict, model_id: str, num_blocks: int, trust: Trust | None) -> SpanRecords:
    now = get_dht_time()
    if trust is not None:  # revocations first: they apply to this very read
        trust.learn_revocations(_live_values(found.get(revocation_key(trust.swarm_id)), now))
    records, private_swarms = SpanRecords(), set()
    for i in range(num_blocks):
        records[i] = []
        key = block_key(model_id, i)
        entry = found.get(key)
        if entry is None:
            continue
        if not isinstance(entry.value, dict):  # a plain value stored without subkey
            logger.debug("skipping non-dictionary value under %s: %r", key, entry.value)
            continue
        for subkey, item in entry.value.items():
            if item.expiration_time < now or not admitted(item.value, trust, private_swarms):
                continue
            record = _parse_peer_value(model_id, i, num_blocks, subkey, item.value)
            if record is not None:
                records[i].append(record)
    records.private_swarms = frozenset(private_swarms)
    return records


def _live_values(entry: Any, now: float) -> list[Any]:
    if entry is None or not isinstance(entry.value, dict):
        return []
    return [item.value for item in entry.value.values() if item.expiration_time >= now]


def peers_by_id(records: dict[int, list[PeerRecord]] | Iterable[PeerRecord]) -> dict[str, PeerRecord]:
    """Collapse per-block records (or a flat iterable of them) to one record per peer."""
    flat = (r for rs in records.values() for r in rs) if isinstance(records, dict) else records
    return {r.peer_id: r for r in flat}
