"""Copying bytes both ways between two asyncio stream pairs until either side closes."""

from __future__ import annotations

import asyncio
import contextlib

CHUNK = 1 << 16
# The event loop holds tasks weakly: a splice whose stream handler has returned (a punched
# connection outlives the libp2p stream that set it up) would be collected mid-transfer.
_running: set[asyncio.Future] = set()


def _keep(task: asyncio.Future) -> asyncio.Future:
    _running.add(task)
    task.add_done_callback(_running.discard)
    return task


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counter: list[int] | None) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
            if counter is not None:
                counter[0] += len(data)
    except (ConnectionError, OSError, asyncio.IncompleteReadError):
        pass  # either end went away: the other is closed below, and gRPC above sees it
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def splice(a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 b: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 counters: tuple[list[int], list[int]] | None = None) -> None:
    """Until one side ends: a's bytes to b and b's to a (`counters`: bytes a->b, b->a, added to).
    When one direction ends both writers are closed: HTTP/2 has no use for a half-open link."""
    current = asyncio.current_task()
    if current is not None:
        _keep(current)
    a_to_b = _keep(asyncio.ensure_future(_pipe(a[0], b[1], counters[0] if counters else None)))
    b_to_a = _keep(asyncio.ensure_future(_pipe(b[0], a[1], counters[1] if counters else None)))
    await asyncio.wait([a_to_b, b_to_a], return_when=asyncio.FIRST_COMPLETED)
    for writer in (a[1], b[1]):
        with contextlib.suppress(Exception):
            writer.close()
    await asyncio.gather(a_to_b, b_to_a, return_exceptions=True)
