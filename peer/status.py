"""Request errors -> gRPC status: which code each kind of error is answered with, and how a
handler ends its call with it.

Any error becomes a status code with a message that says what was wrong (table `STATUS`);
an unexpected one is logged and answered INTERNAL. Either way only that request fails and
the peer goes on serving everyone else.
"""

from __future__ import annotations

import logging

import grpc

from swarm.span_inputs import SpanInputError
from swarm.tuning import AdapterError
from swarm.wire import WireError

from .memory import CacheBudgetExceeded
from .requests import BadRequest, NotServed

logger = logging.getLogger(__name__)

Code = grpc.StatusCode
STATUS: tuple[tuple[type[Exception] | tuple[type[Exception], ...], grpc.StatusCode], ...] = (
    ((BadRequest, WireError, SpanInputError, AdapterError), Code.INVALID_ARGUMENT),
    (NotServed, Code.FAILED_PRECONDITION),
    (CacheBudgetExceeded, Code.RESOURCE_EXHAUSTED),
)


def status_of(error: BaseException) -> grpc.StatusCode | None:
    """The status a request error is answered with; None for an unexpected error (a bug)."""
    for kinds, code in STATUS:
        if isinstance(error, kinds):
            return code
    return None


async def refuse(context: grpc.aio.ServicerContext, error: Exception, rpc: str) -> None:
    """Sets the status `error` deserves; the handler returns right after (see `end_call`)."""
    if isinstance(error, grpc.aio.AbortError):  # already aborted (e.g. by a nested abort)
        raise error
    code = status_of(error)
    if code is None:
        logger.exception("%s failed unexpectedly", rpc, exc_info=error)
        end_call(context, Code.INTERNAL, f"peer failed: {type(error).__name__}: {error}")
        return
    logger.debug("%s refused with %s: %s", rpc, code.name, error)
    end_call(context, code, str(error))


def end_call(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    """Sets the status the RPC ends with when its handler returns. Not `context.abort()`: grpc
    keeps the AbortError, whose traceback holds the handler's frames (the request; a session
    and its KV cache) in a reference cycle that only a full garbage collection frees.
    Measured: 33 sessions ended by the idle timeout kept ~35 MB (caches and messages) alive
    that way (tests/integration/test_abandoned_sessions.py)."""
    context.set_code(code)
    context.set_details(message)
