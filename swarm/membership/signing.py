"""ECDSA-SHA256 signatures over the canonical JSON of a value (sorted keys, no spaces), as
DHT records carry them: a value read back through the DHT (msgpack) re-encodes to the same
bytes, so a reader checks exactly what the signer signed."""

from __future__ import annotations

import base64
import json
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

_ECDSA = ec.ECDSA(hashes.SHA256())


def canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode()


def sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> str:
    """The signature of `data`, base64url."""
    return base64.urlsafe_b64encode(key.sign(data, _ECDSA)).decode()


def signature_ok(public_key: ec.EllipticCurvePublicKey, data: bytes, signature: Any) -> bool:
    if not isinstance(signature, str) or len(signature) > 200:
        return False
    try:
        public_key.verify(base64.urlsafe_b64decode(signature), data, _ECDSA)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True
