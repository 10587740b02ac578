"""The swarm identity of a private swarm: a certificate authority (ECDSA P-256 key and a
self-signed X.509 CA certificate) in a directory (--swarm-dir), with the members it has
issued credentials to and the revocation list.

    DIR/ca.key        the CA's private key (mode 0600): whoever holds it can admit anyone
    DIR/ca.pem        the CA certificate (public; every credential carries a copy)
    DIR/members.json  {name: {"serials": [...], "expires": [...]}} the credentials issued
    DIR/revoked.json  the revocation list (swarm/membership/revocation.py)
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .credential import MEMBER_DNS_NAME, NAME_PATTERN, Credential, CredentialError, swarm_id_of
from .revocation import RevocationList

DEFAULT_SWARM_DIR = "~/.config/swarmlm/swarm"
DEFAULT_DAYS = 365
CA_YEARS = 20


class IdentityError(RuntimeError):
    """The swarm directory is missing, damaged or asked for something it cannot do."""


def _write_private(path: Path, data: bytes) -> None:
    """Written under a temporary name with mode 0600 from the start, then renamed (atomic)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class SwarmIdentity:
    """The CA of one private swarm, loaded from (or created in) its directory."""

    def __init__(self, folder: Path, key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate) -> None:
        self.folder, self.key, self.ca_cert = folder, key, ca_cert
        self.swarm_id = swarm_id_of(ca_cert)

    @classmethod
    def create(cls, folder: str | Path) -> SwarmIdentity:
        folder = Path(folder).expanduser()
        if (folder / "ca.key").exists():
            raise IdentityError(f"{folder} already holds a swarm identity; use it, or pick another --swarm-dir")
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "swarmlm swarm CA")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=365 * CA_YEARS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        _write_private(folder / "ca.key", key.private_bytes(serialization.Encoding.PEM,
                                                            serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()))
        _write_private(folder / "ca.pem", cert.public_bytes(serialization.Encoding.PEM))
        identity = cls(folder, key, cert)
        identity._save_members({})
        identity.save_revocations(RevocationList())
        return identity

    @classmethod
    def load(cls, folder: str | Path) -> SwarmIdentity:
        folder = Path(folder).expanduser()
        if not (folder / "ca.key").is_file():
            raise IdentityError(f"{folder} holds no swarm identity; create one with `swarm init --swarm-dir "
                                f"{folder}` (or `swarm dht --private --swarm-dir {folder}`)")
        try:
            key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes())
        except (OSError, ValueError) as e:
            raise IdentityError(f"{folder}: the swarm identity is damaged ({e})") from None
        return cls(folder, key, cert)

    @classmethod
    def load_or_create(cls, folder: str | Path) -> tuple[SwarmIdentity, bool]:
        """The identity in `folder`, and whether it was created just now."""
        if (Path(folder).expanduser() / "ca.key").exists():
            return cls.load(folder), False
        return cls.create(folder), True

    # --- members ------------------------------------------------------------------------

    def members(self) -> dict[str, dict]:
        path = self.folder / "members.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def _save_members(self, members: dict[str, dict]) -> None:
        _write_private(self.folder / "members.json", json.dumps(members, indent=1, sort_keys=True).encode())

    def invite(self, name: str, days: int = DEFAULT_DAYS) -> Credential:
        """A new credential for member `name` (a name may hold several, e.g. one per machine)."""
        credential = self._issue(name, days)
        members = self.members()
        entry = members.setdefault(name, {"serials": [], "expires": []})
        entry["serials"].append(str(credential.serial))
        entry["expires"].append(f"{credential.cert.not_valid_after_utc:%Y-%m-%d}")
        self._save_members(members)
        return credential

    def owner_credential(self) -> Credential:
        """A credential for the owner's own tools (the DHT node's dashboard reads members' records
        with it): held in memory only, valid a day, named in no member list."""
        return self._issue("swarm-owner", 1)

    def _issue(self, name: str, days: int) -> Credential:
        if not NAME_PATTERN.match(name):
            raise CredentialError(f"member name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
        if days <= 0:
            raise CredentialError(f"--days {days}: must be at least 1")
        if name in self.revocations().names():
            raise CredentialError(f"member {name!r} was revoked; a revoked name stays revoked, pick another name")
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        expires = now + datetime.timedelta(days=days)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(self.ca_cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(expires)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(MEMBER_DNS_NAME)]), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(self.key, hashes.SHA256()))
        return Credential(name, key, cert, self.ca_cert)

    # --- revocation ---------------------------------------------------------------------

    def revocations(self) -> RevocationList:
        path = self.folder / "revoked.json"
        return RevocationList.from_json(path.read_text()) if path.exists() else RevocationList()

    def save_revocations(self, revoked: RevocationList) -> None:
        _write_private(self.folder / "revoked.json", revoked.to_json().encode())

    def revoke(self, name: str) -> RevocationList:
        """Adds every credential issued to `name` to the revocation list (kept in the directory)."""
        members = self.members()
        if name not in members:
            known = ", ".join(sorted(members)) or "none yet"
            raise CredentialError(f"no member named {name!r} in {self.folder} (members: {known})")
        revoked = self.revocations().adding(name, [int(s) for s in members[name]["serials"]])
        self.save_revocations(revoked)
        return revoked


def add_swarm_dir_argument(parser) -> None:
    """--swarm-dir, as every command that needs the swarm's CA takes it."""
    parser.add_argument("--swarm-dir", default=os.environ.get("SWARMLM_SWARM_DIR", DEFAULT_SWARM_DIR), metavar="DIR",
                        help="directory of the swarm identity: its CA key (keep it secret), the members issued and "
                        "the revocation list (default: $SWARMLM_SWARM_DIR or %(default)s)")
