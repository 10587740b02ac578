"""The revocation list in the DHT: published by the swarm's owner (`swarm dht --private`
every REPUBLISH_SECONDS, `swarm revoke` once), read by members (peers every announce
period; clients with every fetch of records, in the same DHT call: swarm/registry.py)."""

from __future__ import annotations

import logging
import threading

from hivemind.utils import get_dht_time

from .identity import SwarmIdentity
from .revocation import revocation_key
from .trust import Trust

logger = logging.getLogger(__name__)

REPUBLISH_SECONDS = 5.0
LIST_TTL = 60.0  # s a publication lives; republished long before


def publish_revocations(dht, identity: SwarmIdentity) -> bool:
    """Stores the directory's current revocation list, signed by the CA; whether it was stored."""
    subkey, value = identity.revocations().signed(identity.key, identity.swarm_id)
    return bool(dht.store(revocation_key(identity.swarm_id), value, get_dht_time() + LIST_TTL, subkey=subkey))


def read_revocations(dht, trust: Trust) -> None:
    """Takes in the swarm's revocation lists found in the DHT (junk is ignored)."""
    entry = dht.get(revocation_key(trust.swarm_id), latest=True)
    if entry is not None and isinstance(entry.value, dict):
        trust.learn_revocations(item.value for item in entry.value.values())


def keep_published(dht, identity: SwarmIdentity, stop: threading.Event) -> threading.Thread:
    """A thread that republishes the list until `stop`, picking up `swarm revoke` runs against
    the same directory."""
    def run() -> None:
        while not stop.is_set():
            try:
                if not publish_revocations(dht, identity):
                    logger.debug("the DHT did not store the revocation list; retrying")
            except Exception as e:  # noqa: BLE001 - the DHT is best effort; try again next period
                logger.warning("publishing the revocation list failed: %s", e)
            stop.wait(REPUBLISH_SECONDS)

    thread = threading.Thread(target=run, daemon=True, name="revocations")
    thread.start()
    return thread
