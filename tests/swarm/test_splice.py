"""swarm/reach/splice.py: bytes both ways with counts, started from a stream handler whose own
stream has ended (as the peer's PUNCH handler does), and one end closing closes the other."""

from __future__ import annotations

import asyncio
import gc

from swarm.reach.splice import splice


async def _pair():
    """Two connected (reader, writer) ends over loopback TCP."""
    accepted: asyncio.Future = asyncio.get_running_loop().create_future()
    server = await asyncio.start_server(lambda r, w: accepted.set_result((r, w)), "127.0.0.1", 0)
    near = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    far = await accepted
    server.close()
    return near, far


def test_a_splice_carries_both_ways_and_closes_together():
    async def run():
        (a_near, a_far), (b_near, b_far) = await _pair(), await _pair()
        counters = ([0], [0])

        async def handler(reader, writer):  # like the peer's PUNCH handler: its own stream ends first
            writer.close()
            await splice(a_far, b_far, counters)

        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        _, setup = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        await asyncio.sleep(0.2)  # the handler's stream closed: asyncio dropped its hold on the task
        setup.close()
        server.close()
        del handler, server
        gc.collect()
        a_near[1].write(b"to b" * 1000)
        b_near[1].write(b"to a")
        assert await b_near[0].readexactly(4000) == b"to b" * 1000
        assert await a_near[0].readexactly(4) == b"to a"
        assert counters == ([4000], [4])
        a_near[1].close()  # one end goes: the other side is closed too
        assert await asyncio.wait_for(b_near[0].read(), 5) == b""

    asyncio.run(run())
