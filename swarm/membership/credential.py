"""A member credential: the member's name, its ECDSA P-256 key, its certificate signed by the
swarm's CA, and the CA certificate, as one PEM bundle file or one `swarmlm-member:` token.

The member certificate's CN is the member's name, and its one DNS name is MEMBER_DNS_NAME:
peers serve TLS with it, and members' channels check the server against the CA under that
name (gRPC's target-name override), whatever address the peer is dialed at.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

TOKEN_PREFIX = "swarmlm-member:"
MEMBER_DNS_NAME = "swarmlm-member"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class CredentialError(ValueError):
    """A credential that cannot be used; the message says why and what to do."""


def swarm_id_of(ca_cert: x509.Certificate) -> str:
    """First 16 hex digits of sha256(CA public key, DER): names the swarm in keys and messages."""
    der = ca_cert.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:16]


def member_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    """Whether `cert` carries a valid signature of the CA (cryptography checks it, no more)."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def valid_now(cert: x509.Certificate, now: datetime.datetime | None = None) -> bool:
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


@dataclass(frozen=True)
class Credential:
    """What `swarm invite NAME` hands a member, and what `--join` takes."""

    name: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    ca_cert: x509.Certificate

    @property
    def swarm_id(self) -> str:
        return swarm_id_of(self.ca_cert)

    @property
    def serial(self) -> int:
        return self.cert.serial_number

    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def ca_pem(self) -> bytes:
        return self.ca_cert.public_bytes(serialization.Encoding.PEM)

    def to_pem(self) -> str:
        """The bundle file: the member's key, its certificate, then the CA's."""
        return (self.key_pem() + self.cert_pem() + self.ca_pem()).decode()

    def token(self) -> str:
        """The bundle on one line, for a command line or an environment variable."""
        return TOKEN_PREFIX + base64.urlsafe_b64encode(self.to_pem().encode()).decode().rstrip("=")


def load_credential(text_or_path: str, flag: str = "--join") -> Credential:
    """A credential from a bundle file's path or a `swarmlm-member:` token; CredentialError
    (one line naming `flag`) if it is neither, is damaged, or does not hold up."""
    text_or_path = text_or_path.strip()
    shown = text_or_path if len(text_or_path) <= 48 else text_or_path[:45] + "..."
    if text_or_path.startswith(TOKEN_PREFIX):
        body = text_or_path[len(TOKEN_PREFIX):]
        try:
            pem = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except ValueError:
            raise CredentialError(f"{flag} {shown}: the token is damaged (not base64); copy it again from "
                                  "`swarm invite`") from None
    else:
        path = Path(text_or_path).expanduser()
        if not path.is_file():
            raise CredentialError(f"{flag} {shown}: not a file and not a {TOKEN_PREFIX} token; give the file or "
                                  "token that `swarm invite NAME` wrote")
        pem = path.read_bytes()
    return parse_bundle(pem, f"{flag} {shown}")


def parse_bundle(pem: bytes, where: str) -> Credential:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise CredentialError(f"{where}: not a swarmlm member credential (need a key and two certificates in "
                              "PEM); give what `swarm invite NAME` wrote") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or len(certs) != 2:
        raise CredentialError(f"{where}: not a swarmlm member credential (need an EC key, the member's and the "
                              "swarm's certificates)")
    cert, ca_cert = certs
    if not issued_by(cert, ca_cert):
        raise CredentialError(f"{where}: the member certificate is not signed by the swarm's CA in the bundle")
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise CredentialError(f"{where}: the key does not belong to the member certificate")
    now = datetime.datetime.now(datetime.timezone.utc)
    if cert.not_valid_after_utc < now:
        raise CredentialError(f"{where}: the credential of {member_name(cert)!r} expired on "
                              f"{cert.not_valid_after_utc:%Y-%m-%d}; ask the swarm's owner for a new one "
                              "(`swarm invite NAME`)")
    if cert.not_valid_before_utc > now:
        start = f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M}"
        raise CredentialError(f"{where}: the credential is valid only from {start} UTC; check this machine's clock")
    return Credential(member_name(cert), key, cert, ca_cert)
