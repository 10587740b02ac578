"""swarm.ready_line: the peer's ready line reads back as it was written."""

from swarm.ready_line import PeerReady, moved_line


def test_a_ready_line_round_trips():
    ready = PeerReady(10, 20, "smollm2-135m-instruct", "[::1]:31400", "smollm2-135m-instruct-3f2a")
    assert ready.line() == ("peer ready: blocks 10:20 of smollm2-135m-instruct at [::1]:31400 "
                            "(model_id smollm2-135m-instruct-3f2a)")
    assert PeerReady.parse(ready.line() + "\n") == ready


def test_other_lines_are_not_ready_lines():
    assert PeerReady.parse("peer ready: blocks 0:10 of m at h:1") is None
    assert PeerReady.parse(moved_line((0, 10), (20, 30))) is None
    assert moved_line((0, 10), (20, 30)) == "peer moved: blocks 0:10 -> 20:30"
