"""The data plane of a private swarm: gRPC over TLS, plus a signed member token on every call.

- Peers serve TLS with their member certificate; members' channels trust only the swarm's CA
  and check the server's name as MEMBER_DNS_NAME, so a client talks to members only, and an
  outsider on the path sees ciphertext.
- Each call carries `swarmlm-member: CERT.TIME.SIGNATURE` in its metadata (the caller's
  certificate, a Unix time, and its ECDSA signature over the swarm id and that time), added by
  a client interceptor (blocking channels) or call credentials (grpc.aio); a server interceptor
  refuses calls without a valid one. Why a token and not client certificates: gRPC Python
  can only *require* them, and an outsider then gets a failed handshake (UNAVAILABLE), not
  UNAUTHENTICATED with a message that says what to do.
- Costs on the hot path: a caller re-signs its token every TOKEN_RESIGN_SECONDS; a server
  checks a token once and then finds it in a dict (see benchmarks/membership.py). A stream
  (Inference, PushStream) is one call, checked when it opens.

Without a trust (an open swarm) every helper here is plain insecure gRPC, as before.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any, Sequence

import grpc

from .credential import MEMBER_DNS_NAME
from .signing import sign, signature_ok
from .trust import Member, Trust

TOKEN_KEY = "swarmlm-member"
TOKEN_RESIGN_SECONDS = 60.0
TOKEN_MAX_AGE = 300.0  # s; older (or this far in the future: clock skew) is refused
NOT_A_MEMBER = "this swarm is private: join it with --join CREDENTIAL"


def _token_data(swarm_id: str, issued: int) -> bytes:
    return f"swarmlm-call:{swarm_id}:{issued}".encode()


class CallToken(grpc.AuthMetadataPlugin):
    """The caller's token, re-signed every TOKEN_RESIGN_SECONDS; gRPC asks for it on each call."""

    def __init__(self, trust: Trust) -> None:
        self.trust = trust
        self._token, self._issued = "", 0.0
        self._lock = threading.Lock()

    def token(self) -> str:
        now = time.time()
        with self._lock:
            if now - self._issued > TOKEN_RESIGN_SECONDS:
                issued = int(now)
                signature = sign(self.trust.credential.key, _token_data(self.trust.swarm_id, issued))
                self._token, self._issued = f"{self.trust.cert_b64}.{issued}.{signature}", now
            return self._token

    def __call__(self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback) -> None:
        callback(((TOKEN_KEY, self.token()),), None)


def _tls_options(trust: Trust | None, options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return [*options, ("grpc.ssl_target_name_override", MEMBER_DNS_NAME)] if trust else list(options)


def _credentials(trust: Trust) -> grpc.ChannelCredentials:
    return grpc.composite_channel_credentials(grpc.ssl_channel_credentials(root_certificates=trust.ca_pem),
                                              grpc.metadata_call_credentials(CallToken(trust), name=TOKEN_KEY))


def channel(endpoint: str, trust: Trust | None, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A blocking channel to a peer: TLS + member token in a private swarm, else plaintext.

    Here the token rides in an interceptor, not in call credentials: gRPC runs a credentials
    plugin on a thread of its own, which measured 0.6 ms per unary call on loopback (an
    interceptor: ~0.01 ms)."""
    if trust is None:
        return grpc.insecure_channel(endpoint, options=list(options))
    tls = grpc.ssl_channel_credentials(root_certificates=trust.ca_pem)
    return grpc.intercept_channel(grpc.secure_channel(endpoint, tls, options=_tls_options(trust, options)),
                                  _TokenInterceptor(CallToken(trust)))


class _CallDetails(collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                                           "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    pass


class _TokenInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                        grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the caller's token to every call's metadata (blocking channels)."""

    def __init__(self, token: CallToken) -> None:
        self.token = token

    def _with_token(self, details: grpc.ClientCallDetails) -> _CallDetails:
        metadata = (*(details.metadata or ()), (TOKEN_KEY, self.token.token()))
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)


def aio_channel(endpoint: str, trust: Trust | None, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
    """`channel` for grpc.aio (peer-to-peer pushes)."""
    if trust is None:
        return grpc.aio.insecure_channel(endpoint, options=list(options))
    return grpc.aio.secure_channel(endpoint, _credentials(trust), options=_tls_options(trust, options))


def add_port(server: grpc.aio.Server, listen: str, trust: Trust | None) -> int:
    """Binds `listen`: TLS with this member's certificate in a private swarm, else plaintext."""
    if trust is None:
        return server.add_insecure_port(listen)
    credentials = grpc.ssl_server_credentials([(trust.credential.key_pem(), trust.credential.cert_pem())],
                                              require_client_auth=False)
    return server.add_secure_port(listen, credentials)


def server_interceptors(trust: Trust | None) -> list[grpc.aio.ServerInterceptor]:
    return [MemberCheck(trust)] if trust is not None else []


class MemberCheck(grpc.aio.ServerInterceptor):
    """Refuses every call without a current member's token: UNAUTHENTICATED (no token, a bad
    or stale one, another swarm's), PERMISSION_DENIED (a revoked or expired member)."""

    def __init__(self, trust: Trust) -> None:
        self.trust = trust
        self._checked: dict[str, tuple[Member, float]] = {}  # token -> (its member, when it goes stale)

    def refusal(self, token: str | None) -> tuple[grpc.StatusCode, str] | None:
        """Why a call carrying `token` is refused, or None to serve it."""
        if not token:
            return grpc.StatusCode.UNAUTHENTICATED, f"{NOT_A_MEMBER} (swarm {self.trust.swarm_id})"
        found = self._checked.get(token)
        now = time.time()
        if found is None or now > found[1]:
            found = self._check(token, now)
            if isinstance(found, str):
                return grpc.StatusCode.UNAUTHENTICATED, found
        why = self.trust.refused(found[0])
        return (grpc.StatusCode.PERMISSION_DENIED, f"{why}: this swarm refuses it") if why else None

    def _check(self, token: str, now: float) -> tuple[Member, float] | str:
        cert_b64, _, rest = token.partition(".")
        issued_text, _, signature = rest.partition(".")
        member = self.trust.member(cert_b64)
        if member is None:
            return f"{NOT_A_MEMBER} (swarm {self.trust.swarm_id}; the credential offered is not one of its members')"
        if not issued_text.isdigit() or abs(now - int(issued_text)) > TOKEN_MAX_AGE:
            return f"the member token is stale or from the future; check this machine's clock ({NOT_A_MEMBER})"
        if not signature_ok(member.public_key, _token_data(self.trust.swarm_id, int(issued_text)), signature):
            return f"the member token's signature is wrong ({NOT_A_MEMBER})"
        if len(self._checked) > 4096:
            self._checked.clear()
        self._checked[token] = checked = (member, int(issued_text) + TOKEN_MAX_AGE)
        return checked

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        token = next((v for k, v in handler_call_details.invocation_metadata or () if k == TOKEN_KEY), None)
        refusal = self.refusal(token if isinstance(token, str) else None)
        return handler if refusal is None else _refusing(handler, *refusal)


def _refusing(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that aborts every call with `code`."""
    async def refuse(_request, context) -> None:
        await context.abort(code, message)

    kinds = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    make = kinds[handler.request_streaming, handler.response_streaming]
    return make(refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
