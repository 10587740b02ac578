"""The revocation list of a private swarm: the members' certificate serials that no longer
count, signed by the swarm's CA and kept in the DHT.

Key `swarmlm.swarm.{swarm_id}.revoked`; each publication goes under a subkey of its own (a
digest of the signed value, which carries the time it was signed), so nobody can occupy the
subkey the next publication needs. `swarm dht --private` republishes the directory's list
every few seconds; members read the key with their records and keep the union of every
validly signed list they have seen: revocation only ever grows, and junk makes nobody forget.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from .signing import canonical, sign, signature_ok

MAX_REVOKED = 10_000  # bounds what one (validly signed) value may make a reader hold


def revocation_key(swarm_id: str) -> str:
    return f"swarmlm.swarm.{swarm_id}.revoked"


@dataclass(frozen=True)
class RevocationList:
    """Revoked certificate serials, each with its member's name (for messages)."""

    revoked: dict[int, str] = field(default_factory=dict)
    version: int = 0

    def names(self) -> set[str]:
        return set(self.revoked.values())

    def adding(self, name: str, serials: list[int]) -> RevocationList:
        return RevocationList({**self.revoked, **{s: name for s in serials}}, self.version + 1)

    def union(self, other: RevocationList) -> RevocationList:
        if other.revoked.keys() <= self.revoked.keys():
            return self if self.version >= other.version else RevocationList(self.revoked, other.version)
        return RevocationList({**other.revoked, **self.revoked}, max(self.version, other.version))

    def to_json(self) -> str:
        return json.dumps({"version": self.version, "revoked": {str(s): n for s, n in sorted(self.revoked.items())}},
                          indent=1)

    @classmethod
    def from_json(cls, text: str) -> RevocationList:
        data = json.loads(text)
        return cls({int(s): n for s, n in data["revoked"].items()}, int(data["version"]))

    # --- in the DHT -----------------------------------------------------------------------

    def signed(self, ca_key: ec.EllipticCurvePrivateKey, swarm_id: str) -> tuple[str, dict[str, Any]]:
        """(subkey, value) to store under `revocation_key(swarm_id)`."""
        body = {"swarm_id": swarm_id, "version": self.version, "signed_at": time.time(),
                "revoked": [[str(s), n] for s, n in sorted(self.revoked.items())]}
        value = {**body, "signature": sign(ca_key, canonical(body))}
        return hashlib.sha256(canonical(value)).hexdigest()[:24], value

    @classmethod
    def verified(cls, value: Any, ca_public_key: ec.EllipticCurvePublicKey, swarm_id: str) -> RevocationList | None:
        """The list in a value read from the DHT, or None unless the swarm's CA signed it."""
        if not isinstance(value, dict) or value.get("swarm_id") != swarm_id:
            return None
        body = {k: v for k, v in value.items() if k != "signature"}
        try:
            if not signature_ok(ca_public_key, canonical(body), value.get("signature")):
                return None
            revoked = value["revoked"]
            if len(revoked) > MAX_REVOKED:
                return None
            return cls({int(s): str(n) for s, n in revoked}, int(value["version"]))
        except (KeyError, TypeError, ValueError):
            return None
