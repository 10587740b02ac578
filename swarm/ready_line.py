"""The line `swarm peer` prints on stdout once it serves, and how whoever started it reads it.

It is the one contract between a peer process and its starter (`LocalSwarm`, the demo, the
tests): the peer writes it with `PeerReady.line`, starters match it with `PeerReady.PATTERN`
and read it back with `PeerReady.parse`. Nothing else is printed on a peer's stdout but
lines for its moves (`peer moved: ...`); logs go to stderr.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class PeerReady:
    start: int
    end: int
    model_name: str
    endpoint: str  # host:port clients dial
    model_id: str

    PATTERN: ClassVar[re.Pattern] = re.compile(
        r"^peer ready: blocks (\d+):(\d+) of (\S+) at (\S+) \(model_id (\S+)\)$")

    def line(self) -> str:
        return (f"peer ready: blocks {self.start}:{self.end} of {self.model_name} at {self.endpoint} "
                f"(model_id {self.model_id})")

    @classmethod
    def parse(cls, line: str) -> PeerReady | None:
        match = cls.PATTERN.match(line.strip())
        if match is None:
            return None
        start, end, model_name, endpoint, model_id = match.groups()
        return cls(int(start), int(end), model_name, endpoint, model_id)


def moved_line(old: tuple[int, int], new: tuple[int, int]) -> str:
    """What a peer prints when it moves to other blocks (--num-blocks with --balance-period)."""
    return f"peer moved: blocks {old[0]}:{old[1]} -> {new[0]}:{new[1]}"
