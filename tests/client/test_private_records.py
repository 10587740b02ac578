"""The client in front of a private swarm it is not a member of: one line that says how to
join, instead of "no peer serves blocks" (records as swarm.registry.SpanRecords gives them)."""

from __future__ import annotations

import pytest

from client.remote_swarm import PrivateSwarmError
from client.routing import MissingBlocksError
from swarm.registry import SpanRecords
from tests.client.fakes import by_block, peer, swarm_of


def records(*peers, private=()) -> SpanRecords:
    found = SpanRecords(by_block(*peers))
    found.private_swarms = frozenset(private)
    return found


def test_only_private_records_say_the_swarm_is_private(monkeypatch):
    swarm = swarm_of(monkeypatch)
    swarm._records = records(private={"0123456789abcdef"})
    with pytest.raises(PrivateSwarmError, match=r"^this swarm is private \(id 0123456789abcdef\): join it with "
                       r"--join CREDENTIAL"):
        swarm.find_chain()


def test_blocks_served_only_in_a_private_swarm_are_named_with_the_hint(monkeypatch):
    swarm = swarm_of(monkeypatch)
    swarm._records = records(peer("a", 0, 15), private={"0123456789abcdef"})
    with pytest.raises(MissingBlocksError, match=r"blocks 15-29 .*private swarm 0123456789abcdef serves the model"):
        swarm.find_chain()
