"""Resident memory of real `swarm peer` processes against the bytes they must hold: the
weights of their span plus the KV cache of the sessions they serve. Prints one JSON line.

    python benchmarks/peer_rss.py [--new-tokens 64]

3 peers (0:10, 10:20, 20:30, float32) on loopback; a client generates --new-tokens tokens
(the KV cache is filled), then RSS (VmRSS) and peak (VmHWM) of every peer process are read
with psutil. One training step (batch 4, seq 64) follows and RSS is read again once the peers
have been idle long enough to hand freed memory back (peer/runtime.py, IDLE_TRIM_SECONDS).

"floor": a process that imports what a peer imports (torch, transformers' modeling module,
grpc, hivemind, the peer package) and runs one small op, holding no weights; "net" figures
subtract it. Target: RSS <= 1.3 x (weights + cache). The peer's DHT runs in child processes
(hivemind's DHT process and its p2p daemon); their PSS is reported beside, not in the ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import psutil
import torch
from safetensors import safe_open

from client import AutoDistributedModelForCausalLM
from client.apps.local_swarm import LocalSwarm
from peer.memory import bytes_per_token
from peer.runtime import IDLE_TRIM_SECONDS
from swarm.checkpoint import DEFAULT_MODEL, resolve_checkpoint
from swarm.models import get_family

SPANS = ["0:10", "10:20", "20:30"]
PROMPT = "Write a short story about a fox who learns to fly."
TARGET = 1.3
MB = 1024 * 1024

FLOOR_CHILD = r"""
import importlib, sys
import psutil, torch, grpc, hivemind, transformers
import peer.server, peer.service
from swarm.checkpoint import resolve_checkpoint
model_type = resolve_checkpoint(sys.argv[1]).config.model_type
importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
torch.ones(64, 64).matmul(torch.ones(64, 64)).sum()
print(psutil.Process().memory_info().rss)
"""


def import_floor_bytes(model: str) -> int:
    result = subprocess.run([sys.executable, "-c", FLOOR_CHILD, model], capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1])


def span_weight_bytes(checkpoint, start: int, end: int, itemsize: int) -> int:
    """Bytes of blocks [start, end) in the peer's dtype, from the safetensors headers only."""
    prefixes = tuple(f"{get_family(checkpoint.config).layers_prefix}.{i}." for i in range(start, end))
    total = 0
    for name, path in checkpoint.weight_files.items():
        if name.startswith(prefixes):
            with safe_open(path, framework="pt") as f:
                total += torch.Size(f.get_slice(name).get_shape()).numel() * itemsize
    return total


def memory_of(pid: int) -> dict[str, float]:
    process = psutil.Process(pid)
    status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status") if ":" in line)
    # PSS: hivemind forks the DHT process from the peer, so their RSS share pages.
    children = sum(child.memory_full_info().pss for child in process.children(recursive=True))
    return {"rss_mb": process.memory_info().rss / MB, "peak_mb": int(status["VmHWM"].split()[0]) / 1024,
            "children_pss_mb": children / MB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    checkpoint = resolve_checkpoint(DEFAULT_MODEL)
    floor = import_floor_bytes(DEFAULT_MODEL)
    itemsize = 4  # peers on CPU serve float32
    torch.set_num_threads(1)
    with LocalSwarm(SPANS) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, initial_peers=swarm.initial_peers)
        ids = model.tokenizer(PROMPT, return_tensors="pt").input_ids
        model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
        cache_tokens = ids.shape[1] + args.new_tokens  # batch 1; the session's cache at its fullest
        after_inference = [memory_of(proc.pid) for proc in swarm.peer_procs]
        model.train()
        batch = torch.randint(100, 20000, (4, 64))
        model(input_ids=batch, labels=batch).loss.backward()
        time.sleep(IDLE_TRIM_SECONDS + 1)  # a peer hands freed memory back once idle that long
        after_training = [memory_of(proc.pid) for proc in swarm.peer_procs]
        model.swarm.shutdown()
    peers = []
    for span, inference, training in zip(SPANS, after_inference, after_training):
        start, end = (int(x) for x in span.split(":"))
        weights = span_weight_bytes(checkpoint, start, end, itemsize)
        cache = cache_tokens * bytes_per_token(checkpoint.config, end - start, itemsize)
        held = weights + cache
        peers.append({
            "span": span, "weights_mb": round(weights / MB, 1), "cache_mb": round(cache / MB, 2),
            "rss_mb": round(inference["rss_mb"], 1), "peak_mb": round(inference["peak_mb"], 1),
            "rss_after_training_mb": round(training["rss_mb"], 1),
            "dht_children_pss_mb": round(inference["children_pss_mb"], 1),
            "rss_over_held": round(inference["rss_mb"] * MB / held, 2),
            "net_rss_over_held": round((inference["rss_mb"] * MB - floor) / held, 2),
            "net_after_training_over_held": round((training["rss_mb"] * MB - floor) / held, 2),
        })
    print(json.dumps({
        "benchmark": "peer_rss", "model": DEFAULT_MODEL, "dtype": "float32", "cache_tokens": cache_tokens,
        "import_floor_mb": round(floor / MB, 1), "target_over_held": TARGET,
        "max_net_rss_over_held": max(p["net_rss_over_held"] for p in peers),
        "net_within_target": all(p["net_rss_over_held"] <= TARGET for p in peers),
        "peers": peers,
    }))


if __name__ == "__main__":
    main()
