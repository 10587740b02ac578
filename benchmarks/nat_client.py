"""The client process of benchmarks/nat.py, run inside the lab's `pub` namespace: a warm-up
generate, then a timed greedy generate of --tokens tokens (per-step times from step_clock, and
the bytes that crossed a relay meanwhile), then LoRA training steps (forward + backward on a
short sequence: one warm-up, one timed). Prints one JSON line.

    python benchmarks/nat_client.py --peer MADDR --model DIR [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.integration.nat_reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--peer", action="append", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()

    import torch
    from transformers import StoppingCriteriaList

    from client import AutoDistributedModelForCausalLM
    from step_clock import StepClock
    from swarm.reach import tunnels
    from tests.integration.nat_reference import LORA, prompt

    torch.set_num_threads(1)

    def relayed() -> int:
        return tunnels._tunnels.relayed_bytes() if tunnels._tunnels else 0

    model = AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=args.peer, **LORA)
    ids = prompt()
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    model.generate(ids, max_new_tokens=4, **kwargs)  # warm-up: sessions, connections, tunnels

    clock = StepClock()
    before = relayed()
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                         stopping_criteria=StoppingCriteriaList([clock]), **kwargs)
    elapsed = time.perf_counter() - start
    relayed_bytes = relayed() - before
    new = out.shape[1] - ids.shape[1]
    steps = clock.step_seconds()

    train = []
    for _ in range(2):  # the first is a warm-up
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        train.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)

    print(json.dumps({
        "new_tokens": new, "tok_s": round(new / elapsed, 2),
        "step_ms_median": round(statistics.median(steps) * 1000, 2),
        "train_step_ms": round(train[-1] * 1000, 1), "train_seq_len": ids.shape[1],
        "relayed_bytes_during_generate": relayed_bytes,
        "relayed_bytes_per_token": round(relayed_bytes / new) if new else 0,
        "paths": sorted(set(tunnels._tunnels.paths())) if tunnels._tunnels else [],
    }), flush=True)
    model.swarm.shutdown()


if __name__ == "__main__":
    main()
