"""RemoteSwarm.records: fresh records are reused, stale-but-usable ones are returned at once
while newer ones are fetched in the background, and older ones are waited for."""

from __future__ import annotations

import time
from concurrent.futures import Future

from client.remote_swarm import RemoteSwarm, SwarmSettings
from tests.client.fakes import MODEL_ID, FlagsDHT, by_block, peer

A, B = peer("a", 0, 30), peer("b", 0, 30)


class FakeDHT(FlagsDHT):
    """Answers every block with the records in `serving`; background fetches wait for `finish`."""

    def __init__(self) -> None:
        super().__init__()
        self.serving = [A]
        self.waited = self.started = 0
        self._pending: list[tuple[Future, dict]] = []

    def run_coroutine(self, fn, return_future: bool = False):
        found = {key: _Entry({r.peer_id: _Item(r.model_dump(mode="json")) for r in self.serving})
                 for key in fn.keywords["keys"]}
        if not return_future:
            self.waited += 1
            return found
        self.started += 1
        future = Future()
        self._pending.append((future, found))
        return future

    def finish(self) -> None:
        for future, found in self._pending:
            future.set_result(found)
        self._pending.clear()


class _Entry:
    def __init__(self, value):
        self.value = value


class _Item:
    def __init__(self, value):
        self.value, self.expiration_time = value, float("inf")


def swarm(dht: FakeDHT, age: float) -> RemoteSwarm:
    remote = RemoteSwarm([], MODEL_ID, 30, SwarmSettings(records_ttl=2.0, records_stale_ok=20.0), dht=dht)
    remote._records, remote._records_time = by_block(A), time.monotonic() - age
    return remote


def peer_ids(records) -> set[str]:
    return {r.peer_id for rs in records.values() for r in rs}


def test_stale_records_are_used_while_newer_ones_are_fetched_in_the_background():
    dht = FakeDHT()
    remote = swarm(dht, age=5.0)
    dht.serving = [A, B]
    assert peer_ids(remote.records()) == {"a"} and (dht.started, dht.waited) == (1, 0)
    assert peer_ids(remote.records()) == {"a"} and dht.started == 1  # one fetch at a time
    dht.finish()
    assert peer_ids(remote.records()) == {"a", "b"} and (dht.started, dht.waited) == (1, 0)


def test_fresh_records_are_reused_and_too_old_ones_waited_for():
    dht = FakeDHT()
    assert peer_ids(swarm(dht, age=0.5).records()) == {"a"} and (dht.started, dht.waited) == (0, 0)
    old = swarm(dht, age=30.0)
    dht.serving = [B]
    assert peer_ids(old.records()) == {"b"} and (dht.started, dht.waited) == (0, 1)
    assert peer_ids(old.records(refresh=True)) == {"b"} and dht.waited == 2
