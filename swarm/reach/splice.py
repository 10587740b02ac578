"""Copying bytes both ways between two asyncio stream pairs until either side closes."""

from __future__ import annotations

import asyncio
import contextlib

CHUNK = 1 << 16


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
    a_to_b = asyncio.ensure_future(_pipe(a[0], b[1], counters[0] if counters else None))
    b_to_a = asyncio.ensure_future(_pipe(b[0], a[1], counters[1] if counters else None))
    await asyncio.wait([a_to_b, b_to_a], return_when=asyncio.FIRST_COMPLETED)
    for writer in (a[1], b[1]):
        with contextlib.suppress(Exception):
            writer.close()
    await asyncio.gather(a_to_b, b_to_a, return_exceptions=True)
