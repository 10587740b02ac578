"""Whom a peer's decode step waits for before its pass runs, and how long (peer/runtime.py).

Decode steps of different sessions queued at the same time run as one forward pass. A lone
client's step runs the moment the worker is free. While other sessions are generating too, a
step may wait up to `join_wait` (from its arrival) for theirs: their clients are mid-round
(sampling a token, or on the wire), and running each step as it trickles in would read every
weight once per session instead of once per round. Waiting pulls sessions into step, so it is paid about
once. Only sessions whose last step ran with others' are waited for (steps that queue up
while the worker is busy start that); not those idle for ACTIVE_GAP, nor one whose last step
ran alone: it may be blocked behind the very step that would wait for it; nor one that ran
here since the waiting step's session last did: it is ahead in the round, perhaps waiting
for this one at the next peer.

That keeps a group of sessions together, but never merges two groups: in a chain that every
session crosses in the same order, each group is ahead of the other everywhere, and 8 clients
that started a few ms apart stayed in 2-4 groups (2.9 sessions a pass on average), each group
reading the weights for itself. So one peer of the chain, the one serving block 0 (`merge`
jobs), also waits for the groups ahead of it: every session's round passes there, so a
group waits there once for the next to come round, and no other peer waits long for one ahead
(`AHEAD_WAIT`, for the sessions of a pass upstream, handed on one by one).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Hashable

# A member of a batch key whose last job ran longer ago than this is not waited for: it is
# idle (a user reading), not in the middle of generating.
ACTIVE_GAP = 1.0
# Seconds a step waits, away from block 0, for members ahead of it in the round (the
# companions of its pass upstream, handed on a few ms apart: see `wait_for_members`).
AHEAD_WAIT = 0.010


@dataclass(frozen=True)
class Member:
    """A submitter of jobs of one batch key, as the worker last saw it."""

    last: float  # when its last job ran (time.monotonic)
    # Whether that job ran with others'. Only such members are waited for: one that always runs
    # alone may be blocked behind the very job that would wait for it (one client stepping two
    # sessions in turn), and waiting for it would cost every step the whole wait.
    together: bool


def wait_for_members(ready: threading.Condition, heap: list, active: dict[Hashable, Member], first,
                     join_wait: float) -> None:
    """With `ready` held: waits (up to `join_wait` s after `first` arrived) while members of
    its key (`active`) that were active lately, and have not run since `first`'s member last
    did, have no job queued yet (in `heap`). Jobs of a higher priority than `first` do not
    exist (it was the first), so nothing more urgent is held back.

    A member that ran here after `first`'s did is ahead in the round: it may be at the next
    peer, where it waits for `first`'s member. Waiting for it here too, both would wait out
    the whole join wait, at every pass (two pairs of sessions a stage apart, measured: 4
    clients through 3 peers at 10 tok/s, half the rate of 2). Members behind come here
    before they go anywhere `first`'s member is awaited: they are the ones to wait for.
    A `merge` job waits for those ahead too: no other peer of the chain waits long for one
    ahead, so none waits for `first`'s member in turn. Elsewhere those ahead get a short
    wait (AHEAD_WAIT): a pass upstream hands its sessions on one by one, a few ms apart,
    and a group that ran apart here last time would otherwise stay split here (measured:
    a pass of 8 at the second peer ran as 6 + 2 at the third, round after round)."""
    deadline = first.queued_at + join_wait
    ahead_until = deadline if first.merge else first.queued_at + min(join_wait, AHEAD_WAIT)
    while (now := time.monotonic()) < deadline:
        mine = active.get(first.member)
        if mine is None:
            return
        queued = {job.member for job in heap if job.batch_key == first.batch_key} | {first.member}
        behind = ahead = False
        for member, seen in active.items():
            if seen.together and now - seen.last < ACTIVE_GAP and member not in queued:
                if seen.last <= mine.last:
                    behind = True
                else:
                    ahead = True
        if behind:
            ready.wait(deadline - now)
        elif ahead and now < ahead_until:
            ready.wait(ahead_until - now)
        else:
            return
