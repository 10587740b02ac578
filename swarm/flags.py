"""Flags: a client's signed word, kept in the DHT, that a peer returned wrong outputs.

A client that verifies (client/verify.py) and catches a peer lying stores a flag under
"{model_id}.flags", subkey "{peer_id}:{signer}", so that other clients can weigh that peer
down before they meet it. The signer is the flagging client's public key (ECDSA P-256, a
key per client process, from the `cryptography` package); the signature covers the model,
the peer, the reason and the time of the flag, so nobody can write a flag in another
client's name or keep an old one alive past FLAG_LIFETIME by storing it again.

A flag is an opinion, not a verdict: anyone can make keys, so readers only count distinct
signers, and routing multiplies a flagged peer's cost by 1 + that count (client/routing.py)
rather than refusing it. Clients that verify catch a liar themselves either way.
"""

from __future__ import annotations

import base64
import time
import json
import logging
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hivemind.utils import get_dht_time

logger = logging.getLogger(__name__)

FLAG_LIFETIME = 3600.0  # s a flag is stored for and believed
_MAX_REASON = 200


def flags_key(model_id: str) -> str:
    return f"{model_id}.flags"


def _signed_bytes(model_id: str, peer_id: str, reason: str, when: float) -> bytes:
    return json.dumps([model_id, peer_id, reason, round(when, 3)], separators=(",", ":")).encode()


class FlagSigner:
    """This client's key for signing flags."""

    def __init__(self) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        public = self._key.public_key().public_bytes(serialization.Encoding.DER,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo)
        self.signer = base64.b64encode(public).decode()

    def flag(self, model_id: str, peer_id: str, reason: str) -> tuple[str, dict[str, Any]]:
        """(subkey, value) of a flag on `peer_id`, signed now."""
        reason, now = reason[:_MAX_REASON], get_dht_time()
        signature = self._key.sign(_signed_bytes(model_id, peer_id, reason, now), ec.ECDSA(hashes.SHA256()))
        value = {"peer_id": peer_id, "reason": reason, "time": round(now, 3), "signer": self.signer,
                 "signature": base64.b64encode(signature).decode()}
        return f"{peer_id}:{self.signer[-16:]}", value


def store_flag(dht, signer: FlagSigner, model_id: str, peer_id: str, reason: str) -> None:
    """Stores a flag on `peer_id` without waiting for the DHT (best effort)."""
    subkey, value = signer.flag(model_id, peer_id, reason)
    dht.store(flags_key(model_id), value, get_dht_time() + FLAG_LIFETIME, subkey=subkey, return_future=True)


def _valid(model_id: str, value: Any, now: float) -> tuple[str, str] | None:
    """(peer_id, signer) of a genuine, fresh flag; None for anything else."""
    try:
        peer_id, reason, when, signer = value["peer_id"], value["reason"], float(value["time"]), value["signer"]
        if not (isinstance(peer_id, str) and isinstance(reason, str) and len(reason) <= _MAX_REASON):
            return None
        if not now - FLAG_LIFETIME <= when <= now + 60:
            return None
        key = serialization.load_der_public_key(base64.b64decode(signer))
        if not isinstance(key, ec.EllipticCurvePublicKey):
            return None
        key.verify(base64.b64decode(value["signature"]), _signed_bytes(model_id, peer_id, reason, when),
                   ec.ECDSA(hashes.SHA256()))
    except (KeyError, TypeError, ValueError, InvalidSignature) as e:
        logger.debug("skipping a flag that does not verify: %s", e)
        return None
    return peer_id, signer


def count_flags(model_id: str, entry: Any) -> dict[str, int]:
    """{peer_id: distinct signers flagging it} from what `dht.get(flags_key(model_id))` returned."""
    if entry is None or not isinstance(entry.value, dict):
        return {}
    now, signers = get_dht_time(), {}
    for item in entry.value.values():
        found = _valid(model_id, item.value, now) if item.expiration_time >= now else None
        if found is not None:
            signers.setdefault(found[0], set()).add(found[1])
    return {peer_id: len(who) for peer_id, who in signers.items()}


class FlagsView:
    """A model's flags as one client sees them: fetched in the background at most every
    `refresh` seconds (routing never waits on the DHT for them), and its own to store."""

    def __init__(self, dht, model_id: str, refresh: float = 30.0) -> None:
        self.dht, self.model_id, self.refresh = dht, model_id, refresh
        self.signer: FlagSigner | None = None  # made with the first flag: most clients never flag
        self._counts: dict[str, int] = {}
        self._pending = None
        self._fetched = -refresh

    def counts(self) -> dict[str, int]:
        """{peer_id: distinct clients flagging it}, as of the last fetch that finished."""
        import time

        if self._pending is not None and self._pending.done():
            pending, self._pending = self._pending, None
            try:
                self._counts = count_flags(self.model_id, pending.result())
            except Exception as e:  # noqa: BLE001 - a later call fetches again
                logger.debug("fetching flags failed: %s", e)
        if self._pending is None and time.monotonic() - self._fetched > self.refresh:
            self._fetched = time.monotonic()
            self._pending = self.dht.get(flags_key(self.model_id), latest=True, return_future=True)
        return self._counts

    def store(self, peer_id: str, reason: str) -> None:
        self.signer = self.signer or FlagSigner()
        store_flag(self.dht, self.signer, self.model_id, peer_id, reason)
