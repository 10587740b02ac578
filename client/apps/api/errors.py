"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the status
an OpenAI client maps to its exception (400 BadRequestError, 404 NotFoundError, 429
RateLimitError, 503 InternalServerError), and the client library's failures as such errors."""

from __future__ import annotations

import logging

from starlette.responses import JSONResponse

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """A request that cannot be answered; `response()` is what the HTTP client gets."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def bad_parameter(param: str | None, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value" if param else None)


def unknown_model(name: str, known: list[str]) -> ApiError:
    return ApiError(404, f"The model {name!r} does not exist here; this server serves {', '.join(known)}",
                    param="model", code="model_not_found")


def from_client_error(error: BaseException) -> ApiError:
    """What a failure of generate (routing, a session, a peer) means to the HTTP client."""
    import grpc

    from client.routing import MissingBlocksError
    from client.session import SessionError
    from client.transport import PeerCallError

    if isinstance(error, ApiError):
        return error
    if isinstance(error, MissingBlocksError):
        return ApiError(503, str(error), code="blocks_uncovered", kind="server_error")
    if isinstance(error, PeerCallError) and error.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ApiError(429, f"the peers have no KV-cache room for this request now; retry later ({error})",
                        code="cache_exhausted", kind="rate_limit_error")
    if isinstance(error, PeerCallError) and error.code == grpc.StatusCode.INVALID_ARGUMENT:
        return ApiError(400, f"a peer refused the request: {error}", code="refused_by_peer")
    if isinstance(error, (PeerCallError, SessionError)):
        return ApiError(503, f"the swarm failed this request: {error}", code="peer_failed", kind="server_error")
    logger.error("request failed", exc_info=error)
    return ApiError(500, f"internal error: {type(error).__name__}: {error}", kind="server_error")
