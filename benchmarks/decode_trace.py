"""Where a decode step's time goes, hop by hop: prints one JSON line.

3 peers (0:10, 10:20, 20:30) on loopback at --log-level DEBUG, one client generating greedily.
Every peer logs, per step, its decode / queue / compute / encode / write times and the moment it
received the step; the client's send and answer moments are taken around its stream calls.
All of them read `time.perf_counter`, the machine's monotonic clock, shared by every process,
so the figures line up across processes:

    client -> p0 | p0 work | p0 -> p1 | p1 work | p1 -> p2 | p2 work | p2 -> client | client

"work" is what the peer itself did (decode + queue + compute + encode); the arrows are the
wire and both ends' gRPC and event-loop hops; "client" is the client between an answer and
its next send (LM head, sampling, embedding, serialization). Medians over the decode steps.

    python benchmarks/decode_trace.py [--new-tokens 64] [--no-push] [--peer-arg=--decode-threads=2 ...]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time

import torch

from client import AutoDistributedModelForCausalLM, SwarmSettings
from client import transport
from client.apps.local_swarm import LocalSwarm
from swarm.checkpoint import DEFAULT_MODEL

SPANS = ["0:10", "10:20", "20:30"]
PROMPT = "Write a short story about a fox who learns to fly."
PEER_STEP = re.compile(r"step (\d+) \(1 tokens\): decode ([\d.]+) ms, queue ([\d.]+) ms, compute ([\d.]+) ms, "
                       r"encode ([\d.]+) ms, write ([\d.]+) ms, received at ([\d.]+)")


class ClientClock:
    """Wraps the client's stream calls to note when each step leaves and its last answer arrives."""

    def __init__(self) -> None:
        self.sent: dict[int, float] = {}
        self.answered: dict[int, float] = {}
        send, answer = transport.InferenceStream.send, transport.InferenceStream.answer
        clock = self

        def timed_send(stream, step):
            clock.sent.setdefault(step.step_id, time.perf_counter())
            return send(stream, step)

        def timed_answer(stream, step_id, wait=None):
            result = answer(stream, step_id, wait)
            if result is not None:
                clock.answered[step_id] = time.perf_counter()  # the last hop's answer is the last
            return result

        transport.InferenceStream.send, transport.InferenceStream.answer = timed_send, timed_answer


def peer_steps(log: str) -> dict[int, dict[str, float]]:
    steps = {}
    for match in PEER_STEP.finditer(log):
        step_id = int(match.group(1))
        decode, queue, compute, encode, write, received = map(float, match.groups()[1:])
        steps[step_id] = {"received": received, "done": received + (decode + queue + compute + encode) / 1e3,
                          "decode": decode, "queue": queue, "compute": compute, "encode": encode, "write": write}
    return steps


def median_ms(values: list[float]) -> float:
    return round(1e3 * statistics.median(values), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--no-push", action="store_true")
    parser.add_argument("--peer-arg", action="append", default=[], help="extra `swarm peer` argument (repeatable)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    clock = ClientClock()
    peer_args = ["--log-level", "DEBUG"] + [a for arg in args.peer_arg for a in arg.split("=", 1)]
    with LocalSwarm(SPANS, extra_peer_args=peer_args) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(
            DEFAULT_MODEL, initial_peers=swarm.initial_peers, settings=SwarmSettings(push=not args.no_push))
        inputs = model.tokenizer(PROMPT, return_tensors="pt")
        model.generate(**inputs, max_new_tokens=4, do_sample=False)  # warm-up, in a session of its own
        clock.sent.clear(), clock.answered.clear()
        with model.inference_session(max_length=inputs["input_ids"].shape[1] + args.new_tokens) as session:
            model.generate(**inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                           do_sample=False, session=session)
            session_id = session.session_id
        model.swarm.shutdown()
        logs = [(swarm.logs / f"peer{i}.err").read_text() for i in range(len(SPANS))]
    # Only this session's lines: the warm-up session numbered its steps from 1 too.
    peers = [peer_steps("\n".join(line for line in log.splitlines() if session_id in line)) for log in logs]

    steps = sorted(s for s in clock.sent if s > 2 and s - 1 in clock.answered and all(s in p for p in peers))
    figures: dict[str, list[float]] = {}

    def note(name: str, value: float) -> None:
        figures.setdefault(name, []).append(value)

    for s in steps:
        hops = [p[s] for p in peers]
        note("client", clock.sent[s] - clock.answered[s - 1])
        note("client -> p0", hops[0]["received"] - clock.sent[s])
        for i, hop in enumerate(hops):
            note(f"p{i} work", hop["done"] - hop["received"])
            for part in ("decode", "queue", "compute", "encode"):
                note(f"p{i} {part}", hop[part] / 1e3)
            if i + 1 < len(hops):
                note(f"p{i} -> p{i + 1}", hops[i + 1]["received"] - hop["done"])
        note("p2 -> client", clock.answered[s] - hops[-1]["done"])
        note("step", clock.answered[s] - clock.answered[s - 1])
    breakdown = {name: median_ms(values) for name, values in figures.items()}
    wire = ["client -> p0", "p0 -> p1", "p1 -> p2", "p2 -> client"] if not args.no_push else []
    print(json.dumps({
        "benchmark": "decode_trace", "model": DEFAULT_MODEL, "peers": len(SPANS), "push": not args.no_push,
        "peer_args": peer_args[2:], "steps": len(steps), "step_ms": breakdown.pop("step"),
        "peer_compute_ms": round(sum(breakdown[f"p{i} compute"] for i in range(len(SPANS))), 3),
        "peer_overhead_ms": round(sum(breakdown[f"p{i} work"] - breakdown[f"p{i} compute"]
                                      for i in range(len(SPANS))), 3),
        "transit_ms": round(sum(breakdown[name] for name in wire), 3) if wire else None,
        "breakdown_ms": breakdown,
    }))


if __name__ == "__main__":
    main()
