"""Blocking calls made from the event loop: a result computed on another thread, delivered
to an asyncio future in the caller's loop."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable


def run_into(loop: asyncio.AbstractEventLoop, future: asyncio.Future, fn: Callable[..., Any], *args: Any,
             **kwargs: Any) -> None:
    """Calls `fn(*args, **kwargs)` on this thread and hands its result (or exception) to
    `future` in `loop`; nothing happens if the future is done meanwhile or the loop closed."""
    try:
        result = fn(*args, **kwargs)
    except BaseException as e:  # noqa: BLE001 - re-raised in the caller, who decides
        setter, value = _set_exception, e
    else:
        setter, value = _set_result, result
    try:
        loop.call_soon_threadsafe(setter, future, value)
    except RuntimeError:  # the caller's loop is closed: nobody is waiting any more
        pass


def in_daemon_thread(fn: Callable[[], Any], name: str) -> asyncio.Future:
    """Runs a blocking call on a daemon thread: a call to a dead DHT never returns, and an
    executor thread stuck in it would block the interpreter's exit."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    threading.Thread(target=run_into, args=(loop, future, fn), name=name, daemon=True).start()
    return future


def _set_result(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
