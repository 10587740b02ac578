"""One model as the dashboard shows it: per block the peers serving it and their number (the
replicas), the gaps nobody serves, and a line per peer; plain JSON-ready dicts.

A block counts as covered when an `online` peer serves it: a joining peer cannot answer yet
and a draining one takes no new sessions, so for a new client the block is a gap.
"""

from __future__ import annotations

from typing import Any

from swarm.registry import ModelRecord, PeerRecord, PeerState, peers_by_id


def gaps(replicas: list[int]) -> list[list[int]]:
    """[[start, end), ...] of the runs of blocks with no replica: [2, 0, 0, 1, 0] -> [[1, 3], [4, 5]]."""
    runs: list[list[int]] = []
    for i, count in enumerate(replicas):
        if count:
            continue
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return runs


def peer_view(record: PeerRecord) -> dict[str, Any]:
    view = record.model_dump(mode="json", exclude={"model_id", "fingerprint"})
    view["reach"] = "relayed" if record.relayed else "direct"
    return view


def model_view(model: ModelRecord, records: dict[int, list[PeerRecord]]) -> dict[str, Any]:
    """`records` as `fetch_span_records` returns them, for `model`."""
    blocks = []
    for i in range(model.num_blocks):
        here = records.get(i, [])
        blocks.append({"index": i, "peers": sorted(r.peer_id for r in here),
                       "replicas": sum(r.state == PeerState.online for r in here)})
    replicas = [block["replicas"] for block in blocks]
    peers = sorted(peers_by_id(records).values(), key=lambda r: (r.start, r.end, r.peer_id))
    return {"model_id": model.model_id, "model_name": model.model_name, "num_blocks": model.num_blocks,
            "version": model.version, "blocks": blocks, "covered": sum(1 for n in replicas if n),
            "gaps": gaps(replicas), "peers": [peer_view(r) for r in peers]}
