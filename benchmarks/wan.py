"""Decode speed over an emulated WAN: 3 peers, each behind a delay proxy (--delay-ms each way,
on every connection to it, client's and other peers'), against the limit latency sets.

A decode step costs the round trips it needs plus compute. Without push the client calls
each peer in turn: 3 round trips. With server-to-server push (when the client has the
setting) hidden states go client -> p1 -> p2 -> p3 -> client: 4 one-way hops = 2 round trips.
So the limit is 1 / (round_trips x RTT + compute), where compute is the same step measured
in the same run with the proxies at 0 ms (loopback, proxies still in the path).
Also a prompt-tuning training step (batch 4 x 64, as benchmarks/finetune.py) at loopback and
at the delay. Prints one JSON line.

    python benchmarks/wan.py [--delay-ms 10] [--new-tokens 32] [--runs 3] [--train-steps 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from client import AutoDistributedModelForCausalLM, SwarmSettings
from swarm.checkpoint import DEFAULT_MODEL

from finetune import swarm_step, timed_steps
from proxied_swarm import ProxiedSwarm
from step_clock import decode_seconds_per_token

PROMPT = "Write a short story about a fox who learns to fly."
SPANS = ["0:10", "10:20", "20:30"]


def push_modes() -> dict[str, dict]:
    """Client settings to compare: push off, and on when this client has the setting."""
    fields = {f.name for f in dataclasses.fields(SwarmSettings)}
    if "push" not in fields:
        return {"push_off": {}}
    return {"push_off": {"push": False}, "push_on": {"push": True}}


def round_trips(mode: str, hops: int) -> float:
    return hops if mode == "push_off" else (hops + 1) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay-ms", type=float, default=10.0, help="one-way delay in front of each peer")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=3, help="ptune steps timed per delay (0: none)")
    args = parser.parse_args()
    default_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the client only embeds and applies the head; leave the cores to peers
    rtt = 2 * args.delay_ms / 1000
    modes = push_modes()
    results = {}
    with ProxiedSwarm(SPANS, delay_ms=0) as swarm:
        models = {mode: AutoDistributedModelForCausalLM.from_pretrained(
            DEFAULT_MODEL, initial_peers=swarm.initial_peers, settings=SwarmSettings(**kwargs))
            for mode, kwargs in modes.items()}
        ids = next(iter(models.values())).tokenizer(PROMPT, return_tensors="pt").input_ids
        tokens = {}
        for delay in (0.0, args.delay_ms):
            swarm.proxy.set_delay(delay)
            for mode, model in models.items():
                seconds, out = decode_seconds_per_token(model, ids, args.new_tokens, args.runs)
                results.setdefault(mode, {})["loopback" if delay == 0 else "wan"] = seconds
                tokens[(mode, delay)] = out
        for model in models.values():
            model.swarm.shutdown()
        train = {}
        if args.train_steps:
            torch.set_num_threads(default_threads)  # as finetune.py: a batch's head backward uses the cores
            step, tuned = swarm_step(swarm.initial_peers, "ptune", torch.randint(100, 20000, (4, 64),
                                                                                generator=torch.Generator().manual_seed(0)))
            for delay in (0.0, args.delay_ms):
                swarm.proxy.set_delay(delay)
                train["loopback" if delay == 0 else "wan"] = round(timed_steps(step, args.train_steps), 3)
            tuned.swarm.shutdown()
    report = {}
    for mode, times in results.items():
        trips = round_trips(mode, len(SPANS))
        limit = 1 / (trips * rtt + times["loopback"])
        report[mode] = {
            "round_trips_per_token": trips,
            "loopback_ms_per_token": round(times["loopback"] * 1000, 2),
            "wan_ms_per_token": round(times["wan"] * 1000, 2),
            "wan_tok_s": round(1 / times["wan"], 2),
            "limit_tok_s": round(limit, 2),
            "of_limit": round((1 / times["wan"]) / limit, 3),
            "added_ms_per_token": round((times["wan"] - times["loopback"]) * 1000, 2),
            "expected_added_ms": round(trips * rtt * 1000, 2),
        }
    reference = tokens[("push_off", 0.0)]
    print(json.dumps({
        "benchmark": "wan", "model": DEFAULT_MODEL, "peers": len(SPANS), "delay_ms_each_way": args.delay_ms,
        "rtt_ms": rtt * 1000, "new_tokens": args.new_tokens, "runs": args.runs,
        "push_available": "push_on" in modes, "modes": report,
        "train_step_s": {"ptune": train.get("wan"), "ptune_loopback": train.get("loopback")},
        "same_tokens": all(torch.equal(out, reference) for out in tokens.values()),
    }))


if __name__ == "__main__":
    main()
