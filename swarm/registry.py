"""What peers announce in the DHT and how it is read back.

Keys (see DESIGN.md):
  "{model_id}.block.{i}"  subkey = peer id, value = that peer's PeerRecord (as a plain dict)
  "{model_id}.model"      subkey = announcer's DHT peer id, value = the ModelRecord
  "swarmlm.models"        subkey = model_id, value = its ModelRecord (the index of every model)

Everything read from the DHT is untrusted: any participant may store anything under
any key. Readers therefore validate each value with pydantic and skip what fails,
logging at debug level; a bad value never raises out of a fetch.

Withdrawal: hivemind cannot delete, and a subkey is only replaced by a value with a
*later* expiration time. `withdraw` therefore stores a tombstone (`{"withdrawn": True}`)
that outlives the last announcement; readers drop tombstones silently. `draining` stays
a real, visible state (a peer finishing its sessions but taking no new ones).
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import logging
import re
from functools import partial
from typing import Any, Iterable, Literal

from hivemind.dht import DHT, DHTNode
from hivemind.utils import get_dht_time
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .dtypes import COMPUTE_DTYPES
from .reach.circuits import circuit_peer

logger = logging.getLogger(__name__)

# Record lifetime a peer's announcer should use; it refreshes well before this runs out.
DEFAULT_RECORD_TTL = 30.0

TOMBSTONE: dict[str, Any] = {"withdrawn": True}

_MAX_STR = 256  # bounds untrusted strings so one junk record cannot bloat a reader
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


class ModelRecord(BaseModel):
    """What a client needs to know that a model exists in the swarm."""

    model_config = ConfigDict(frozen=True, extra="ignore", protected_namespaces=())

    model_name: str = Field(min_length=1, max_length=_MAX_STR)
    num_blocks: int = Field(gt=0, le=100_000)
    config_fingerprint: str = Field(pattern=r"^[0-9a-fA-F]{8,256}$")  # hex digest
    version: str = Field(max_length=64)

    @property
    def model_id(self) -> str:
        return make_model_id(self.model_name, self.config_fingerprint)


# --- keys ---------------------------------------------------------------------------


def make_model_id(model_name: str, config_fingerprint: str) -> str:
    """'HuggingFaceTB/SmolLM2-135M-Instruct', 'ab12cd34...' -> 'smollm2-135m-instruct-ab12cd34'.

    Only the last path component names the model, so a hub id and a local folder of the
    same weights agree; the fingerprint prefix keeps different configs apart.
    """
    fp = config_fingerprint.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{8,}", fp):
        raise ValueError(f"config_fingerprint {config_fingerprint!r} must be a hex digest of at least 8 digits")
    base = re.split(r"[/\\]", model_name.strip().rstrip("/\\"))[-1].lower()
    base = re.sub(r"[^a-z0-9._-]+", "-", base).strip("-._")[:64] or "model"
    return f"{base}-{fp[:8]}"


def block_key(model_id: str, index: int) -> str:
    return f"{model_id}.block.{index}"


def model_key(model_id: str) -> str:
    return f"{model_id}.model"


# The index of models (the DHT cannot list its keys): subkey = model_id, value = its ModelRecord.
MODELS_KEY = "swarmlm.models"


# --- block records ------------------------------------------------------------------


async def _store_many(
    _dht: DHT, node: DHTNode, keys: list[str], subkeys: list[str], values: list[Any], expiration: float
) -> dict[Any, bool]:
    # Runs inside the DHT process: one traversal stores every key, instead of one per block.
    return await node.store_many(keys, values, expiration, subkeys=subkeys)


async def _get_many(
    _dht: DHT, node: DHTNode, keys: list[str], latest: bool
) -> dict[str, Any]:
    # latest=True walks to every replica, so subkeys stored on different nodes are all merged.
    return await node.get_many(keys, sufficient_expiration_time=float("inf") if latest else None)


async def _get_many_after(dht: DHT, node: DHTNode, delay: float, keys: list[str], latest: bool) -> dict[str, Any]:
    await asyncio.sleep(delay)
    return await _get_many(dht, node, keys, latest)


def _store_span(dht: DHT, record: PeerRecord, value: dict[str, Any], expiration: float) -> bool:
    keys = [block_key(record.model_id, i) for i in record.span]
    result = dht.run_coroutine(partial(_store_many, keys=keys, subkeys=[record.peer_id] * len(keys),
                                       values=[value] * len(keys), expiration=expiration))
    failed = [key for key, ok in result.items() if not ok]
    if failed:
        logger.debug("DHT refused %d of %d stores (a newer value exists or no node answered): %s",
                     len(failed), len(keys), failed[:4])
    return not failed


def announce(dht: DHT, record: PeerRecord, expiration: float) -> bool:
    """Store `record` under every block key of its span until `expiration` (DHT time).

    Returns True if every key was stored.
    """
    return _store_span(dht, record, record.model_dump(mode="json"), expiration)


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


def fetch_span_records(
    dht: DHT, model_id: str, num_blocks: int, latest: bool = True
) -> dict[int, list[PeerRecord]]:
    """Valid, unexpired records for every block: {i: [PeerRecord, ...]} for i in range(num_blocks).

    Blocks nobody serves map to []. One DHT call for all blocks. Never raises on bad data.
    """
    keys = [block_key(model_id, i) for i in range(num_blocks)]
    return _span_records(dht.run_coroutine(partial(_get_many, keys=keys, latest=latest)), model_id, keys)


class PendingRecords:
    """A `fetch_span_records` under way (`fetch_span_records_later`): `done()`, then `result()`."""

    def __init__(self, future, model_id: str, keys: list[str]) -> None:
        self._future, self._model_id, self._keys = future, model_id, keys

    def done(self) -> bool:
        return self._future.done()

    def result(self) -> dict[int, list[PeerRecord]]:
        """The records; raises what the DHT call raised."""
        return _span_records(self._future.result(), self._model_id, self._keys)


def fetch_span_records_later(dht: DHT, model_id: str, num_blocks: int, latest: bool = True,
                             delay: float = 0.0) -> PendingRecords:
    """`fetch_span_records` without waiting for the DHT, started `delay` s from now: the caller
    goes on meanwhile."""
    keys = [block_key(model_id, i) for i in range(num_blocks)]
    fetch = partial(_get_many_after, delay=delay, keys=keys, latest=latest)
    return PendingRecords(dht.run_coroutine(fetch, return_future=True), model_id, keys)


def _span_records(found: dict, model_id: str, keys: list[str]) -> dict[int, list[PeerRecord]]:
    num_blocks = len(keys)
    now = get_dht_time()
    records: dict[int, list[PeerRecord]] = {}
    for i, key in enumerate(keys):
        records[i] = []
        entry = found.get(key)
        if entry is None:
            continue
        if not isinstance(entry.value, dict):  # a plain value stored without subkey
            logger.debug("skipping non-dictionary value under %s: %r", key, entry.value)
            continue
        for subkey, item in entry.value.items():
            if item.expiration_time < now:
                continue
            record = _parse_peer_value(model_id, i, num_blocks, subkey, item.value)
            if record is not None:
                records[i].append(record)
    return records


def peers_by_id(records: dict[int, list[PeerRecord]] | Iterable[PeerRecord]) -> dict[str, PeerRecord]:
    """Collapse per-block records (or a flat iterable of them) to one record per peer."""
    flat = (r for rs in records.values() for r in rs) if isinstance(records, dict) else records
    return {r.peer_id: r for r in flat}


# --- model record -------------------------------------------------------------------


def announce_model(dht: DHT, record: ModelRecord, expiration: float) -> bool:
    """Store the model record under its key, each announcer under its own subkey (so one junk
    subkey hides nothing), and in the index of models (MODELS_KEY), in one DHT call.

    Returns whether the model's own key was stored; the index is best effort (another peer of
    the model may just have stored a later copy there)."""
    key, subkey, value = model_key(record.model_id), dht.peer_id.to_base58(), record.model_dump(mode="json")
    stored = dht.run_coroutine(partial(_store_many, keys=[key, MODELS_KEY], subkeys=[subkey, record.model_id],
                                       values=[value, value], expiration=expiration))
    return bool(stored.get((key, subkey)))


def fetch_model(dht: DHT, model_id: str, latest: bool = True) -> ModelRecord | None:
    """The model's record, or None if nobody announces a valid one."""
    # Newest first: if announcers disagree on e.g. version, the freshest wins.
    for _, record in _model_records(dht.get(model_key(model_id), latest=latest), model_key(model_id)):
        if record.model_id == model_id:
            return record
        logger.debug("skipping model record for %s under %s", record.model_id, model_key(model_id))
    return None


def fetch_models(dht: DHT, latest: bool = True) -> list[ModelRecord]:
    """Every model the swarm's peers announce (the index under MODELS_KEY), one DHT call."""
    entry = dht.run_coroutine(partial(_get_many, keys=[MODELS_KEY], latest=latest)).get(MODELS_KEY)
    return sorted({r.model_id: r for subkey, r in _model_records(entry, MODELS_KEY) if r.model_id == subkey}.values(),
                  key=lambda r: r.model_id)


def _model_records(entry: Any, key: str) -> Iterable[tuple[Any, ModelRecord]]:
    """(subkey, record) for the valid, unexpired ModelRecords of one DHT entry, newest first."""
    if entry is None or not isinstance(entry.value, dict):
        return
    now = get_dht_time()
    for subkey, item in sorted(entry.value.items(), key=lambda kv: -kv[1].expiration_time):
        if item.expiration_time < now:
            continue
        try:
            yield subkey, ModelRecord.model_validate(item.value)
        except ValidationError as e:
            logger.debug("skipping malformed model record under %s/%r: %s", key, subkey, e)
