"""Coroutines that run inside the DHT's process (`DHT.run_coroutine`), so that one call
stores or reads many keys in one traversal instead of one per key."""

from __future__ import annotations

import asyncio
from typing import Any

from hivemind.dht import DHT, DHTNode


async def store_many(
    _dht: DHT, node: DHTNode, keys: list[str], subkeys: list[str], values: list[Any], expiration: float
) -> dict[Any, bool]:
    return await node.store_many(keys, values, expiration, subkeys=subkeys)


async def get_many(_dht: DHT, node: DHTNode, keys: list[str], latest: bool) -> dict[str, Any]:
    # latest=True walks to every replica, so subkeys stored on different nodes are all merged.
    return await node.get_many(keys, sufficient_expiration_time=float("inf") if latest else None)


async def get_many_after(dht: DHT, node: DHTNode, delay: float, keys: list[str], latest: bool) -> dict[str, Any]:
    await asyncio.sleep(delay)
    return await get_many(dht, node, keys, latest)
