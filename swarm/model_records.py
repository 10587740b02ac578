"""What a client needs to know that a model exists: the ModelRecord, under the model's own
key and in the index of every model the swarm serves.

Keys (see DESIGN.md):
  "{model_id}.model"      subkey = announcer's DHT peer id, value = the ModelRecord
  "swarmlm.models"        subkey = model_id, value = its ModelRecord (the index of every model)

In a private swarm the values are signed by the announcing member (swarm/membership/trust.py),
and readers take only their swarm's members' records; see swarm/registry.py.
"""

from __future__ import annotations

import logging
import re
from functools import partial
from typing import Any, Iterable

from hivemind.dht import DHT
from hivemind.utils import get_dht_time
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .dht_calls import get_many, store_many
from .membership.trust import Trust, admitted

logger = logging.getLogger(__name__)

MAX_STR = 256  # bounds untrusted strings so one junk record cannot bloat a reader

# The index of models (the DHT cannot list its keys): subkey = model_id, value = its ModelRecord.
MODELS_KEY = "swarmlm.models"


class ModelRecord(BaseModel):
    """What a client needs to know that a model exists in the swarm."""

    model_config = ConfigDict(frozen=True, extra="ignore", protected_namespaces=())

    model_name: str = Field(min_length=1, max_length=MAX_STR)
    num_blocks: int = Field(gt=0, le=100_000)
    config_fingerprint: str = Field(pattern=r"^[0-9a-fA-F]{8,256}$")  # hex digest
    version: str = Field(max_length=64)

    @property
    def model_id(self) -> str:
        return make_model_id(self.model_name, self.config_fingerprint)


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


def model_key(model_id: str) -> str:
    return f"{model_id}.model"


def announce_model(dht: DHT, record: ModelRecord, expiration: float, trust: Trust | None = None) -> bool:
    """Store the model record under its key, each announcer under its own subkey (so one junk
    subkey hides nothing), and in the index of models (MODELS_KEY), in one DHT call; signed
    by this member in a private swarm (`trust`).

    Returns whether the model's own key was stored; the index is best effort (another peer of
    the model may just have stored a later copy there)."""
    key, subkey, value = model_key(record.model_id), dht.peer_id.to_base58(), record.model_dump(mode="json")
    if trust is not None:
        value = trust.sign(value)
    stored = dht.run_coroutine(partial(store_many, keys=[key, MODELS_KEY], subkeys=[subkey, record.model_id],
                                       values=[value, value], expiration=expiration))
    return bool(stored.get((key, subkey)))


def fetch_model(dht: DHT, model_id: str, latest: bool = True, trust: Trust | None = None) -> ModelRecord | None:
    """The model's record, or None if nobody announces a valid one (that `trust` admits)."""
    # Newest first: if announcers disagree on e.g. version, the freshest wins.
    key = model_key(model_id)
    for _, record in model_records(dht.get(key, latest=latest), key, trust):
        if record.model_id == model_id:
            return record
        logger.debug("skipping model record for %s under %s", record.model_id, key)
    return None


def fetch_models(dht: DHT, latest: bool = True, trust: Trust | None = None) -> list[ModelRecord]:
    """Every model the swarm's peers announce (the index under MODELS_KEY), one DHT call."""
    entry = dht.run_coroutine(partial(get_many, keys=[MODELS_KEY], latest=latest)).get(MODELS_KEY)
    found = {r.model_id: r for subkey, r in model_records(entry, MODELS_KEY, trust) if r.model_id == subkey}
    return sorted(found.values(), key=lambda r: r.model_id)


def model_records(entry: Any, key: str, trust: Trust | None = None) -> Iterable[tuple[Any, ModelRecord]]:
    """(subkey, record) for the valid, unexpired ModelRecords of one DHT entry, newest first."""
    if entry is None or not isinstance(entry.value, dict):
        return
    now = get_dht_time()
    for subkey, item in sorted(entry.value.items(), key=lambda kv: -kv[1].expiration_time):
        if item.expiration_time < now or not admitted(item.value, trust):
            continue
        try:
            yield subkey, ModelRecord.model_validate(item.value)
        except ValidationError as e:
            logger.debug("skipping malformed model record under %s/%r: %s", key, subkey, e)
