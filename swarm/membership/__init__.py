"""Private swarms: a swarm identity (a CA), member credentials, signed DHT records, a signed
revocation list, and an authenticated, encrypted gRPC data plane.

Used by both peers and clients. Without a credential (an open swarm) nothing here is used:
records are unsigned and gRPC is plaintext, as before.
"""

import functools

from .credential import Credential, CredentialError, load_credential
from .trust import Trust

__all__ = ["Credential", "CredentialError", "Trust", "load_credential", "trust_from"]


def trust_from(join: str | None, flag: str = "--join") -> Trust | None:
    """The Trust of the credential `join` names (a file or token), None for an open swarm;
    CredentialError (one line) if it cannot be used. One Trust per credential in a process:
    its clients share the revocations learnt, and the connections to peers."""
    return None if not join else _trust(join.strip(), flag)


@functools.lru_cache(maxsize=16)
def _trust(join: str, flag: str) -> Trust:
    return Trust(load_credential(join, flag))
