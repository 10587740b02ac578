"""Decode speed: local transformers generate vs the same generation through 3 peers on
loopback (greedy, 64 new tokens, 5 rounds after a warm-up). Prints one JSON line.

Each round runs local and then the swarm, back to back, and the ratio is the median of the
rounds' ratios: this machine's speed drifts by 20-30% within minutes (measured: the same
swarm run at 55 and at 71 ms a token ten minutes apart), so all local runs followed by all
swarm runs would measure the drift as much as the systems.

    python benchmarks/generate.py [--new-tokens 64] [--runs 5] [--codec raw] [--batch 1] [--no-push]

--no-push relays every step through the client (one round trip per peer) instead of letting
each peer push its output to the next (server-to-server push, the default).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from client import AutoDistributedModelForCausalLM, SwarmSettings
from client.apps.local_swarm import LocalSwarm
from swarm.checkpoint import DEFAULT_MODEL, resolve_checkpoint

PROMPT = "Write a short story about a fox who learns to fly."


def tokens_per_second(model, inputs, new_tokens: int) -> float:
    start = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    elapsed = time.perf_counter() - start
    return (out.shape[1] - inputs["input_ids"].shape[1]) * out.shape[0] / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--codec", default="raw")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--no-push", action="store_true", help="relay each step through the client")
    args = parser.parse_args()

    checkpoint = resolve_checkpoint(DEFAULT_MODEL)
    local = AutoModelForCausalLM.from_pretrained(checkpoint.folder, dtype=torch.float32).eval()
    # Local transformers gets its best of one thread and torch's default, so the ratio is
    # against local at its fastest. The client computes on one thread: it only embeds and
    # applies the LM head, and its idle threads would compete with the peers' for the cores.
    default_threads = torch.get_num_threads()
    with LocalSwarm(["0:10", "10:20", "20:30"]) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(
            DEFAULT_MODEL, initial_peers=swarm.initial_peers,
            settings=SwarmSettings(codec=args.codec, push=not args.no_push))
        inputs = model.tokenizer([PROMPT] * args.batch, return_tensors="pt")
        thread_counts = sorted({1, default_threads})
        for threads in thread_counts:  # warm-up
            torch.set_num_threads(threads)
            local.generate(**inputs, max_new_tokens=4, do_sample=False)
        torch.set_num_threads(1)
        model.generate(**inputs, max_new_tokens=4, do_sample=False)
        local_by_threads = {threads: [] for threads in thread_counts}
        swarm_runs, ratios = [], []
        for _ in range(args.runs):
            for threads in thread_counts:
                torch.set_num_threads(threads)
                local_by_threads[threads].append(tokens_per_second(local, inputs, args.new_tokens))
            torch.set_num_threads(1)
            swarm_runs.append(tokens_per_second(model, inputs, args.new_tokens))
            ratios.append(swarm_runs[-1] / max(runs[-1] for runs in local_by_threads.values()))
        local_tps = max(statistics.median(runs) for runs in local_by_threads.values())
        swarm_tps = statistics.median(swarm_runs)
        local_out = local.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False)
        swarm_out = model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False)
        model.swarm.shutdown()
    print(json.dumps({
        "benchmark": "generate", "model": DEFAULT_MODEL, "peers": 3, "batch": args.batch, "codec": args.codec,
        "push": not args.no_push,
        "new_tokens": args.new_tokens, "local_tok_s": round(local_tps, 2),
        "local_tok_s_by_threads": {k: round(statistics.median(v), 2) for k, v in local_by_threads.items()},
        "swarm_tok_s": round(swarm_tps, 2), "ratio": round(statistics.median(ratios), 3),
        "ratios": [round(r, 3) for r in ratios], "greedy_identical": bool(torch.equal(local_out, swarm_out)),
    }))


if __name__ == "__main__":
    main()
