"""What a member believes: records signed by a current member of its swarm, and nothing else.

A `Trust` is built from the member's credential. It signs this member's DHT records (the
record plus `swarm`, `member_cert` and `member_sig`: ECDSA-SHA256 over the canonical JSON of
everything but the last two), and checks others': the certificate must be signed by the
swarm's CA, valid now and not revoked, and the signature must hold.

Readers check every record of every fetch (clients refetch every 2 s), so both checks are
cached: a certificate by its bytes (parsed once into a `Member`), a record by its signature,
kept with the whole value it came with (the same value is stored under each block key of a
span): a value equal to a checked one is not checked again. Measured (benchmarks/membership.py,
2-core box): ~2 us per record seen before, ~0.5 ms for a member's first.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .credential import Credential, issued_by, member_name
from .revocation import RevocationList
from .signing import canonical, sign, signature_ok

logger = logging.getLogger(__name__)

SWARM_FIELD, CERT_FIELD, SIGNATURE_FIELD = "swarm", "member_cert", "member_sig"
_MAX_CACHED = 4096  # certificates or signatures; the cache starts over when full (junk cannot grow it)
_MAX_CERT_CHARS = 4096


def swarm_of(value: Any) -> str | None:
    """The private swarm a signed record says it belongs to; None for an open swarm's record."""
    if isinstance(value, dict) and SIGNATURE_FIELD in value:
        swarm = value.get(SWARM_FIELD)
        return swarm if isinstance(swarm, str) else "?"
    return None


@dataclass(frozen=True)
class Member:
    """A certificate the swarm's CA signed, as the hot path needs it (parsed once)."""

    name: str
    serial: int
    not_before: float  # Unix times
    not_after: float
    public_key: ec.EllipticCurvePublicKey


class Trust:
    """One member's view of its private swarm: its own credential, the CA, the revocations."""

    def __init__(self, credential: Credential) -> None:
        self.credential = credential
        self.swarm_id, self.name = credential.swarm_id, credential.name
        self.ca_cert = credential.ca_cert
        self.ca_public_key = credential.ca_cert.public_key()
        self.ca_pem = credential.ca_pem()
        self.revocations = RevocationList()
        self._cert_b64 = base64.b64encode(credential.cert.public_bytes(serialization.Encoding.DER)).decode()
        self._members: dict[str, Member | None] = {}  # base64 DER -> the member, None if the CA did not sign it
        self._signed: dict[str, dict[str, Any]] = {}  # a signature checked -> the whole value it came with
        self._lock = threading.Lock()

    # --- revocation -----------------------------------------------------------------------

    def learn_revocations(self, values: Iterable[Any]) -> None:
        """Takes in the validly signed revocation lists among `values` (read from the DHT)."""
        for value in values:
            found = RevocationList.verified(value, self.ca_public_key, self.swarm_id)
            if found is None:
                continue
            merged = self.revocations.union(found)
            if merged.revoked.keys() != self.revocations.revoked.keys():
                logger.info("revoked members of swarm %s: %s", self.swarm_id, ", ".join(sorted(merged.names())))
                if self.credential.serial in merged.revoked:
                    logger.warning("this credential (member %r) was revoked: members no longer use or answer it",
                                   self.name)
            self.revocations = merged

    def refused(self, member: Member) -> str | None:
        """Why a member (its certificate known to be the CA's) does not count now, or None."""
        if member.serial in self.revocations.revoked:
            return f"member {member.name!r} was revoked"
        if not member.not_before <= time.time() <= member.not_after:
            return f"the credential of {member.name!r} is not valid now (it expires {time.ctime(member.not_after)})"
        return None

    # --- certificates ---------------------------------------------------------------------

    def member(self, cert_b64: Any) -> Member | None:
        """The member whose certificate `cert_b64` is, if the swarm's CA signed it (cached)."""
        if not isinstance(cert_b64, str) or len(cert_b64) > _MAX_CERT_CHARS:
            return None
        if cert_b64 in self._members:
            return self._members[cert_b64]
        try:
            cert = x509.load_der_x509_certificate(base64.b64decode(cert_b64, validate=True))
        except ValueError:
            cert = None
        member = None
        key = cert.public_key() if cert is not None and issued_by(cert, self.ca_cert) else None
        if isinstance(key, ec.EllipticCurvePublicKey):
            member = Member(member_name(cert), cert.serial_number, cert.not_valid_before_utc.timestamp(),
                            cert.not_valid_after_utc.timestamp(), key)
        with self._lock:
            if len(self._members) >= _MAX_CACHED:
                self._members.clear()
            self._members[cert_b64] = member
        return member

    @property
    def cert_b64(self) -> str:
        return self._cert_b64

    # --- records --------------------------------------------------------------------------

    def sign(self, record: dict[str, Any]) -> dict[str, Any]:
        """`record` (JSON-able, as stored in the DHT) signed by this member."""
        body = {**record, SWARM_FIELD: self.swarm_id}
        return {**body, CERT_FIELD: self._cert_b64, SIGNATURE_FIELD: sign(self.credential.key, canonical(body))}

    def verify(self, value: Any) -> str | None:
        """The member who signed `value`, if a current member of this swarm did; else None."""
        if not isinstance(value, dict) or value.get(SWARM_FIELD) != self.swarm_id:
            return None
        signature, member = value.get(SIGNATURE_FIELD), self.member(value.get(CERT_FIELD))
        if not isinstance(signature, str) or member is None:
            return None
        # The same signed value is read under every block key of its span, every refresh: a
        # value equal to one already checked (signature, certificate and body) is not checked again.
        if self._signed.get(signature) != value:
            try:
                data = canonical({k: v for k, v in value.items() if k not in (CERT_FIELD, SIGNATURE_FIELD)})
            except (TypeError, ValueError):
                return None
            if not signature_ok(member.public_key, data, signature):
                return None
            with self._lock:
                if len(self._signed) >= _MAX_CACHED:
                    self._signed.clear()
                self._signed[signature] = value
        why = self.refused(member)
        if why is not None:
            logger.debug("skipping a record: %s", why)
            return None
        return member.name


def admitted(value: Any, trust: Trust | None, private_swarms: set[str] | None = None) -> bool:
    """Whether a reader takes a record read from the DHT: a member (`trust`) only its swarm's
    current members' signed records, an open swarm's reader (None) only unsigned ones, so
    the two kinds never mix. Records of a private swarm the reader is not in are noted in
    `private_swarms` (by swarm id), for a message saying how to join it."""
    swarm = swarm_of(value)
    if trust is None and swarm is None:
        return True
    if trust is not None and swarm == trust.swarm_id:
        return trust.verify(value) is not None
    if swarm is not None and private_swarms is not None:
        private_swarms.add(swarm[:16])
    return False
